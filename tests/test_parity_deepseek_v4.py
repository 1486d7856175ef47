"""DeepSeek V4: parity of the converted pack with transformers (transformers' names fused and per expert, the hub
release's names, both config spellings), every feature of the tiny config acting on the prompt, cached decoding
equal to a full forward pass, selection independent of the query blocks, and hash-routed experts read early and
exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from checkpoints import build, make_model
from parity import EXACT, PROMPT, check_parity
from safetensors.torch import load_file, save_file

import moepack
from moepack.convert.pipeline import convert
from moepack.runtime.models import attention, deepseek_v4


@pytest.mark.parametrize("fused,old", [(False, False), (True, False), (False, True)])
def test_deepseek_v4_parity(tmp_path, fused, old):
    check_parity("deepseek_v4", tmp_path, fused=fused, old_spelling=old)


# transformers' names -> the hub release's (what transformers' conversion mapping reads back)
RELEASE = (("model.", ""), ("embed_tokens.", "embed."), ("hc_head.hc_", "hc_head_"), (".attn.norm.", ".attn.kv_norm."))


def test_deepseek_v4_release_layout(tmp_path):
    """The release's layout: no ``model.`` prefix, ``embed``/``head``/``hc_head_fn``, ``layers.N.attn.wq_a``,
    ``ffn.experts.E.w1``, ``ffn.gate.tid2eid``, the legacy config, and an MTP layer (dropped)."""
    ckpt = build("deepseek_v4", tmp_path / "hf", old_spelling=True)
    tensors = {}
    for name, t in load_file(ckpt / "model.safetensors").items():
        for old, new in RELEASE:
            name = name.replace(old, new, 1) if old == "model." else name.replace(old, new)
        tensors[name] = t
    assert {"embed.weight", "head.weight", "norm.weight", "hc_head_fn", "layers.0.ffn.gate.tid2eid",
            "layers.1.attn.indexer.compressor.wkv.weight", "layers.2.ffn.experts.7.w2.weight"} <= set(tensors)
    tensors["mtp.0.attn.wq_a.weight"] = torch.randn(32, 64)
    tensors["mtp.0.ffn.experts.0.w1.weight"] = torch.randn(32, 64)
    out = tmp_path / "ckpt"
    out.mkdir()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text((ckpt / "config.json").read_text())
    check_parity("deepseek_v4", tmp_path, ckpt=out)


@pytest.mark.parametrize("override", [
    {"index_topk": 64},  # every closed CSA entry instead of the indexer's 2
    {"sliding_window": 64},
    {"swiglu_limit": 100.0},
    {"hc_mult": 1},
    {"mlp_layer_types": ["moe"] * 4},  # no hash routing
    {"layer_types": ["sliding_attention"] * 4},  # no compressed entries
])
def test_every_feature_acts_on_the_prompt(override):
    """The tiny config is only a test of a feature if changing that feature changes transformers' logits."""
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        base = make_model("deepseek_v4")(ids).logits
        other = make_model("deepseek_v4", **override)(ids).logits
    assert (base - other).abs().max() > 1e-3


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    root = tmp_path_factory.mktemp("v4")
    return convert(str(build("deepseek_v4", root / "ckpt")), root / "pack", EXACT, progress=False)


def test_cached_decoding_equals_a_full_forward(pack):
    """Prefill in uneven pieces, then one token at a time across windows and compression boundaries: every step's
    logits are those of one pass over the whole sequence (compressor buffers, CSA overlap, indexer and sliding keys
    carried in the cache)."""
    engine = moepack.load(pack, heat=False)
    seq = PROMPT + [251, 31, 150, 148, 183, 247, 71, 185, 9, 77, 3, 140]
    full = engine.logits(seq)
    cache = engine.make_cache()
    got, at = [], 0
    for n in (3, 4, 1, 2, 3) + (1,) * (len(seq) - 13):
        out = engine.forward(seq[at : at + n], cache, "all")
        got.append(out)
        at += n
    assert at == len(seq)
    np.testing.assert_allclose(np.concatenate(got), full, rtol=1e-5, atol=1e-5)
    assert all(c.offset == len(seq) for c in cache)
    # a cache cannot be rewound: trimming forgets it, which PromptCache takes as "nothing reusable"
    cache[0].trim(1)
    assert cache[0].offset == 0


def test_selection_does_not_depend_on_query_blocks(pack, monkeypatch):
    """Attention and the indexer one query at a time give the logits of the whole prompt at once."""
    engine = moepack.load(pack, heat=False)
    whole = engine.logits(PROMPT)
    monkeypatch.setattr(attention, "SCORE_BYTES", 1)
    monkeypatch.setattr(deepseek_v4, "SCORE_BYTES", 1)
    np.testing.assert_allclose(engine.logits(PROMPT), whole, rtol=1e-5, atol=1e-5)


def test_hash_routed_experts_are_read_early_and_exactly(pack):
    """A hash-routed layer's experts are read before the layer runs (while its attention computes), all of them
    used: no wasted read; with the pool large enough, no expert is read twice."""
    engine = moepack.load(pack, heat=False)
    list(engine.generate(PROMPT, 6))
    c = engine.store.counters
    config = json.loads((pack / "config.json").read_text())
    assert c.prefetch_issued > 0 and c.prefetch_used == c.prefetch_issued
    hashed = {k for k in engine.store.heat if config["mlp_layer_types"][k[0]] == "hash_moe"}
    assert c.prefetch_issued == len(hashed)  # every hash-routed expert came in through an early, exact read
    assert c.reads == len(engine.store.heat)


def test_virtual_pack_sizes_match_a_conversion(tmp_path):
    """tools/virtual_pack.py (how the README plans DeepSeek V4 Pro) sizes every V4 tensor as the converter writes it,
    the int32 hash-routing tables included."""
    import sys
    from pathlib import Path

    from moepack.convert.recipe import Recipe
    from moepack.formats.reader import PackReader

    sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
    from virtual_pack import virtual_pack

    ckpt = build("deepseek_v4", tmp_path / "ckpt", fused=True)  # transformers' own names, as the tool lists them
    for recipe in (EXACT, Recipe(expert_group_size=32, dense_group_size=32)):
        real = PackReader(convert(str(ckpt), tmp_path / "real", recipe, progress=False, force=True)).manifest
        virt = PackReader(virtual_pack(json.loads((ckpt / "config.json").read_text()), tmp_path / "virtual", recipe,
                                       None)).manifest
        assert {k: (r.encoding, r.dtype, r.nbytes) for k, r in virt.dense.items()} == \
            {k: (r.encoding, r.dtype, r.nbytes) for k, r in real.dense.items()}
        assert [virt.expert_layouts[e.layout].length for e in virt.experts] == \
            [real.expert_layouts[e.layout].length for e in real.experts]
