"""Per-layer caches (KV for attention, a recurrent state for linear attention) and the causal mask, described
rather than materialised so attention can build it one query block at a time."""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx


class KVCache:
    """Per-position tensors of one attention layer (keys and values; MLA's latent and roped key; a sparse-attention
    indexer's keys besides), grown in steps so appends rarely reallocate."""

    step = 256

    def __init__(self) -> None:
        self.arrays: tuple[mx.array, ...] = ()  # each [B, heads, capacity, D]
        self.offset = 0

    @property
    def keys(self) -> mx.array | None:
        return self.arrays[0] if self.arrays else None

    @property
    def values(self) -> mx.array | None:
        return self.arrays[1] if len(self.arrays) > 1 else None

    def update_and_fetch(self, *new: mx.array) -> tuple[mx.array, ...]:
        """Append ``new`` (each [B, heads, T, D], the same T) and return every position so far of each."""
        prev, T = self.offset, new[0].shape[2]
        if not self.arrays or prev + T > self.arrays[0].shape[2]:
            n = (self.step + T - 1) // self.step * self.step
            grown = [mx.zeros((*a.shape[:2], n, a.shape[3]), a.dtype) for a in new]
            if self.arrays:
                grown = [mx.concatenate([old[..., :prev, :], g], axis=2) for old, g in zip(self.arrays, grown)]
            self.arrays = tuple(grown)
        self.offset += T
        for buf, a in zip(self.arrays, new):
            buf[..., prev : self.offset, :] = a
        return tuple(buf[..., : self.offset, :] for buf in self.arrays)

    def advance(self, n: int) -> tuple[()]:
        """Count ``n`` positions of a layer that keeps nothing of its own (it attends to another layer's KV)."""
        self.offset += n
        return ()

    def trim(self, n: int) -> None:
        """Forget the last ``n`` positions (for reusing a shared prefix)."""
        self.offset = max(0, self.offset - n)


class RecurrentCache:
    """A linear-attention layer's state: the conv's last ``kernel - 1`` inputs and the recurrent matrix, plus
    ``aux``: what other modules of the layer carry along the sequence (Qwen3.8-Flash-Next's PLE: its dilated conv's
    last inputs and the n-gram context's last token ids), named arrays snapshotted with the rest.

    Unlike a KV cache it cannot be rewound to any earlier position, only to the end of its last multi-token pass (the
    prompt: a snapshot kept by reference, MLX arrays being immutable), so the next turn of a conversation, which
    starts with this one's prompt, reuses it. ``trim`` to any other position forgets everything (``offset`` 0),
    which tells a caller (``PromptCache``) that the cache no longer holds the prefix.
    """

    def __init__(self) -> None:
        self.conv: mx.array | None = None
        self.state: mx.array | None = None
        self.aux: dict[str, mx.array] = {}
        self.offset = 0
        self.saved: tuple[int, mx.array | None, mx.array | None, dict[str, mx.array]] | None = None

    def advanced(self, T: int) -> None:
        """The layer has updated ``conv``, ``state`` and ``aux`` over T more positions; a prompt pass (T > 1) is
        snapshotted."""
        self.offset += T
        if T > 1:
            self.saved = (self.offset, self.conv, self.state, dict(self.aux))

    def rewind_point(self, n: int) -> int:
        """The longest prefix of at most ``n`` positions this cache can return to (0: none)."""
        if self.offset <= n:
            return self.offset
        return self.saved[0] if self.saved is not None and self.saved[0] <= n else 0

    def trim(self, n: int) -> None:
        """Forget the last ``n`` positions: back to the snapshot if it lies there, else forget them all."""
        target = self.offset - n
        if n <= 0:
            return
        if self.saved is not None and self.saved[0] == target:
            self.offset, self.conv, self.state, aux = self.saved
            self.aux = dict(aux)
            return
        self.conv = self.state = None
        self.aux = {}
        self.offset = 0


class LayerCaches(list):
    """The caches of one layer with several attention sublayers (LongCat-Flash: two), one each, kept at one offset."""

    @property
    def offset(self) -> int:
        return self[0].offset

    def trim(self, n: int) -> None:
        for c in self:
            c.trim(n)


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
