"""DeepSeek V4's compressed attention: the compressors that pool every ``rate`` positions into one entry, the
lightning indexer that picks each query's best entries, the per-layer cache that carries their state between calls,
and the mask over [sliding-window keys | entries] that ``attention.attend`` applies one query block at a time
(``deepseek_v4.py`` builds the attention from them).

Selection depends only on each query's position and scores, never on how the queries are split into blocks or on
the memory budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from moepack.runtime.models.attention import SCORE_BYTES
from moepack.runtime.models.moe import topk
from moepack.runtime.models.rope import ScaledRoPE

# ---- caches ----------------------------------------------------------------------------------


@dataclass
class CompressorState:
    """One compressor's running state: the projected positions of the window not yet closed (``kv``, ``gate``), the
    last closed window's first half (CSA's overlap) and the entries emitted so far [B, count, D] (RoPE applied)."""

    kv: mx.array | None = None
    gate: mx.array | None = None
    overlap_kv: mx.array | None = None
    overlap_gate: mx.array | None = None
    entries: mx.array | None = None
    count: int = 0


class V4Cache:
    """A layer's cache: the last ``sliding_window - 1`` keys (K = V) and its compressors' states.

    The compressors' windows cannot be rewound, so ``trim`` forgets everything (``offset`` 0), which tells a caller
    (``PromptCache``) that the cache no longer holds the prefix.
    """

    def __init__(self) -> None:
        self.keys: mx.array | None = None  # [B, 1, <= window - 1, D]
        self.states: dict[str, CompressorState] = {}
        self.offset = 0

    def state(self, name: str) -> CompressorState:
        return self.states.setdefault(name, CompressorState())

    def trim(self, n: int) -> None:
        if n > 0:
            self.keys, self.states, self.offset = None, {}, 0


@dataclass(frozen=True)
class CompressedMask:
    """The mask of T queries at ``offset`` over [sliding keys from absolute position ``start`` (``n_slide`` of them)
    | ``n_comp`` compressed entries], for ``attention.attend``'s query blocks (one sequence, B = 1).

    A query at position t sees the sliding keys in (t - window, t] and the entries whose window has closed
    (w < (t + 1) // rate), or with ``selected`` [T, k] (CSA) only those the indexer chose (-1: none).
    """

    offset: int
    start: int
    window: int
    n_slide: int
    n_comp: int = 0
    rate: int = 1
    selected: mx.array | None = None

    def keys(self, q0: int, q1: int) -> tuple[int, int]:
        return max(0, self.offset + q0 - self.window + 1 - self.start), self.n_slide + self.n_comp

    def block(self, q0: int, q1: int, dtype: mx.Dtype = mx.float32) -> mx.array:
        lo, _ = self.keys(q0, q1)
        q = mx.arange(self.offset + q0, self.offset + q1)[:, None]
        k = mx.arange(self.start + lo, self.start + self.n_slide)[None, :]
        seen = (k <= q) & (k > q - self.window)
        if self.n_comp:
            if self.selected is None:
                comp = mx.arange(self.n_comp)[None, :] < (q + 1) // self.rate
            else:
                sel = self.selected[q0:q1]
                sel = mx.where(sel < 0, self.n_comp, sel)  # the unused picks land in a column dropped below
                comp = mx.put_along_axis(mx.zeros((q1 - q0, self.n_comp + 1), mx.bool_), sel, mx.array(True), axis=-1)
                comp = comp[:, : self.n_comp]
            seen = mx.concatenate([seen, comp], axis=1)
        return mx.where(seen, mx.array(0, dtype), mx.array(-math.inf, dtype)).astype(dtype)


# ---- compressors and the indexer -------------------------------------------------------------


class Compressor(nn.Module):
    """One entry per ``rate`` positions: Σ softmax(gate + position_bias)·kv over the window, RMS-normalised, roped at
    the window's first position. ``overlap`` (CSA): the projections are two series [Ca | Cb] and entry w pools
    window w-1's Ca with window w's Cb (width 2·rate, stride rate)."""

    float32 = True  # position_bias stays float32, as transformers keeps it

    def __init__(self, hidden: int, dim: int, rate: int, overlap: bool, rope: ScaledRoPE, eps: float):
        super().__init__()
        width = 2 * dim if overlap else dim
        self.dim, self.rate, self.overlap, self.rope = dim, rate, overlap, rope
        self.kv_proj = nn.Linear(hidden, width, bias=False)
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.position_bias = mx.zeros((rate, width))
        self.kv_norm = nn.RMSNorm(dim, eps=eps)

    def __call__(self, x: mx.array, st: CompressorState) -> mx.array:
        """New positions x [B, T, H] -> every entry so far [B, count, dim]."""
        B = x.shape[0]
        kv, gate = self.kv_proj(x), self.gate_proj(x)
        if st.kv is not None:
            kv, gate = mx.concatenate([st.kv, kv], axis=1), mx.concatenate([st.gate, gate], axis=1)
        usable = kv.shape[1] // self.rate * self.rate
        st.kv, st.gate = kv[:, usable:], gate[:, usable:]  # a window not yet closed waits for its last positions
        n, r, d = usable // self.rate, self.rate, self.dim
        if n:
            kv = kv[:, :usable].reshape(B, n, r, -1)
            gate = gate[:, :usable].reshape(B, n, r, -1).astype(mx.float32) + self.position_bias.astype(mx.float32)
            if self.overlap:
                first_kv = st.overlap_kv[:, None] if st.overlap_kv is not None else mx.zeros((B, 1, r, d), kv.dtype)
                first_gate = st.overlap_gate[:, None] if st.overlap_gate is not None else \
                    mx.full((B, 1, r, d), -math.inf, mx.float32)
                st.overlap_kv, st.overlap_gate = kv[:, -1, :, :d], gate[:, -1, :, :d]
                prev_kv = mx.concatenate([first_kv, kv[:, :-1, :, :d]], axis=1)
                prev_gate = mx.concatenate([first_gate, gate[:, :-1, :, :d]], axis=1)
                kv = mx.concatenate([prev_kv, kv[..., d:]], axis=2)  # [B, n, 2r, d]
                gate = mx.concatenate([prev_gate, gate[..., d:]], axis=2)
            pooled = (kv * mx.softmax(gate, axis=2).astype(kv.dtype)).sum(axis=2)  # [B, n, d]
            entries = self.rope.at(self.kv_norm(pooled), mx.arange(n) * r + st.count * r)
            st.entries = entries if st.entries is None else mx.concatenate([st.entries, entries], axis=1)
            st.count += n
        return st.entries if st.entries is not None else mx.zeros((B, 0, d), x.dtype)


class Scorer(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.weights_proj = nn.Linear(hidden, heads, bias=False)


class Indexer(Compressor):
    """The lightning indexer: its own overlapping compressor at ``index_head_dim``, queries from the attention's
    low-rank query, score(t, s) = Σ_h w_{t,h}·relu(q_{t,h}·k_s)/sqrt(d); each query keeps its ``topk`` best entries
    among those whose window has closed."""

    def __init__(self, hidden: int, q_lora_rank: int, heads: int, dim: int, rate: int, topk: int, rope: ScaledRoPE,
                 eps: float):
        super().__init__(hidden, dim, rate, True, rope, eps)
        self.heads, self.topk = heads, topk
        self.q_b_proj = nn.Linear(q_lora_rank, heads * dim, bias=False)
        self.scorer = Scorer(hidden, heads)

    def select(self, x: mx.array, q_residual: mx.array, positions: mx.array, st: CompressorState) -> mx.array:
        """-> the chosen entries [T, k] of each query (-1: none), for the one sequence x [1, T, H]."""
        keys = self(x, st)[0].astype(mx.float32)  # [S, d]
        T, S = x.shape[1], keys.shape[0]
        k = min(self.topk, S)
        if k == 0:
            return mx.zeros((T, 0), mx.int32)
        q = self.q_b_proj(q_residual[0]).reshape(T, self.heads, self.dim).swapaxes(0, 1)  # [heads, T, d]
        q = self.rope.at(q, positions).swapaxes(0, 1).astype(mx.float32)  # [T, heads, d]
        w = self.scorer.weights_proj(x[0]).astype(mx.float32) * self.heads**-0.5  # [T, heads]
        visible = (positions + 1) // self.rate  # [T]: entries before this one have closed
        block = max(1, SCORE_BYTES // (4 * self.heads * S))
        out = []
        for t0 in range(0, T, block):  # a block of queries at a time; each query's choice is its own
            t1 = min(T, t0 + block)
            s = mx.maximum(q[t0:t1] @ keys.T, 0) * self.dim**-0.5  # [b, heads, S]
            s = (s * w[t0:t1, :, None]).sum(axis=1)  # [b, S]
            future = mx.arange(S)[None, :] >= visible[t0:t1, None]
            idx = topk(mx.where(future, -math.inf, s), k).astype(mx.int32)
            out.append(mx.where(idx >= visible[t0:t1, None], -1, idx))
            if t1 < T:
                mx.eval(out[-1])
        return mx.concatenate(out, axis=0) if len(out) > 1 else out[0]
