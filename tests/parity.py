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


def check_cached_decoding(kind: str, tmp: Path, monkeypatch, prefix: int = 5):
    """A float32 pack of ``kind``: PROMPT through the cache (a ``prefix``-token prefill, then one token at a time)
    equals one full forward pass, and so does a pass split into 4-token passes with attention scores one query at a
    time (sparse-attention selection must not depend on how a prompt is blocked); the full pass matches
    transformers. Returns the engine and its caches after PROMPT, for the caller to inspect."""
    import mlx.core as mx

    from moepack.runtime.models import attention

    ckpt = build(kind, tmp / "ckpt")
    ref, _ = reference_logits(ckpt, PROMPT)
    engine = moepack.load(convert(str(ckpt), tmp / "pack", EXACT, progress=False))
    whole = engine.logits(PROMPT)
    assert nmse(whole, ref) < 1e-5
    cache = engine.model.make_cache()
    steps = [engine.model(mx.array([PROMPT[:prefix]]), cache)[0]]
    steps += [engine.model(mx.array([[t]]), cache)[0] for t in PROMPT[prefix:]]
    assert all(c.offset == len(PROMPT) for c in cache)
    np.testing.assert_allclose(np.array(mx.concatenate(steps, axis=0).astype(mx.float32)), whole, rtol=1e-4, atol=1e-4)
    with monkeypatch.context() as m:
        m.setattr(attention, "SCORE_BYTES", 1)
        m.setattr(engine, "max_pass", 4)
        np.testing.assert_allclose(engine.logits(PROMPT), whole, rtol=1e-4, atol=1e-4)
    return engine, cache


def check_prefix_reuse(kind: str, tmp: Path) -> None:
    """A recurrent-state family (linear attention): a prompt prefilled in two pieces gives the logits of one pass; a
    prompt cache diverging before its prompt's end is not reused (a recurrent state cannot be rewound), one holding
    an exact prefix is, and so is one that went on past its prompt (back to the prompt's snapshot)."""
    from moepack.runtime.generation import PromptCache, prefill

    engine = moepack.load(convert(str(build(kind, tmp / "ckpt")), tmp / "pack", EXACT, progress=False))
    whole = engine.logits(PROMPT)[-1]
    prompts = PromptCache()

    def cached_prefix():
        cache = engine.make_cache()
        prefill(engine, PROMPT[:8], cache)
        prompts.put(PROMPT[:8], cache)

    cached_prefix()
    fresh, reused = prompts.take(PROMPT[:5] + [1, 2, 3], engine.make_cache)
    assert reused == 0 and all(c.offset == 0 for c in fresh)
    cached_prefix()
    cache, reused = prompts.take(PROMPT, engine.make_cache)
    assert reused == 8
    np.testing.assert_allclose(prefill(engine, PROMPT[8:], cache), whole, rtol=1e-4, atol=1e-4)
    # the next turn of a chat: the cache went on past the prompt (a reply the new prompt does not repeat), and
    # comes back to the prompt's end, where the recurrent state was snapshotted
    cache = engine.make_cache()
    prefill(engine, PROMPT[:8], cache)
    prefill(engine, [1], cache)
    prefill(engine, [2], cache)
    prompts.put(PROMPT[:8] + [1, 2], cache)
    cache, reused = prompts.take(PROMPT, engine.make_cache)
    assert reused == 8
    np.testing.assert_allclose(prefill(engine, PROMPT[8:], cache), whole, rtol=1e-4, atol=1e-4)
