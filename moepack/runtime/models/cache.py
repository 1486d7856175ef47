"""Per-layer caches (KV for attention, a recurrent state for linear attention) and the causal mask, described
rather than materialised so attention can build it one query block at a time."""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx


class KVCache:
    """Keys and values of one attention layer, grown in steps so appends rarely reallocate."""

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        # keys: [B, n_kv, T, D_k]; values: [B, n_kv, T, D_v]
        prev, T = self.offset, keys.shape[2]
        if self.keys is None or prev + T > self.keys.shape[2]:
            n = (self.step + T - 1) // self.step * self.step
            new_k = mx.zeros((*keys.shape[:2], n, keys.shape[3]), keys.dtype)
            new_v = mx.zeros((*values.shape[:2], n, values.shape[3]), values.dtype)
            if self.keys is not None:
                new_k = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
                new_v = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)
            self.keys, self.values = new_k, new_v
        self.offset += T
        self.keys[..., prev : self.offset, :] = keys
        self.values[..., prev : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def trim(self, n: int) -> None:
        """Forget the last ``n`` positions (for reusing a shared prefix)."""
        self.offset = max(0, self.offset - n)


class RecurrentCache:
    """A linear-attention layer's state: the conv's last ``kernel - 1`` inputs and the recurrent matrix.

    Unlike a KV cache it cannot be rewound to an earlier position: ``trim`` forgets everything (``offset`` 0), which
    tells a caller (``PromptCache``) that the cache no longer holds the prefix.
    """

    def __init__(self) -> None:
        self.conv: mx.array | None = None
        self.state: mx.array | None = None
        self.offset = 0

    def trim(self, n: int) -> None:
        """Forget the last ``n`` positions: impossible for a recurrent state, so forget them all."""
        self.conv = self.state = None
        self.offset = 0


@dataclass(frozen=True)
class Causal:
    """The causal mask of one block of T queries that follows ``offset`` cached positions: query i sees keys up to
    offset+i and, with a sliding ``window``, only the last ``window`` of them (transformers' ``kv_idx > q_idx - window``);
    with ``chunk`` (Llama 4's chunked attention), only those of its own chunk (``kv_idx // chunk == q_idx // chunk``).

    Attention asks it, per block of queries, which keys matter (``keys``) and for the additive mask over just those
    (``block``), so a long prompt never materialises a [T, T] mask.
    """

    offset: int
    window: int | None = None
    chunk: int | None = None

    def keys(self, q0: int, q1: int) -> tuple[int, int]:
        """The key range [lo, hi) that queries q0..q1-1 of the block can see."""
        lo = max(0, self.offset + q0 - self.window + 1) if self.window else 0
        if self.chunk:
            lo = max(lo, (self.offset + q0) // self.chunk * self.chunk)
        return lo, self.offset + q1

    def block(self, q0: int, q1: int, dtype: mx.Dtype = mx.float32) -> mx.array | None:
        """Additive mask [q1-q0, hi-lo] over ``keys(q0, q1)``; None where every query sees every one of them."""
        lo, hi = self.keys(q0, q1)
        if q1 - q0 == 1:
            return None
        q = mx.arange(self.offset + q0, self.offset + q1)[:, None]
        k = mx.arange(lo, hi)[None, :]
        seen = k <= q
        if self.window:
            seen = seen & (k > q - self.window)
        if self.chunk:
            seen = seen & (k // self.chunk == q // self.chunk)
        return mx.where(seen, mx.array(0, dtype), mx.array(-math.inf, dtype)).astype(dtype)
