"""Parity against transformers, the oracle for model code: convert a tiny checkpoint, compare logits and greedy tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import moepack
from checkpoints import build, reference_greedy, reference_logits
from moepack.convert.pipeline import convert
from moepack.convert.recipe import Recipe

PROMPT = [3, 17, 42, 99, 7, 128, 5, 61, 200, 11, 36, 250]
EXACT = Recipe(quantize=False, dtype="float32")


def nmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a - b) ** 2).mean() / (b**2).mean())


def check_parity(kind: str, tmp: Path, fused: bool = False, old_spelling: bool = False, ckpt: Path | None = None,
                 **overrides) -> None:
    """float32 pack logits within NMSE 1e-5 of transformers, same 8 greedy tokens, at full and minimum budget.

    ``ckpt``: a checkpoint the test built itself (e.g. a hub-style layout), instead of ``build(kind, ...)``.
    """
    ckpt = ckpt or build(kind, tmp / "ckpt", fused=fused, old_spelling=old_spelling, **overrides)
    pack = convert(str(ckpt), tmp / "pack", EXACT, progress=False)
    ref, model = reference_logits(ckpt, PROMPT)
    want = reference_greedy(model, PROMPT, 8)
    full = moepack.load(pack)
    got = full.logits(PROMPT)
    assert got.shape == ref.shape
    print(f"{kind}: float32 logits NMSE {nmse(got, ref):.3g}")  # `pytest -s` shows it
    assert nmse(got, ref) < 1e-5, f"{kind}: logits NMSE {nmse(got, ref):.3g}"
    assert list(full.generate(PROMPT, 8)) == want
    small = moepack.load(pack, memory_budget=full.plan.minimum)
    assert small.plan.n_slots < full.plan.n_slots
    np.testing.assert_array_equal(small.logits(PROMPT), got)
    assert list(small.generate(PROMPT, 8)) == want
