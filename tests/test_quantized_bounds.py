"""Quantized packs against transformers' float32 logits: within the bounds README.md documents.

Tiny random models route on near-ties, so quantization noise flips some expert choices and the error is far
larger than on trained models; the bounds are for these checkpoints. A broken quantized path (wrong scales,
wrong packing, wrong group) gives NMSE of 1 or more.
"""

from __future__ import annotations

import pytest

import moepack
from checkpoints import TINY, build, reference_logits
from moepack.convert.pipeline import convert
from moepack.convert.recipe import Recipe
from parity import PROMPT, nmse

RECIPES = {  # name -> (recipe, NMSE bound); group 32 so the tiny models' 32/64-wide matrices quantize
    "8bit": (Recipe(dtype="float32", expert_bits=8, dense_bits=8, expert_group_size=32, dense_group_size=32), 0.1),
    "default": (Recipe(expert_bits=4, dense_bits=8, expert_group_size=32, dense_group_size=32), 0.5),
}


@pytest.mark.parametrize("kind", sorted(TINY))
def test_quantized_pack_within_bound(kind, tmp_path):
    ckpt = build(kind, tmp_path / "ckpt")
    ref, _ = reference_logits(ckpt, PROMPT)
    for name, (recipe, bound) in RECIPES.items():
        pack = convert(str(ckpt), tmp_path / name, recipe, progress=False)
        got = moepack.load(pack).logits(PROMPT)
        assert nmse(got, ref) < bound, f"{kind} {name}: NMSE {nmse(got, ref):.3g} >= {bound}"
