"""DeepSeek-V3.2 against transformers: MLA with the DSA lightning indexer (its own projections, LayerNorm'd keys
with half-split RoPE, ReLU scores weighted per head, top-k keys per query), index_topk 5 < the 12-token prompt."""

import numpy as np
import pytest
from checkpoints import build, reference_logits
from parity import EXACT, PROMPT, check_cached_decoding, check_parity, nmse

from moepack.convert.pipeline import convert


@pytest.mark.parametrize("fused,old", [(False, False), (True, False), (False, True)], ids=["orig", "fused", "old"])
def test_deepseek_v32_parity(tmp_path, fused, old):
    check_parity("deepseek_v32", tmp_path, fused=fused, old_spelling=old)


def test_selection_acts_on_the_test_prompt(tmp_path):
    # the same weights with index_topk >= the prompt attend densely: transformers' logits must differ, or the
    # parity test above could not tell a runtime that ignores the indexer from one that follows it
    sparse, _ = reference_logits(build("deepseek_v32", tmp_path / "sparse"), PROMPT)
    dense, _ = reference_logits(build("deepseek_v32", tmp_path / "dense", index_topk=len(PROMPT)), PROMPT)
    assert nmse(sparse, dense) > 1e-3


def test_cached_decoding_equals_full_forward(tmp_path, monkeypatch):
    eng, cache = check_cached_decoding("deepseek_v32", tmp_path, monkeypatch)
    for c in cache:  # latent, roped key and the indexer's keys, one head each
        widths = [a.shape[3] for a in c.arrays]
        assert widths == [eng.config["kv_lora_rank"], eng.config["qk_rope_head_dim"], eng.config["index_head_dim"]]
        assert all(a.shape[1] == 1 for a in c.arrays)


def test_fp8_release_decodes_the_indexer_too(tmp_path):
    """The release stores dense weights as 128x128 FP8 blocks, the indexer's wq_b and wk included (weights_proj and
    the norms stay bf16): the indexer weights must decode through the same encoding, exactly."""
    import json

    from checkpoints import reference_greedy
    from safetensors.torch import load_file
    from test_encodings import (
        FP8_SKIP,
        _checkpoint,
        assert_matches,
        fp8_reference,
        to_fp8_blocks,
    )

    from moepack.formats.reader import PackReader

    src = build("deepseek_v32", tmp_path / "float")
    cfg = json.loads((src / "config.json").read_text())
    block, release, decoded = (16, 16), {}, {}
    for name, w in load_file(src / "model.safetensors").items():
        if name.endswith(".weight") and w.ndim == 2 and not any(k in name for k in (*FP8_SKIP, "weights_proj")):
            codes, scale = to_fp8_blocks(w, block)
            release[name], release[name + "_scale_inv"] = codes, scale
            decoded[name] = fp8_reference(codes, scale, block)
        else:
            release[name] = decoded[name] = w
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}
    _checkpoint(tmp_path / "release", release, {**cfg, "quantization_config": qc})
    _checkpoint(tmp_path / "decoded", decoded, cfg)
    want, model = reference_logits(tmp_path / "decoded", PROMPT)
    pack = convert(str(tmp_path / "release"), tmp_path / "pack", EXACT, progress=False)
    assert_matches(pack, want, reference_greedy(model, PROMPT, 8))
    r = PackReader(pack)
    for part in ("wq_b", "wk"):
        name = f"model.layers.1.self_attn.indexer.{part}.weight"
        assert r.manifest.dense[name].source_encoding == "fp8-e4m3-block16x16"
        np.testing.assert_array_equal(np.array(r.dense_tensor(name)), decoded[name].numpy())
