"""Mistral Large 4 against transformers: MLA without query LoRA + DSA (indexer queries from the hidden state), NoPE
layers, cross-layer latent-KV sharing, learned query scaling, LeRoPE, logit softcap; a multimodal checkpoint whose
Pixtral tower is left out, in Mistral's own tensor names (``layers.N.attention.wq``, ``lerope.alpha``, ...) and in
transformers' (``model.language_model.*``)."""

import json

import pytest
from checkpoints import build
from parity import EXACT, PROMPT, check_cached_decoding, check_parity

import moepack
from moepack.convert.pipeline import convert


@pytest.mark.parametrize("fused", [False, True], ids=["mistral-names", "transformers-names"])
def test_mistral_large4_parity(tmp_path, fused):
    check_parity("mistral_large4", tmp_path, fused=fused)


def test_schedules_from_their_short_spellings(tmp_path):
    # no_rope_layer_interval 2 (layers 1 and 3 NoPE), index_topk_pattern "FSFF", no kv_source_layers (no sharing)
    ckpt = build("mistral_large4", tmp_path / "ckpt", no_rope_layers=[1, 0, 1, 0], kv_source_layers=[0, 1, 2, 3],
                 indexer_types=["full", "shared", "full", "full"])
    p = ckpt / "config.json"
    cfg = json.loads(p.read_text())
    text = {k: v for k, v in cfg["text_config"].items() if k not in ("no_rope_layers", "kv_source_layers", "indexer_types")}
    p.write_text(json.dumps({**cfg, "text_config": {**text, "no_rope_layer_interval": 2, "index_topk_pattern": "FSFF"}}))
    check_parity("mistral_large4", tmp_path, ckpt=ckpt)


def test_cached_decoding_equals_full_forward(tmp_path, monkeypatch):
    _, cache = check_cached_decoding("mistral_large4", tmp_path, monkeypatch)
    # 0: latent, roped key, indexer keys; 1: reads layer 0's KV and selection, keeps nothing; 2 (NoPE): latent and
    # indexer keys; 3 (NoPE): reads layer 2's KV, keeps its own indexer's keys
    assert [[a.shape[3] for a in c.arrays] for c in cache] == [[32, 8, 16], [], [32, 16], [16]]


def test_a_layer_never_reuses_what_it_was_not_handed_in_this_pass(tmp_path):
    # a pipeline stage that starts at layer 1 (which reads layer 0's KV and selection) must refuse, not reuse what
    # a previous whole-model pass left behind
    import mlx.core as mx

    from moepack.errors import UnsupportedArchitecture

    eng = moepack.load(convert(str(build("mistral_large4", tmp_path / "ckpt")), tmp_path / "pack", EXACT, progress=False))
    eng.logits(PROMPT)
    h = eng.model.model.embed_tokens(mx.array([PROMPT]))
    with pytest.raises(UnsupportedArchitecture, match="layer 1 reuses"):
        eng.model.run_layers(h, None, range(1, 4))


def test_mtp_head_is_left_out(tmp_path):
    # the release also ships a multi-token-prediction draft head (mtp_dspark.*), which transformers ignores
    import torch
    from safetensors.torch import load_file, save_file

    ckpt = build("mistral_large4", tmp_path / "ckpt")
    tensors = load_file(ckpt / "model.safetensors")
    tensors["mtp_dspark.layers.0.attention.wq.weight"] = torch.randn(96, 64)
    tensors["mtp_dspark.norm.weight"] = torch.randn(64)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    check_parity("mistral_large4", tmp_path, ckpt=ckpt)
