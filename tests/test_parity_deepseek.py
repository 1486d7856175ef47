"""DeepSeek family (deepseek_v2, deepseek_v3, kimi_k2) against transformers: MLA with a latent-only KV cache,
YaRN with mscale, V2 softmax / V3 sigmoid grouped routing, shared experts, leading dense layers, MTP layers."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from checkpoints import YARN, build, reference_logits, to_old_spelling
from parity import EXACT, PROMPT, check_parity, nmse
from safetensors.numpy import load_file, save_file

import moepack
from moepack.convert.pipeline import convert
from moepack.convert.recipe import Recipe

CASES = {
    "v2": ("deepseek_v2", {}),  # q_proj, group_limited_greedy (group max), mscale == mscale_all_dim
    "v2-qlora": ("deepseek_v2", {"q_lora_rank": 24}),  # q_a_proj, q_a_layernorm, q_b_proj
    "v3": ("deepseek_v3", {}),  # q-LoRA, sigmoid + correction bias, group top-2 sum, renormalised
}


@pytest.mark.parametrize("fused,old", [(False, False), (True, False), (False, True)], ids=["orig", "fused", "old"])
@pytest.mark.parametrize("case", CASES)
def test_deepseek_parity(tmp_path, case, fused, old):
    kind, overrides = CASES[case]
    check_parity(kind, tmp_path, fused=fused, old_spelling=old, **overrides)


@pytest.mark.parametrize("kind,overrides", [
    # greedy ignores groups; V2 ignores norm_topk_prob (weights stay unnormalised)
    ("deepseek_v2", {"topk_method": "greedy", "norm_topk_prob": True}),
    # mscale != mscale_all_dim: cos/sin scaled by yarn's attention factor (1.0648) besides the mscale² softmax scale
    ("deepseek_v3", {"rope_parameters": {**YARN, "mscale": 1.0, "mscale_all_dim": 0.5}}),
    # rope_interleave=False: rotate halves instead of interleaved pairs
    ("deepseek_v3", {"rope_interleave": False, "q_lora_rank": None}),
], ids=["v2-greedy", "v3-attention-factor", "v3-no-interleave"])
def test_deepseek_variants(tmp_path, kind, overrides):
    check_parity(kind, tmp_path, **overrides)


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    """A DeepSeek-V3 checkpoint, its pack and transformers' logits for PROMPT."""
    tmp = tmp_path_factory.mktemp("v3")
    ckpt = build("deepseek_v3", tmp / "ckpt")
    ref, _ = reference_logits(ckpt, PROMPT)
    return ckpt, convert(str(ckpt), tmp / "pack", EXACT, progress=False), ref


def _cached_logits(eng) -> np.ndarray:
    """PROMPT's logits through the KV cache: a prefill chunk (expanded attention), then one token at a time
    (kv_b_proj absorbed into q and o)."""
    cache = eng.model.make_cache()
    steps = [eng.model(mx.array([PROMPT[:5]]), cache)[0]]
    steps += [eng.model(mx.array([[t]]), cache)[0] for t in PROMPT[5:]]
    for c in cache:  # only the latent and the shared roped key are cached, one head each
        assert c.offset == len(PROMPT)
        assert c.keys.shape[1:2] + c.keys.shape[3:] == (1, eng.config["kv_lora_rank"])
        assert c.values.shape[1:2] + c.values.shape[3:] == (1, eng.config["qk_rope_head_dim"])
    return np.array(mx.concatenate(steps, axis=0).astype(mx.float32))


def test_kv_cache_is_latent_and_matches_full_forward(v3):
    _, pack, ref = v3
    eng = moepack.load(pack)
    cached = _cached_logits(eng)
    np.testing.assert_allclose(cached, eng.logits(PROMPT), rtol=1e-4, atol=1e-4)
    assert nmse(cached, ref) < 1e-5


def test_quantized_kv_b_proj_decode_matches_prefill(tmp_path, v3):
    # the absorbed decode path slices kv_b_proj per head, also when it is quantized
    ckpt, _, ref = v3
    recipe = Recipe(dtype="float32", expert_bits=8, dense_group_size=32, expert_group_size=32)
    eng = moepack.load(convert(str(ckpt), tmp_path / "pack", recipe, progress=False))
    assert isinstance(eng.model.model.layers[0].self_attn.kv_b_proj, nn.QuantizedLinear)
    cached = _cached_logits(eng)
    np.testing.assert_allclose(cached, eng.logits(PROMPT), rtol=1e-4, atol=1e-4)
    assert nmse(cached, ref) < 1e-2  # 8-bit weights: close, not exact


def _copy(ckpt, dest):
    shutil.copytree(ckpt, dest)
    return dest


def test_kimi_k2_config(tmp_path, v3):
    # Kimi K2 ships the V3 architecture under its own model_type, in the hub's old config spelling
    ckpt, _, ref = v3
    src = _copy(ckpt, tmp_path / "kimi")
    cfg = to_old_spelling(json.loads((src / "config.json").read_text()))
    cfg.update(model_type="kimi_k2", architectures=["DeepseekV3ForCausalLM"], topk_method="noaux_tc",
               scoring_func="sigmoid", num_nextn_predict_layers=0)
    cfg.pop("rope_interleave")  # absent on the hub: V3's default (True) applies
    (src / "config.json").write_text(json.dumps(cfg))
    got = moepack.load(convert(str(src), tmp_path / "pack", EXACT, progress=False)).logits(PROMPT)
    assert nmse(got, ref) < 1e-5


def test_mtp_layer_tensors_are_dropped(tmp_path, v3):
    # DeepSeek-V3 checkpoints carry a multi-token-prediction block as layer num_hidden_layers; transformers
    # ignores it, so the converter must leave it out and the model must still match
    ckpt, _, ref = v3
    src = _copy(ckpt, tmp_path / "mtp")
    n = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    tensors = load_file(src / "model.safetensors")
    rng = np.random.default_rng(0)
    extra = {f"model.layers.{n}.eh_proj.weight": (64, 128), f"model.layers.{n}.enorm.weight": (64,),
             f"model.layers.{n}.hnorm.weight": (64,), f"model.layers.{n}.shared_head.norm.weight": (64,),
             f"model.layers.{n}.mlp.gate.weight": (8, 64), f"model.layers.{n}.mlp.experts.0.gate_proj.weight": (32, 64)}
    tensors.update({k: rng.standard_normal(s).astype(np.float32) for k, s in extra.items()})
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    pack = convert(str(src), tmp_path / "pack", EXACT, progress=False)
    manifest = json.loads((pack / "manifest.json").read_text())
    assert not [k for k in manifest["dense"] if k.startswith(f"model.layers.{n}.")]
    got = moepack.load(pack).logits(PROMPT)
    assert nmse(got, ref) < 1e-5
