"""Pieces shared by the model modules: KV cache, masks, attention, dense MLP, routing and streamed experts."""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, fields
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from moepack import arch
from moepack.errors import UnsupportedArchitecture


@dataclass
class BaseArgs:
    @classmethod
    def from_config(cls, cfg: dict) -> "BaseArgs":
        """Build from config.json in either spelling: canonical aliases first, then same-named keys."""
        theta, scaling = arch.rope(cfg)
        known = {f.name for f in fields(cls)}
        vals: dict[str, Any] = {k: v for k, v in cfg.items() if k in known}
        for k in arch.CONFIG_ALIASES:
            if k in known and arch.get(cfg, k) is not None:
                vals[k] = arch.get(cfg, k)
        if "rope_theta" in known and theta is not None:
            vals["rope_theta"] = theta
        if "rope_scaling" in known:
            vals["rope_scaling"] = scaling
        return cls(**vals)


@dataclass(kw_only=True)
class MoEArgs(BaseArgs):
    """Config fields every family here shares; a family's ModelArgs adds its own (and may change defaults)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_experts: int
    top_k: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:  # as transformers: no key means plain multi-head attention
            self.num_key_value_heads = self.num_attention_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


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


def causal_mask(T: int, offset: int, dtype: mx.Dtype = mx.float32, window: int | None = None) -> mx.array | None:
    """Additive mask [T, offset+T]: query i sees keys up to offset+i (and, with a sliding ``window``, only the
    last ``window`` of them, as transformers' ``kv_idx > q_idx - window``)."""
    if T == 1 and (not window or offset < window):
        return None
    q = mx.arange(offset, offset + T)[:, None]
    k = mx.arange(offset + T)[None, :]
    seen = k <= q
    if window:
        seen = seen & (k > q - window)
    return mx.where(seen, mx.array(0, dtype), mx.array(-math.inf, dtype)).astype(dtype)


def attend(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None,
           sinks: mx.array | None = None) -> mx.array:
    """q [B, H, T, D], k/v [B, H_kv, S, D] -> [B, T, H*D_v]. ``sinks`` [H]: a per-head logit that joins the softmax
    and takes probability mass without contributing a value (gpt-oss)."""
    o = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=sinks)
    B, H, T, D = o.shape
    return o.transpose(0, 2, 1, 3).reshape(B, T, H * D)


# ---- rotary embeddings with scaling -----------------------------------------------------------


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1·mscale·ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(inv: np.ndarray, dim: int, theta: float, s: dict, max_pos: int | None) -> tuple[np.ndarray, float]:
    # transformers' _compute_yarn_parameters, step for step
    orig = s.get("original_max_position_embeddings") or max_pos
    factor = s.get("factor") or max_pos / orig
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attention_factor = yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if m and m_all else yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = np.clip((np.arange(dim // 2) - low) / ((high + 0.001 if low == high else high) - low), 0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate (divide by factor)
    return inv / factor * (1 - extrapolate) + inv * extrapolate, float(attention_factor)


# rope_type -> (inverse frequencies, rope dims, theta, scaling dict, max_position_embeddings) -> (inv_freq, cos/sin factor)
ROPE_TYPES = {
    "default": lambda inv, dim, theta, s, max_pos: (inv, 1.0),
    "linear": lambda inv, dim, theta, s, max_pos: (inv / s["factor"], 1.0),
    "yarn": _yarn,
}


def rope_frequencies(dim: int, theta: float, scaling: dict | None,
                     max_position_embeddings: int | None = None) -> tuple[np.ndarray, float]:
    """Inverse frequencies [dim // 2] and cos/sin factor, as transformers' ROPE_INIT_FUNCTIONS compute them.

    ``scaling`` is ``arch.rope(cfg)[1]``: None for plain RoPE, else a dict with ``rope_type``.
    """
    inv = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    kind = (scaling or {}).get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise UnsupportedArchitecture(f"rope_type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    return ROPE_TYPES[kind](inv, dim, theta, scaling, max_position_embeddings)


class ScaledRoPE(nn.Module):
    """RoPE on the first ``dims`` features from explicit inverse frequencies, cos/sin scaled by ``attention_factor``.

    ``traditional``: rotate interleaved pairs (x0, x1), (x2, x3)... instead of the two halves.
    """

    def __init__(self, dims: int, theta: float, scaling: dict | None, max_position_embeddings: int | None = None,
                 traditional: bool = False):
        super().__init__()
        inv, self.attention_factor = rope_frequencies(dims, theta, scaling, max_position_embeddings)
        self.dims, self.traditional = dims, traditional
        self._freqs = mx.array((1.0 / inv).astype(np.float32))  # mx.fast.rope takes wavelengths/2π

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        y = mx.fast.rope(x, self.dims, traditional=self.traditional, base=None, scale=1.0, offset=offset,
                         freqs=self._freqs)
        if self.attention_factor == 1.0:
            return y
        if self.dims == x.shape[-1]:
            return y * self.attention_factor
        return mx.concatenate([y[..., : self.dims] * self.attention_factor, y[..., self.dims :]], axis=-1)


class MLP(nn.Module):
    """SwiGLU feed-forward (dense layers and shared experts)."""

    def __init__(self, hidden: int, width: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=bias)
        self.up_proj = nn.Linear(hidden, width, bias=bias)
        self.down_proj = nn.Linear(width, hidden, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


# ---- routing ---------------------------------------------------------------------------------


def topk(scores: mx.array, k: int) -> mx.array:
    """Indices of the k largest scores along the last axis, largest first (as torch.topk orders them)."""
    return mx.argsort(-scores, axis=-1)[..., :k]


def route_softmax(logits: mx.array, k: int, renormalize: bool) -> tuple[mx.array, mx.array]:
    """Softmax over all experts, then top-k, then optionally renormalise (Mixtral, Qwen, OLMoE)."""
    probs = mx.softmax(logits.astype(mx.float32), axis=-1)
    inds = topk(probs, k)
    w = mx.take_along_axis(probs, inds, axis=-1)
    if renormalize:
        w = w / w.sum(axis=-1, keepdims=True)
    return inds, w


def route_grouped(
    scores: mx.array,
    k: int,
    bias: mx.array | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    group_score: str = "top2",
    renormalize: bool = True,
    scaling: float = 1.0,
) -> tuple[mx.array, mx.array]:
    """Group-limited top-k (DeepSeek, GLM, MiniMax): select on ``scores + bias``, weigh by ``scores``.

    ``group_score``: "top2" sums each group's two best (DeepSeek-V3, GLM), "max" takes its best (DeepSeek-V2).
    """
    choice = scores if bias is None else scores + bias
    if n_group > 1 and topk_group < n_group:
        N, E = choice.shape
        g = choice.reshape(N, n_group, E // n_group)
        if group_score == "top2":
            gs = mx.sort(g, axis=-1)[..., -2:].sum(axis=-1)
        else:
            gs = g.max(axis=-1)
        keep = topk(gs, topk_group)  # [N, topk_group]
        gmask = mx.zeros((N, n_group), dtype=mx.bool_)
        gmask = mx.put_along_axis(gmask, keep, mx.array(True), axis=-1)
        # -inf, as transformers masks: with a correction bias, kept scores can be negative
        choice = mx.where(mx.repeat(gmask, E // n_group, axis=-1), choice, mx.array(-math.inf, choice.dtype))
    inds = topk(choice, k)
    w = mx.take_along_axis(scores, inds, axis=-1)
    if renormalize:
        w = w / (w.sum(axis=-1, keepdims=True) + 1e-20)
    return inds, w * scaling


# ---- routed experts, streamed ----------------------------------------------------------------


_EXTRA_STREAMS: list | None = None


def compute_streams() -> list:
    """Streams for the routed experts: the caller's default stream (None), plus on the CPU one more per core
    (up to 8 in all). Thread-local streams, so a model loaded on one thread can generate on another."""
    global _EXTRA_STREAMS
    if _EXTRA_STREAMS is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n = min(cores, 8) - 1 if mx.default_device() == mx.cpu else 0
        _EXTRA_STREAMS = [mx.new_thread_local_stream(mx.cpu) for _ in range(n)]
    return [None, *_EXTRA_STREAMS]


class StreamedExperts:
    """Computes routed experts of one layer from the store's slot pool.

    Every (token, choice) pair is its own 1-row matmul against its expert's slot, and pairs are combined
    in a fixed order, so results do not depend on how the needed experts were split into pool-sized
    batches: output is the same at any memory budget.
    """

    def __init__(self, store, layer: int, activation=None):
        self.store = store
        self.layer = layer
        self.activation = activation or (lambda g, u: nn.silu(g) * u)
        # Set by the engine: the next MoE layer and its router, to guess that layer's experts from this
        # layer's input and read them while this layer computes (decode only; a wrong guess costs a read,
        # never a different output, since misses are still read exactly).
        self.next_layer: int | None = None
        self.predict = None

    def _project(self, x: mx.array, name: str, slots: mx.array) -> mx.array:
        # x: [P, 1, D_in]; slots: [P] -> [P, 1, D_out], plus the expert's bias [D_out] where the pack has one (gpt-oss)
        rec, parts = self.store.records[name], self.store.pool[name]
        if rec.encoding != "raw":  # affine or mxfp4: MLX quantization modes of the same name
            y = mx.gather_qmm(x, parts["weight"], parts["scales"], parts.get("biases"), rhs_indices=slots,
                              transpose=True, group_size=rec.group_size, bits=rec.bits, mode=rec.encoding)
        else:  # a transposed view of the pool: gather_mm indexes slots in place, no per-pair weight copies
            y = mx.gather_mm(x, parts["data"].swapaxes(-1, -2), rhs_indices=slots)
        bias = self.store.pool.get(name + "_bias")
        return y if bias is None else y + bias["data"][slots][:, None, :]

    def _mlp(self, xs: mx.array, slots: mx.array) -> mx.array:
        """xs [P, 1, H], slots [P] -> [P, 1, H], the pairs split over the CPU compute streams.

        MLX's CPU back end runs each quantized matmul on one thread; giving every core its own stream lets
        the pairs of a layer compute in parallel. Each pair is still its own 1-row matmul, so the result is
        the same whatever the split.
        """
        streams = compute_streams()
        P = xs.shape[0]
        n = min(len(streams), P)
        outs = []
        for i in range(n):
            a, b = i * P // n, (i + 1) * P // n
            with mx.stream(streams[i]) if streams[i] is not None else contextlib.nullcontext():
                x, s = xs[a:b], slots[a:b]
                h = self.activation(self._project(x, "gate", s), self._project(x, "up", s))
                outs.append(self._project(h, "down", s))
        return mx.concatenate(outs, axis=0) if n > 1 else outs[0]

    def __call__(self, x: mx.array, inds: mx.array, weights: mx.array) -> mx.array:
        """x [N, H], inds [N, K] expert ids, weights [N, K] -> [N, H]."""
        N, K = inds.shape
        guess = self.predict(x)[0] if N == 1 and self.predict is not None and self.store.prefetching else None
        mx.eval(inds) if guess is None else mx.eval(inds, guess)
        ids = np.array(inds).reshape(-1)  # host sync: the store must know which experts to read
        order = np.argsort(ids, kind="stable")
        uniq = list(dict.fromkeys(ids[order].tolist()))
        cap = self.store.n_slots
        outs = []
        for start in range(0, len(uniq), cap):
            group = uniq[start : start + cap]
            slots = self.store.fetch(self.layer, group)
            if guess is not None:
                self.store.prefetch(self.next_layer, np.array(guess).reshape(-1).tolist())
            slot_of = dict(zip(group, slots.tolist()))
            sel = order[np.isin(ids[order], group)]  # pair indices served by this batch
            xs = x[mx.array(sel // K)][:, None, :]  # [P, 1, H]
            s = mx.array(np.array([slot_of[i] for i in ids[sel]], dtype=np.uint32))
            y = self._mlp(xs, s)[:, 0, :]  # [P, H]
            if start + cap < len(uniq):
                mx.eval(y)  # the next batch may reuse these slots
            outs.append(y)
        y = mx.concatenate(outs, axis=0) if len(outs) > 1 else outs[0]
        y = y[mx.array(np.argsort(order, kind="stable"))].reshape(N, K, -1)  # back to pair order
        return (y * weights[..., None].astype(y.dtype)).sum(axis=1)


# ---- the common decoder skeleton -------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads and the per-family options as flags.

    qk_norm: None, "head" (RMSNorm over each head's dims: Qwen3, GLM) or "full" (RMSNorm over the whole
    projection before splitting heads: OLMoE, MiniMax-M2). The rope module decides partial rotary.
    clip_qkv: clamp q, k, v to [-clip_qkv, clip_qkv] after the "full" norm, before RoPE (OLMoE).
    sinks: a learned per-head sink logit ``sinks [H]`` in the softmax (gpt-oss).
    output_gate: ``q_proj`` yields [query | gate] per head and the output is scaled by sigmoid(gate) (Qwen3-Next).
    """

    def __init__(self, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int, rope: nn.Module,
                 qkv_bias: bool = False, o_bias: bool = False, qk_norm: str | None = None, eps: float = 1e-6,
                 clip_qkv: float | None = None, sinks: bool = False, output_gate: bool = False):
        super().__init__()
        self.clip_qkv, self.output_gate = clip_qkv, output_gate
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.q_proj = nn.Linear(hidden, n_heads * head_dim * (2 if output_gate else 1), bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=o_bias)
        self.qk_norm = qk_norm
        if qk_norm == "head":
            self.q_norm, self.k_norm = nn.RMSNorm(head_dim, eps=eps), nn.RMSNorm(head_dim, eps=eps)
        elif qk_norm == "full":
            self.q_norm = nn.RMSNorm(n_heads * head_dim, eps=eps)
            self.k_norm = nn.RMSNorm(n_kv_heads * head_dim, eps=eps)
        if sinks:
            self.sinks = mx.zeros((n_heads,))
        self.rope = rope

    def __call__(self, x: mx.array, mask: mx.array | None, cache: KVCache | None) -> mx.array:
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.output_gate:  # [B, T, H * 2D] -> query, gate [B, T, H * D]
            q, gate = mx.split(q.reshape(B, T, self.n_heads, 2 * self.head_dim), 2, axis=-1)
            q, gate = q.reshape(B, T, -1), gate.reshape(B, T, -1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (mx.clip(t, -self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.reshape(B, T, self.n_heads, self.head_dim)  # [B, T, H, D]
        k = k.reshape(B, T, self.n_kv_heads, self.head_dim)
        v = v.reshape(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # [B, H, T, D]
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        o = attend(q, k, v, self.scale, mask, self.get("sinks"))
        return self.o_proj(o * mx.sigmoid(gate) if self.output_gate else o)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); ``mlp`` is a dense MLP or an MoE block.

    ``sliding_window``: this layer attends only to the last that many positions (CausalLM builds its mask).
    ``mixer``: the token mixer's attribute (and checkpoint) name, e.g. "linear_attn" for Qwen3-Next's DeltaNet layers.
    """

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden: int, eps: float, sliding_window: int | None = None,
                 mixer: str = "self_attn"):
        super().__init__()
        self.sliding_window, self.mixer = sliding_window, mixer
        setattr(self, mixer, self_attn)
        self.mlp = mlp
        self.input_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(hidden, eps=eps)

    def __call__(self, x: mx.array, mask: mx.array | None, cache: KVCache | None) -> mx.array:
        h = x + self[self.mixer](self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Body(nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: list[nn.Module], eps: float):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = layers
        self.norm = nn.RMSNorm(hidden, eps=eps)


class CausalLM(nn.Module):
    """HF-named module tree (``model.embed_tokens``, ``model.layers.N...``, ``lm_head``) so pack tensors load by name."""

    def __init__(self, vocab: int, hidden: int, layers: list[nn.Module], eps: float, tie_word_embeddings: bool):
        super().__init__()
        self.model = Body(vocab, hidden, layers, eps)
        self.tie = tie_word_embeddings
        if not tie_word_embeddings:
            self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def __call__(self, tokens: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        """tokens [B, T] -> logits [B, T, vocab]."""
        return self.head(self.run_layers(self.model.embed_tokens(tokens), cache))  # [B, T, H] in between

    def run_layers(self, h: mx.array, cache: list[KVCache] | None = None, layers: range | None = None) -> mx.array:
        """Hidden states [B, T, H] through ``layers`` (default: all), ``cache[j]`` serving the j-th of them.

        A pipeline stage (runtime/distributed.py) runs its own range on activations from the previous stage.
        """
        layers = range(len(self.model.layers)) if layers is None else layers
        offset = cache[0].offset if cache else 0
        masks: dict[int | None, mx.array | None] = {}  # one per distinct sliding window
        for j, i in enumerate(layers):
            layer = self.model.layers[i]
            w = getattr(layer, "sliding_window", None)
            if w not in masks:
                masks[w] = causal_mask(h.shape[1], offset, h.dtype, w)
            h = layer(h, masks[w], cache[j] if cache else None)
        return h

    def head(self, h: mx.array) -> mx.array:
        """Final norm and LM head: [B, T, H] -> logits [B, T, vocab]."""
        h = self.model.norm(h)
        return self.model.embed_tokens.as_linear(h) if self.tie else self.lm_head(h)

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.model.layers]

    # (old, new) substrings renamed in dense tensor names at load, e.g. hub "block_sparse_moe" -> in-model "mlp".
    renames: tuple[tuple[str, str], ...] = ()

    def rename(self, name: str) -> str:
        """A pack tensor name (the checkpoint's own) -> its parameter path in this module tree."""
        for old, new in self.renames:
            name = name.replace(old, new)
        return name

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map the pack's dense tensors onto this module tree (families may also adjust values here)."""
        return {self.rename(k): v for k, v in weights.items()}


class SparseMoE(nn.Module):
    """Router + streamed routed experts (+ optional shared expert), for the softmax-routed families.

    ``shared_gate``: Qwen2-MoE scales the shared expert by sigmoid(shared_expert_gate(x)).
    """

    def __init__(self, hidden: int, n_experts: int, top_k: int, renormalize: bool, experts: StreamedExperts,
                 shared: nn.Module | None = None, shared_gate: bool = False):
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.gate = nn.Linear(hidden, n_experts, bias=False)
        self.experts = experts
        if shared is not None:
            self.shared_expert = shared
            if shared_gate:
                self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)

    def route(self, flat: mx.array) -> tuple[mx.array, mx.array]:
        """[N, H] -> expert ids [N, K] and weights [N, K] (also used to predict this layer's experts early)."""
        return route_softmax(self.gate(flat), self.top_k, self.renormalize)

    def __call__(self, x: mx.array) -> mx.array:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N, H]
        inds, w = self.route(flat)
        y = self.experts(flat, inds, w.astype(flat.dtype))
        if "shared_expert" in self:
            s = self.shared_expert(flat)
            if "shared_expert_gate" in self:
                s = mx.sigmoid(self.shared_expert_gate(flat)) * s
            y = y + s
        return y.reshape(shape)


class Router(nn.Module):
    """Router weight [E, H] (``gate.weight``) and the selection-only ``gate.e_score_correction_bias`` [E].

    Logits are computed in float32, as transformers keeps these weights in float32 for sigmoid routers.
    """

    def __init__(self, hidden: int, n_experts: int, correction_bias: bool = True):
        super().__init__()
        self.weight = mx.zeros((n_experts, hidden))
        if correction_bias:
            self.e_score_correction_bias = mx.zeros((n_experts,))

    def __call__(self, x: mx.array) -> mx.array:
        return x.astype(mx.float32) @ self.weight.astype(mx.float32).T


# Router score functions by name (SigmoidMoE's ``score``).
SCORES = {"sigmoid": mx.sigmoid, "softmax": lambda logits: mx.softmax(logits, axis=-1)}


class SigmoidMoE(nn.Module):
    """Sigmoid-scored, optionally group-limited routing (DeepSeek-V3, GLM-4.5, MiniMax-M2) + ungated shared experts.

    ``score="softmax", group_score="max", correction_bias=False, renormalize=False`` is DeepSeek-V2's router.
    """

    def __init__(self, hidden: int, n_experts: int, top_k: int, experts: StreamedExperts, n_group: int = 1,
                 topk_group: int = 1, renormalize: bool = True, scaling: float = 1.0, correction_bias: bool = True,
                 shared: nn.Module | None = None, score: str = "sigmoid", group_score: str = "top2"):
        super().__init__()
        self.score, self.group_score = SCORES[score], group_score
        self.top_k, self.n_group, self.topk_group = top_k, n_group, topk_group
        self.renormalize, self.scaling = renormalize, scaling
        self.gate = Router(hidden, n_experts, correction_bias)
        self.experts = experts
        if shared is not None:
            self.shared_experts = shared

    def route(self, flat: mx.array) -> tuple[mx.array, mx.array]:
        """[N, H] -> expert ids [N, K] and weights [N, K] (also used to predict this layer's experts early)."""
        scores = self.score(self.gate(flat))  # [N, E] float32
        bias = self.gate.get("e_score_correction_bias")
        return route_grouped(scores, self.top_k, bias, self.n_group, self.topk_group, self.group_score,
                             self.renormalize, self.scaling)

    def __call__(self, x: mx.array) -> mx.array:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N, H]
        inds, w = self.route(flat)
        y = self.experts(flat, inds, w.astype(flat.dtype))
        if "shared_experts" in self:
            y = y + self.shared_experts(flat)
        return y.reshape(shape)
