"""Hunyuan v4 (hy_v4) against transformers: MLA + DSA (an indexer over the trailing rope dims; "shared" layers reuse
the last full layer's top-k, index_topk 5 < the 12-token prompt), independent hyper-connections (3 streams), learned
sinks, a sigmoid output gate and clamped expert SwiGLU, each acting on the prompt; the release's tensor names;
cached decoding equal to a full forward pass."""

from __future__ import annotations

import pytest
import torch
from checkpoints import build, make_model
from parity import PROMPT, check_cached_decoding, check_parity
from safetensors.torch import load_file, save_file


@pytest.mark.parametrize("fused", [False, True], ids=["orig", "fused"])
def test_hy_v4_parity(tmp_path, fused):
    check_parity("hy_v4", tmp_path, fused=fused)


@pytest.mark.parametrize("override", [
    {"index_topk": 64},  # every causal key instead of the indexer's 5
    {"indexer_types": ["full"] * 4},  # no shared layers
    {"hc_mult": 1},
    {"hc_magnitude": 2.0},
    {"swiglu_limit": 100.0},
    {"learnable_sink_init": 3.0},  # sinks not randomized below: see _without
])
def test_every_feature_acts_on_the_prompt(override):
    """The tiny config is only a test of a feature if changing that feature changes transformers' logits."""
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        base = make_model("hy_v4")
        other = make_model("hy_v4", **override)
        if "learnable_sink_init" in override:  # same weights, sinks moved
            other.load_state_dict(base.state_dict())
            for m in other.modules():
                if hasattr(m, "sinks"):
                    m.sinks.add_(3.0)
        assert (base(ids).logits - other(ids).logits).abs().max() > 1e-3


# transformers' names -> the release's (what transformers' conversion mapping for hy_v4 renames back)
RELEASE = ((".attn_hc.", ".hc_pre.hc_attn_layer.hc_"), (".ffn_hc.", ".hc_pre.hc_mlp_layer.hc_"),
           ("hc_head.hc_", "hc_head.hc_head_"), (".sinks", ".learnable_sink_param"), (".self_attn.gate_proj.", ".self_attn.linear_gate."))


def test_hy_v4_release_names(tmp_path):
    ckpt = build("hy_v4", tmp_path / "hf")
    tensors = {}
    for name, t in load_file(ckpt / "model.safetensors").items():
        for old, new in RELEASE:
            name = name.replace(old, new)
        tensors[name] = t
    assert {"model.layers.0.hc_pre.hc_attn_layer.hc_fn", "model.hc_head.hc_head_scale",
            "model.layers.1.self_attn.learnable_sink_param", "model.layers.1.self_attn.linear_gate.weight"} <= set(tensors)
    out = tmp_path / "ckpt"
    out.mkdir()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text((ckpt / "config.json").read_text())
    check_parity("hy_v4", tmp_path, ckpt=out)


def test_cached_decoding_equals_full_forward(tmp_path, monkeypatch):
    _, cache = check_cached_decoding("hy_v4", tmp_path, monkeypatch)
    # full layers cache their indexer's keys beside the latent and roped key; shared layers have none to cache
    assert [len(c.arrays) for c in cache] == [3, 2, 3, 2]
