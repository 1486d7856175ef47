"""DeepSeek Sparse Attention (DSA): the "lightning indexer" that picks, for every query, the ``index_topk`` keys its
attention may see (DeepSeek-V3.2, GLM-5, Mistral Large 4).

The indexer has its own small projections and its own per-position keys, which live in the layer's cache beside the
attention's (``KVCache`` holds both), so decoding token by token selects exactly what a full forward pass does. For
query t over keys s (transformers' ``DeepseekV32Indexer``, which skips the reference's Hadamard rotation and FP8
scoring: both leave q·k unchanged up to rounding):

    score[t, s] = Σ_h  w[t, h] · relu(q[t, h] · k[s] · D^-1/2),   w = weights_proj(x) · H^-1/2

and the query attends to its top-k causal keys. Selection is made one block of queries at a time (each query's top-k
depends on its own row only), so it does not depend on the memory budget or on how a prompt is split into passes.

MiniMax-M3's indexer (``BlockIndexer``) selects blocks of consecutive keys instead, one selection per group of query
heads (``BlockSparse``); GLM-5.3's (``PooledIndexer``) scores pooled keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from moepack.runtime import kernels
from moepack.runtime.models import attention
from moepack.runtime.models.cache import Causal
from moepack.runtime.models.moe import topk

# The indexer's k_norm (and Mistral Large 4's q_input_norm) are LayerNorms built with this eps in transformers.
INDEXER_NORM_EPS = 1e-6


@dataclass(frozen=True)
class Sparse(Causal):
    """A causal mask that also hides the keys the indexer did not select: ``chosen`` [B, T, k] key positions per
    query (positions beyond a query's causal range may be among them; the causal part hides those)."""

    chosen: mx.array | None = None

    def block(self, q0: int, q1: int, dtype: mx.Dtype = mx.float32) -> mx.array:
        """Additive mask [B, 1, q1-q0, hi-lo] over ``keys(q0, q1)``: 0 where causal and selected, else -inf."""
        lo, hi = self.keys(q0, q1)
        return _additive(marked(self.chosen[:, q0:q1], hi)[..., lo:hi], self, q0, q1, dtype)[:, None]


def marked(idx: mx.array, width: int) -> mx.array:
    """idx [..., k] -> bool [..., width], True at each index; indices outside [0, width) (-1: none) mark nothing."""
    idx = mx.where((idx < 0) | (idx >= width), width, idx)  # one spare column takes them
    keep = mx.zeros((*idx.shape[:-1], width + 1), dtype=mx.bool_)
    return mx.put_along_axis(keep, idx, mx.array(True), axis=-1)[..., :width]


def _additive(keep: mx.array, causal: Causal, q0: int, q1: int, dtype: mx.Dtype) -> mx.array:
    """keep [..., q1-q0, keys] and the causal mask of those queries -> additive mask: 0 where both allow, else -inf."""
    c = Causal.block(causal, q0, q1, dtype)
    if c is not None:
        keep = keep & (c == 0)
    return mx.where(keep, mx.array(0, dtype), mx.array(-math.inf, dtype)).astype(dtype)


@dataclass(frozen=True)
class BlockSparse(Causal):
    """A causal mask that also hides the key *blocks* an indexer did not select, one selection per group of query
    heads (MiniMax-M3): ``chosen`` [B, G, T, k] block indices (-1: none) of ``size`` consecutive positions each;
    query head h uses group ``h // (heads / G)``."""

    chosen: mx.array | None = None
    size: int = 1
    heads: int = 1

    def block(self, q0: int, q1: int, dtype: mx.Dtype = mx.float32) -> mx.array:
        """Additive mask [B, heads, q1-q0, hi-lo] over ``keys(q0, q1)``: 0 where causal and in a selected block."""
        lo, hi = self.keys(q0, q1)
        n = -(-hi // self.size)
        keep = mx.repeat(marked(self.chosen[:, :, q0:q1], n), self.size, axis=-1)[..., lo:hi]
        return mx.repeat(_additive(keep, self, q0, q1, dtype), self.heads // self.chosen.shape[1], axis=1)


class HeadWeights(nn.Linear):
    """The indexer's per-head weights (``weights_proj``): kept float32, as transformers keeps them."""

    float32 = True

    def __call__(self, x: mx.array) -> mx.array:
        return kernels.linear(self, x.astype(mx.float32))


class PositionScaling(nn.Module):
    """Mistral Large 4's learned softmax scaling: queries times ``scale[h]·log(pos + 1) + bias[h]`` per head."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.scale = mx.zeros((n_heads,))
        self.bias = mx.ones((n_heads,))

    def __call__(self, q: mx.array, offset: int) -> mx.array:
        """q [B, H, T, D] -> q scaled per head and position."""
        log_pos = mx.log(mx.arange(offset + 1, offset + 1 + q.shape[2], dtype=mx.float32))
        s = self.scale[:, None] * log_pos[None] + self.bias[:, None]  # [H, T]
        return q * s[..., None].astype(q.dtype)


class Indexer(nn.Module):
    """The lightning indexer; module names are the checkpoints' (``self_attn.indexer.wq_b`` ...).

    ``q_dim``: what ``wq_b`` reads: the attention's normalised query LoRA (DeepSeek-V3.2, GLM-5: ``q_lora_rank``), or
    the hidden state itself through ``q_input_norm`` with a per-position query scaling (Mistral Large 4).
    ``rope``: applied to the indexer's queries and keys (None: a NoPE layer); it rotates the first ``rope_dim``
    dims, or the last (Hunyuan v4: a ``trailing`` rope). ``norm_eps``: ``k_norm``'s (Hunyuan v4: ``rms_norm_eps``).
    """

    def __init__(self, *, hidden: int, q_dim: int, n_heads: int, head_dim: int, topk: int, rope: nn.Module | None,
                 from_hidden: bool = False, norm_eps: float = INDEXER_NORM_EPS):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = n_heads, head_dim, topk
        if from_hidden:
            self.q_input_norm = nn.LayerNorm(hidden, eps=INDEXER_NORM_EPS)
            self.softmax_scaling = PositionScaling(n_heads)
        self.wq_b = nn.Linear(q_dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(hidden, head_dim, bias=False)
        self.k_norm = nn.LayerNorm(head_dim, eps=norm_eps)
        self.weights_proj = HeadWeights(hidden, n_heads, bias=False)
        self._rope = rope  # underscore: a model-level module, not this indexer's weights

    def keys(self, x: mx.array, offset: int) -> mx.array:
        """x [B, T, hidden] -> this layer's indexer keys [B, 1, T, D] (one head, roped), for the cache."""
        k = self.k_norm(self.wk(x))[:, None]
        return self._rope(k, offset=offset) if self._rope is not None else k

    def select(self, x: mx.array, q_in: mx.array, keys: mx.array, mask: Causal) -> Sparse:
        """Each query's top-k keys among ``keys`` [B, 1, S, D] (every cached position), as a :class:`Sparse` mask.

        x [B, T, hidden]: the layer's normed input; q_in: what ``wq_b`` reads (``q_lora`` or ``x``).
        """
        B, T, _ = x.shape
        if "q_input_norm" in self:
            q_in = self.q_input_norm(q_in)
        q = self.wq_b(q_in).reshape(B, T, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)  # [B, H, T, D]
        if "softmax_scaling" in self:
            q = self.softmax_scaling(q, mask.offset)
        if self._rope is not None:
            q = self._rope(q, offset=mask.offset)
        q = q.astype(mx.float32) * self.head_dim**-0.5
        k = keys.astype(mx.float32)  # [B, 1, S, D]
        w = self.weights_proj(x).astype(mx.float32) * self.n_heads**-0.5  # [B, T, H]
        S = k.shape[2]
        k_eff = min(self.topk, S)
        block = max(1, min(T, attention.SCORE_BYTES // (4 * B * self.n_heads * S)))  # as attend() blocks
        chosen = []
        for q0 in range(0, T, block):
            q1 = min(T, q0 + block)
            s = mx.maximum(q[:, :, q0:q1] @ k.swapaxes(-1, -2), 0)  # [B, H, Tb, S]
            score = (w[:, q0:q1].transpose(0, 2, 1)[..., None] * s).sum(axis=1)  # [B, Tb, S]
            t = mx.arange(mask.offset + q0, mask.offset + q1)[:, None]
            score = mx.where(mx.arange(S)[None] <= t, score, -math.inf)
            idx = topk(score, k_eff).astype(mx.int32)
            if block < T:
                mx.eval(idx)
            chosen.append(idx)
        return Sparse(mask.offset, mask.window, mask.chunk, mx.concatenate(chosen, axis=1) if len(chosen) > 1 else chosen[0])


@dataclass
class Relay:
    """What a layer hands to later ones during one forward pass: the last indexer selection (GLM-5 and Mistral
    Large 4 "shared" layers reuse it) and Mistral Large 4's latent KV per source layer (cross-layer KV sharing)."""

    selection: Sparse | None = None
    kv: dict[int, tuple[mx.array, ...]] | None = None

    def clear(self) -> None:
        self.selection = None
        if self.kv is not None:
            self.kv.clear()


class RelayedLM:
    """Mixin for a CausalLM whose layers hand things on through ``self.relay``: each pass starts with it empty, so a
    layer never reuses what an earlier pass (or, in a pipeline, a layer this stage does not run) left there."""

    relay: Relay | None = None

    def run_layers(self, h: mx.array, cache: list | None = None, layers: range | None = None,
                   tokens: mx.array | None = None) -> mx.array:
        if self.relay is not None:
            self.relay.clear()
        return super().run_layers(h, cache, layers, tokens)



class BlockSelect:
    """Mixin for an indexer that scores blocks of ``pool`` consecutive keys (``block_scores``) and lets each query see
    the positions of its ``budget // pool`` best complete blocks, plus its own incomplete block with ``tail``."""

    pool: int
    budget: int
    tail: bool = True

    def block_scores(self, x: mx.array, q_in: mx.array, keys: mx.array, offset: int) -> mx.array:
        """x [B, T, hidden] (queries from position ``offset`` on), the cached keys of the n complete blocks
        [B, n·pool, ...] -> scores [B, T, n]."""
        raise NotImplementedError

    def select(self, x: mx.array, q_in: mx.array, keys: mx.array, mask: Causal) -> Sparse:
        B, T, _ = x.shape
        n = keys.shape[2] // self.pool  # complete blocks
        score = None
        if min(self.budget // self.pool, n):
            score = self.block_scores(x, q_in, keys[:, 0, : n * self.pool], mask.offset)
        return pooled_selection(score, B, T, self.pool, self.budget, self.tail, mask)


class PooledIndexer(BlockSelect, Indexer):
    """GLM-5.3-Flash's indexer over pooled keys (transformers' ``Glm5NextTextIndexer``): the keys of every ``kpool``
    consecutive positions are pooled into one (a per-channel softmax over the pool of ``gate·x + ape``), queries
    score the complete pools they can see, the ``topk // kpool`` best pools give their positions, and with
    ``tail`` each query also sees its own incomplete pool. No rope.

    The cache holds per position [key | gate scores] ([B, 1, S, 2D]); pools are rebuilt from it, so a decoding step
    pools exactly what a full pass does.
    """

    def __init__(self, *, kpool: int, tail: bool, **kw):
        super().__init__(rope=None, **kw)
        self.kpool, self.tail = kpool, tail
        self.pool, self.budget = kpool, self.topk  # BlockSelect's names
        self.index_kpool_compress_ape = mx.zeros((kpool, self.head_dim))
        self.index_kpool_compress_gate = mx.zeros((self.head_dim, self.wk.weight.shape[1]))

    def keys(self, x: mx.array, offset: int) -> mx.array:
        """x [B, T, hidden] -> [B, 1, T, 2D]: each position's key and its pooling logits."""
        return mx.concatenate([self.k_norm(self.wk(x)), x @ self.index_kpool_compress_gate.T], axis=-1)[:, None]

    def block_scores(self, x: mx.array, q_in: mx.array, keys: mx.array, offset: int) -> mx.array:
        B, T, _ = x.shape
        n, P, D = keys.shape[1] // self.kpool, self.kpool, self.head_dim
        packed = keys.astype(mx.float32).reshape(B, n, P, 2 * D)
        k, logits = packed[..., :D], packed[..., D:] + self.index_kpool_compress_ape.astype(mx.float32)
        pooled = (mx.softmax(logits, axis=2) * k).sum(axis=2)  # [B, n, D]
        q = self.wq_b(q_in).reshape(B, T, self.n_heads, D).transpose(0, 2, 1, 3).astype(mx.float32)
        s = mx.maximum(q @ pooled[:, None].swapaxes(-1, -2) * D**-0.5, 0)  # [B, H, T, n]
        w = self.weights_proj(x).astype(mx.float32) * self.n_heads**-0.5  # [B, T, H]
        return (w.transpose(0, 2, 1)[..., None] * s).sum(axis=1)  # [B, T, n]


def pooled_selection(score: mx.array | None, B: int, T: int, P: int, budget: int, tail: bool, mask: Causal) -> Sparse:
    """Each query's positions from scores over pools of ``P`` consecutive keys (``score`` [B, T, n], the n complete
    pools; None where none is selectable): the ``budget // P`` best pools it can see (a pool is selectable once its
    last position is), and with ``tail`` its own incomplete pool. GLM-5.3's pooled DSA and Qwen3.8's QSA."""
    t = mx.arange(mask.offset, mask.offset + T)[:, None]  # each query's position
    never = mask.offset + T + 1  # a position past every key: Sparse drops it
    chosen = []
    if score is not None:
        n = score.shape[-1]
        visible = mx.arange(n)[None] * P + P - 1 <= t
        pools = topk(mx.where(visible, score, -math.inf), min(budget // P, n)).astype(mx.int32)  # [B, T, k_sel]
        ok = mx.take_along_axis(mx.broadcast_to(visible, score.shape), pools, axis=-1)
        pos = pools[..., None] * P + mx.arange(P)  # [B, T, k_sel, P]
        chosen.append(mx.where(ok[..., None], pos, never).reshape(B, T, -1))
    if tail and P > 1:
        count = (t + 1) % P  # the query's own pool, incomplete: its first `count` positions
        j = mx.arange(P - 1)[None]
        chosen.append(mx.broadcast_to(mx.where(j < count, t + 1 - count + j, never), (B, T, P - 1)))
    if not chosen:  # nothing selectable: every key hidden (transformers' all -1 row)
        chosen.append(mx.full((B, T, 1), never, mx.int32))
    return Sparse(mask.offset, mask.window, mask.chunk, mx.concatenate(chosen, axis=-1).astype(mx.int32))


class QSAIndexer(BlockSelect, nn.Module):
    """Qwen3.8-Flash-Next's QSA indexer (transformers' ``Qwen4ExpTextQSAIndexer``): one projection
    ``index_qk_proj`` gives ``n_heads`` query heads and one key head per position; the raw keys of every ``ratio``
    consecutive positions are averaged into a block key, normalised (``k_layernorm``) and roped at the block's first
    position; queries (``q_layernorm``, roped at their own position) score blocks by Σ_h relu(q_h·k) / sqrt(D); each
    query sees the ``budget // ratio`` best complete blocks and its own incomplete one.

    The cache holds the raw keys ([B, 1, S, D]); blocks are rebuilt from them, so a decoding step selects exactly
    what a full pass does. ``rope``: the attention's (partial: its first rotary dims of each index head).
    """

    def __init__(self, *, hidden: int, n_heads: int, head_dim: int, budget: int, ratio: int, rope: nn.Module,
                 eps: float):
        super().__init__()
        self.n_heads, self.head_dim, self.budget, self.pool = n_heads, head_dim, budget, ratio
        self.index_qk_proj = nn.Linear(hidden, (n_heads + 1) * head_dim, bias=False)
        self.q_layernorm = nn.RMSNorm(head_dim, eps=eps)
        self.k_layernorm = nn.RMSNorm(head_dim, eps=eps)
        self._rope = rope

    def keys(self, x: mx.array, offset: int) -> mx.array:
        """x [B, T, hidden] -> the raw index keys [B, 1, T, D], for the cache."""
        return self.index_qk_proj(x)[..., self.n_heads * self.head_dim :][:, None]

    def block_scores(self, x: mx.array, q_in: mx.array, keys: mx.array, offset: int) -> mx.array:
        B, T, _ = x.shape
        P, D = self.pool, self.head_dim
        n = keys.shape[1] // P
        pooled = self.k_layernorm(keys.astype(mx.float32).reshape(B, n, P, D).mean(axis=2).astype(keys.dtype))
        k = self._rope.at(pooled, mx.arange(n) * P).astype(mx.float32)  # [B, n, D], roped at each block's start
        q = self.index_qk_proj(x)[..., : self.n_heads * D].reshape(B, T, self.n_heads, D)
        q = self._rope(self.q_layernorm(q).transpose(0, 2, 1, 3), offset=offset).astype(mx.float32)
        return mx.maximum(q @ k[:, None].swapaxes(-1, -2), 0).sum(axis=1) / math.sqrt(D)  # [B, T, n]


class BlockIndexer(nn.Module):
    """MiniMax-M3's lightning indexer (transformers' ``MiniMaxM3VLIndexer``): selects key *blocks*, one selection per
    indexer head, each serving an equal share of the attention's query heads. Module names are transformers'
    (``self_attn.indexer.q_proj`` ...).

    For query t at position p and indexer head h: score[s] = q_h(t) · k(s) (float32, unscaled, both RMS-normed and
    roped like the attention's first ``rope.dims`` dims) over causal keys s; a block of ``block_size`` positions
    scores its best key; the ``local`` blocks ending at p's own always count (+inf), and the ``topk`` best blocks
    are kept. Blocks lie on absolute positions, so a decoding step selects what a full pass does. The keys [B, 1, S,
    D] live in the layer's cache beside the attention's.
    """

    def __init__(self, *, hidden: int, n_heads: int, head_dim: int, block_size: int, topk: int, local: int,
                 rope: nn.Module, eps: float, attention_heads: int):
        super().__init__()
        self.n_heads, self.head_dim, self.block_size, self.topk, self.local = n_heads, head_dim, block_size, topk, local
        self.attention_heads = attention_heads  # each indexer head's selection serves an equal share of these
        self.q_proj = nn.Linear(hidden, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, head_dim, bias=False)
        self.q_norm, self.k_norm = nn.RMSNorm(head_dim, eps=eps), nn.RMSNorm(head_dim, eps=eps)
        self._rope = rope  # the attention's (model-level) rope module

    def keys(self, x: mx.array, offset: int) -> mx.array:
        """x [B, T, hidden] -> this layer's indexer keys [B, 1, T, D] (one head, roped), for the cache."""
        return self._rope(self.k_norm(self.k_proj(x))[:, None], offset=offset)

    def select(self, x: mx.array, q_in: mx.array, keys: mx.array, mask: Causal) -> BlockSparse:
        """Each query's blocks among ``keys`` [B, 1, S, D] (every cached position), per indexer head, as a
        :class:`BlockSparse` mask over the attention's heads. x [B, T, hidden]: the attention's input (``q_in``,
        the same here: the indexer protocol's query input)."""
        B, T, _ = x.shape
        H, P = self.n_heads, self.block_size
        q = self.q_norm(self.q_proj(x).reshape(B, T, H, self.head_dim)).transpose(0, 2, 1, 3)
        q = self._rope(q, offset=mask.offset).astype(mx.float32)  # [B, H, T, D]
        k = keys.astype(mx.float32).swapaxes(-1, -2)  # [B, 1, D, S]
        S = k.shape[-1]
        n = -(-S // P)  # blocks, the last one possibly incomplete
        block = max(1, min(T, attention.SCORE_BYTES // (4 * B * H * n * P)))  # as attend() blocks
        chosen = []
        for q0 in range(0, T, block):
            q1 = min(T, q0 + block)
            t = mx.arange(mask.offset + q0, mask.offset + q1)[:, None]  # [Tb, 1] positions
            s = mx.where(mx.arange(n * P)[None] <= t, mx.pad(q[:, :, q0:q1] @ k, [(0, 0)] * 3 + [(0, n * P - S)]),
                         -math.inf)  # [B, H, Tb, n·P]: causal keys only
            score = s.reshape(B, H, q1 - q0, n, P).max(axis=-1)  # [B, H, Tb, n]
            if self.local:
                local = mx.maximum(t // P - mx.arange(self.local)[None], 0)  # [Tb, local]
                score = mx.where(marked(local, n), math.inf, score)
            idx = topk(score, min(self.topk, n)).astype(mx.int32)
            idx = mx.where(mx.take_along_axis(score, idx, axis=-1) == -math.inf, -1, idx)
            if block < T:
                mx.eval(idx)
            chosen.append(idx)
        return BlockSparse(mask.offset, mask.window, mask.chunk, mx.concatenate(chosen, axis=2), P, self.attention_heads)
