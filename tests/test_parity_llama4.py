"""Llama 4 against transformers: dense and MoE layers interleaved, top-1 sigmoid routing scaling expert inputs, a
shared expert, chunked attention (chunks of 5 < the 12-token prompt), a NoPE layer with temperature tuning, llama3
RoPE scaling; the release's fused transposed experts and a per-expert layout, both config spellings, the multimodal
release (vision model left out), and cached decoding across chunk boundaries equal to a full forward."""

import json
import logging

import mlx.core as mx
import numpy as np
import pytest
import transformers
from checkpoints import COMMON, TINY, build, make_model
from parity import EXACT, PROMPT, check_parity
from safetensors.torch import load_file, save_file

import moepack
from moepack import arch
from moepack.convert.pipeline import convert
from moepack.runtime.models.cache import Causal


@pytest.mark.parametrize("old,overrides", [(False, {}), (True, {}),
                                           (False, {"num_experts_per_tok": 2, "use_qk_norm": False})],
                         ids=["release", "old", "top2-no-qk-norm"])
def test_llama4_parity(tmp_path, old, overrides):
    check_parity("llama4_text", tmp_path, old_spelling=old, **overrides)


def test_llama4_per_expert_layout(tmp_path):
    """Experts stored one tensor per projection (``feed_forward.experts.E.gate_proj.weight`` [I, H], as the FP8
    Maverick release stores them) instead of fused [E, H, 2I] / [E, I, H]."""
    ckpt = build("llama4_text", tmp_path / "ckpt")
    tensors = load_file(ckpt / "model.safetensors")
    for name in [n for n in tensors if n.endswith("experts.gate_up_proj")]:
        base = name[: -len("gate_up_proj")]
        gate_up, down = tensors.pop(name), tensors.pop(base + "down_proj")
        gate, up = gate_up.chunk(2, dim=-1)
        for e in range(gate_up.shape[0]):
            tensors[f"{base}{e}.gate_proj.weight"] = gate[e].T.contiguous()
            tensors[f"{base}{e}.up_proj.weight"] = up[e].T.contiguous()
            tensors[f"{base}{e}.down_proj.weight"] = down[e].T.contiguous()
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    # transformers cannot load this layout: the oracle is the fused checkpoint (same seed), itself checked above
    ref = build("llama4_text", tmp_path / "fused")
    got = moepack.load(convert(str(ckpt), tmp_path / "pack", EXACT, progress=False)).logits(PROMPT)
    want = moepack.load(convert(str(ref), tmp_path / "pack-fused", EXACT, progress=False)).logits(PROMPT)
    np.testing.assert_array_equal(got, want)


def test_llama4_multimodal_checkpoint(tmp_path, caplog):
    """The release layout: Llama4ForConditionalGeneration (``language_model.model.*``, ``language_model.lm_head``),
    its vision model and projector left out by the converter."""
    text = make_model("llama4_text")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)
    cfg = transformers.Llama4Config(text_config={**COMMON, **TINY["llama4_text"][2]}, vision_config=vision)
    vl = transformers.Llama4ForConditionalGeneration(cfg).eval()
    vl.language_model.load_state_dict(text.state_dict())
    ckpt = tmp_path / "ckpt"
    vl.save_pretrained(ckpt)
    with caplog.at_level(logging.WARNING):
        check_parity("llama4_text", tmp_path, ckpt=ckpt)
    assert "leaving out multi_modal_projector, vision_model" in caplog.text
    dense = json.loads((tmp_path / "pack" / "manifest.json").read_text())["dense"]
    assert dense and not [n for n in dense if n.startswith(("vision_model.", "multi_modal_projector."))]


def test_llama4_cached_decode_matches_full_forward(tmp_path):
    eng = moepack.load(convert(str(build("llama4_text", tmp_path / "ckpt")), tmp_path / "pack", EXACT, progress=False))
    cache = eng.model.make_cache()
    steps = [eng.model(mx.array([PROMPT[:3]]), cache)[0]] + [eng.model(mx.array([[t]]), cache)[0] for t in PROMPT[3:]]
    np.testing.assert_allclose(np.array(mx.concatenate(steps, axis=0)), eng.logits(PROMPT), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("offset,q0,q1", [(0, 0, 12), (0, 3, 9), (7, 0, 6), (9, 2, 3)])
def test_chunked_mask_blocks(offset, q0, q1):
    """Any block of queries after any offset sees exactly the keys of its own chunk up to itself, also when the
    attention splits a long prompt into query blocks that straddle chunks."""
    mask = Causal(offset, chunk=5)
    lo, hi = mask.keys(q0, q1)
    q = np.arange(offset + q0, offset + q1)[:, None]
    k = np.arange(0, offset + q1)[None, :]
    want = (k <= q) & (k // 5 == q // 5)
    assert not want[:, :lo].any()  # nothing visible is cut off
    block = mask.block(q0, q1)
    got = np.ones((q1 - q0, hi - lo), bool) if block is None else np.array(block) == 0
    np.testing.assert_array_equal(got, want[:, lo:hi])


def test_llama4_moe_layers():
    cfg = {"model_type": "llama4_text", "num_hidden_layers": 6, "num_local_experts": 16}
    assert arch.moe_layers(cfg) == [0, 1, 2, 3, 4, 5]  # Scout: every layer
    assert arch.moe_layers({**cfg, "interleave_moe_layer_step": 2}) == [1, 3, 5]  # Maverick: every other layer
    assert arch.moe_layers({**cfg, "interleave_moe_layer_step": 2, "moe_layers": [0, 4]}) == [0, 4]  # as given
    multimodal = {"model_type": "llama4", "text_config": cfg}
    assert arch.family_for(multimodal).name == "llama4" and arch.moe_layers(arch.text_config(multimodal)) == list(range(6))
