"""Parity against transformers, the oracle for model code: convert a tiny checkpoint, compare logits and greedy tokens."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

import moepack
from checkpoints import build, reference_greedy, reference_logits
from moepack.convert.pipeline import convert
from moepack.convert.recipe import Recipe

PROMPT = [3, 17, 42, 99, 7, 128, 5, 61, 200, 11, 36, 250]
EXACT = Recipe(quantize=False, dtype="float32")


def nmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a - b) ** 2).mean() / (b**2).mean())


def cached_logits(engine, prefill: int = 5) -> np.ndarray:
    """PROMPT's logits through the model's cache: a prefill of ``prefill`` tokens (longer than the tiny models'
    sliding windows), then one token at a time."""
    cache = engine.model.make_cache()
    steps = [engine.model(mx.array([PROMPT[:prefill]]), cache)[0]]
    steps += [engine.model(mx.array([[t]]), cache)[0] for t in PROMPT[prefill:]]
    return np.array(mx.concatenate(steps, axis=0).astype(mx.float32))


def check_parity(kind: str, tmp: Path, fused: bool = False, old_spelling: bool = False, ckpt: Path | None = None,
                 **overrides) -> None:
    """float32 pack logits within NMSE 1e-5 of transformers, same 8 greedy tokens, at full and minimum budget;
    cached decoding gives the full forward's logits.

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
    np.testing.assert_allclose(cached_logits(full), got, rtol=1e-4, atol=1e-4)
    small = moepack.load(pack, memory_budget=full.plan.minimum)
    assert small.plan.n_slots < full.plan.n_slots
    np.testing.assert_array_equal(small.logits(PROMPT), got)
    assert list(small.generate(PROMPT, 8)) == want
