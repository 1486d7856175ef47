"""GLM-5 (glm_moe_dsa) against transformers: MLA + DSA whose indexer rotates interleaved pairs, and "shared" layers
that have no indexer and reuse the last full layer's top-k selection (index_topk 5 < the 12-token prompt); the
indexer schedule in each spelling (indexer_types, index_topk_pattern, index_topk_freq + index_skip_topk_offset)."""

import json

import pytest
from checkpoints import build
from parity import check_cached_decoding, check_parity


@pytest.mark.parametrize("fused,old", [(False, False), (True, False), (False, True)], ids=["orig", "fused", "old"])
def test_glm_moe_dsa_parity(tmp_path, fused, old):
    check_parity("glm_moe_dsa", tmp_path, fused=fused, old_spelling=old)


def test_indexer_schedule_from_freq_and_offset(tmp_path):
    # freq 2, offset 2 over 4 layers: full, full, shared, full (transformers' GlmMoeDsaConfig derivation)
    ckpt = build("glm_moe_dsa", tmp_path / "ckpt", indexer_types=["full", "full", "shared", "full"])
    p = ckpt / "config.json"
    cfg = json.loads(p.read_text())
    del cfg["indexer_types"]
    p.write_text(json.dumps({**cfg, "index_topk_freq": 2, "index_skip_topk_offset": 2}))
    check_parity("glm_moe_dsa", tmp_path, ckpt=ckpt)


def test_cached_decoding_equals_full_forward(tmp_path, monkeypatch):
    _, cache = check_cached_decoding("glm_moe_dsa", tmp_path, monkeypatch)
    # full layers cache their indexer's keys beside the latent and roped key; shared layers have none to cache
    assert [len(c.arrays) for c in cache] == [3, 2, 2, 3]
