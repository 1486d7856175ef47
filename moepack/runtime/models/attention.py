"""Scaled dot-product attention over query blocks, and the grouped-query attention layer most families share.

Family quirks live in the family's file as small subclasses that override one hook: ``project`` (what q, k, v
are made of: OLMoE's clipping, Qwen3-Next's output gate), ``attend`` (gpt-oss's sinks) or ``output``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from moepack.runtime.models.cache import Causal, KVCache

# Attention scores held at once (float32 [B, H, queries, keys]): a long prompt attends one block of queries at a
# time, so its memory stays bounded whatever its length (README: "Memory").
SCORE_BYTES = 64 << 20

# On MLX's CPU back end (reference BLAS), blocks of at least this many queries attend with numpy's BLAS instead:
# 32 heads x 512 queries x 1,500 keys x 128 dims took 3.7 s in mx.fast.scaled_dot_product_attention here and
# ~0.1 s as two batched sgemms. Decode (one query) stays in MLX.
CPU_BLAS_MIN_QUERIES = 8


def _attend_blas(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None,
                 sinks: mx.array | None) -> mx.array:
    """softmax(q kᵀ·scale + mask [, sinks]) v with numpy's BLAS in float32: q [B, H, T, D], k/v [B, H_kv, S, D]."""
    B, H, T, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = H // Hkv  # query heads per key head
    f32 = [t.astype(mx.float32) for t in (q, k, v)] + ([mask.astype(mx.float32)] if mask is not None else [])
    mx.eval(*f32, *(() if sinks is None else (sinks,)))
    qn, kn, vn = (np.asarray(t) for t in f32[:3])
    s = np.matmul(qn.reshape(B, Hkv, G * T, D), kn.swapaxes(-1, -2)).reshape(B, Hkv, G, T, S)  # scores
    s *= scale
    if mask is not None:  # [T, S], or [B, 1 | H, T, S] (a sparse-attention selection per sequence, or per head)
        m = np.asarray(f32[3])
        s += (m.reshape(B, Hkv, G, *m.shape[2:]) if m.shape[1] == H else m[:, :, None]) if m.ndim == 4 else m
    m = s.max(axis=-1, keepdims=True)
    if sinks is not None:  # a per-head logit in the softmax that contributes no value
        sk = np.asarray(sinks.astype(mx.float32)).reshape(1, Hkv, G, 1, 1)
        m = np.maximum(m, sk)
    s -= m
    np.exp(s, out=s)
    denom = s.sum(axis=-1, keepdims=True)
    if sinks is not None:
        denom += np.exp(sk - m)
    o = np.matmul(s.reshape(B, Hkv, G * T, S), vn).reshape(B, Hkv, G, T, Dv) / denom
    return mx.array(o.reshape(B, H, T, Dv)).astype(q.dtype)


def attend(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Causal | None,
           sinks: mx.array | None = None, merge_heads: bool = True) -> mx.array:
    """q [B, H, T, D], k/v [B, H_kv, S, D] -> [B, T, H*D_v] (or [B, H, T, D_v] without ``merge_heads``).

    Queries go in blocks sized so their scores fit in SCORE_BYTES; each block attends only to the keys its mask
    lets it see (a causal block skips the keys after it, a sliding window those before it). ``sinks`` [H]: a
    per-head logit that joins the softmax and takes probability mass without contributing a value (gpt-oss).
    """
    B, H, T, _ = q.shape
    S = k.shape[2]
    block = max(1, min(T, SCORE_BYTES // (4 * B * H * S)))
    blas = mx.default_device() == mx.cpu and T >= CPU_BLAS_MIN_QUERIES
    outs = []
    for q0 in range(0, T, block):
        q1 = min(T, q0 + block)
        lo, hi = mask.keys(q0, q1) if mask is not None else (0, S)
        m = mask.block(q0, q1, q.dtype) if mask is not None else None
        qb, kb, vb = q[:, :, q0:q1], k[:, :, lo:hi], v[:, :, lo:hi]
        if blas:
            o = _attend_blas(qb, kb, vb, scale, m, sinks)
        else:
            o = mx.fast.scaled_dot_product_attention(qb, kb, vb, scale=scale, mask=m, sinks=sinks)
        if block < T:
            mx.eval(o)  # one block's scores at a time
        outs.append(o)
    o = mx.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]  # [B, H, T, D_v]
    if not merge_heads:
        return o
    return o.transpose(0, 2, 1, 3).reshape(B, T, -1)


def query_temperature(offset: int, T: int, beta: float, period: float, shift: int = 0) -> mx.array:
    """Per-position query scale ``1 + beta * ln(1 + floor((pos + shift) / period))`` [T, 1] for T positions after
    ``offset``, so attention sharpens with distance from the start. Llama 4's temperature tuning on its NoPE layers:
    ``beta=attn_scale, period=floor_scale, shift=1``; Mistral 4's ``llama_4_scaling_beta``: ``period`` the original
    context, ``shift=0``."""
    pos = mx.arange(offset + shift, offset + shift + T).astype(mx.float32)
    return (1 + beta * mx.log1p(mx.floor(pos / period)))[:, None]


GATE_ACTIVATIONS = {"sigmoid": mx.sigmoid, "softplus": nn.softplus}


@dataclass(frozen=True)
class OutputGate:
    """The attention output times act(W x) before ``o_proj``, from the layer's own projection ``name`` of the
    layer input: one gate per head (broadcast over its dims) or one per element.
    AFMoE: ``gate_proj``, sigmoid, per element; Laguna: ``g_proj``, softplus, per head (or per element)."""

    name: str
    act: str = "sigmoid"
    per_head: bool = False

    def __call__(self, o: mx.array, pre: mx.array, head_dim: int) -> mx.array:
        """o [B, T, H * D] times act(pre), ``pre`` the gate projection's output ([B, T, H] or [B, T, H * D])."""
        g = GATE_ACTIVATIONS[self.act](pre)
        if self.per_head:
            g = mx.repeat(g, head_dim, axis=-1)  # each head's gate over its dims
        return o * g


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads.

    qk_norm: None, "head" (RMSNorm over each head's dims: Qwen3, GLM), "unit" (the same without a weight: Llama 4's
    L2 norm; RoPE preserves each head's norm, so normalising before it equals transformers' after) or "full" (RMSNorm
    over the whole projection before splitting heads: OLMoE, MiniMax-M2). The rope module decides partial rotary;
    ``rope=None`` is a NoPE layer. ``temperature``: (beta, period, shift) of :func:`query_temperature`, scaling queries
    by position (Llama 4's NoPE layers). ``gate``: an output gate (see ``OutputGate``; AFMoE, Laguna).
    ``indexer`` (or a subclass setting it): a sparse-attention indexer (dsa.py's protocol: ``keys``, ``select``)
    whose keys the cache keeps beside k and v; each query then sees only the keys it selects (``dsa.BlockIndexer``:
    MiniMax-M3; ``dsa.QSAIndexer``: Qwen3.8-Flash-Next).
    ``k_eq_v``: no ``v_proj``, the key projection serves as the values too (before the keys' norm and RoPE: Gemma 4's
    global layers); ``v_norm``: values RMS-normalised over each head's dims, without a weight (Gemma 4).
    """

    def __init__(self, *, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int, rope: nn.Module | None,
                 qkv_bias: bool = False, o_bias: bool = False, qk_norm: str | None = None, eps: float = 1e-6,
                 gate: OutputGate | None = None, temperature: tuple[float, float, int] | None = None,
                 scale: float | None = None, indexer: nn.Module | None = None, k_eq_v: bool = False,
                 v_norm: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.scale = scale or head_dim**-0.5  # Step 3.7: query_pre_attn_scalar^-0.5; Gemma 4: 1
        self.eps, self.temperature, self.k_eq_v, self.v_norm = eps, temperature, k_eq_v, v_norm
        self.q_proj = nn.Linear(hidden, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, n_kv_heads * head_dim, bias=qkv_bias)
        if not k_eq_v:
            self.v_proj = nn.Linear(hidden, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=o_bias)
        self.qk_norm = qk_norm
        if qk_norm == "head":
            self.q_norm, self.k_norm = nn.RMSNorm(head_dim, eps=eps), nn.RMSNorm(head_dim, eps=eps)
        elif qk_norm == "full":
            self.q_norm = nn.RMSNorm(n_heads * head_dim, eps=eps)
            self.k_norm = nn.RMSNorm(n_kv_heads * head_dim, eps=eps)
        self.rope = rope
        self.gate = gate
        self.indexer = indexer
        if gate is not None:
            setattr(self, gate.name, nn.Linear(hidden, n_heads * (1 if gate.per_head else head_dim), bias=False))

    @classmethod
    def for_args(cls, a: Any, rope: nn.Module | None, **kw: Any) -> "Attention":
        """From a family's ``MoEArgs``: its head counts and head size; ``kw`` the family's options (and overrides,
        e.g. a layer's own ``n_heads``)."""
        base = dict(hidden=a.hidden_size, n_heads=a.num_attention_heads, n_kv_heads=a.num_key_value_heads,
                    head_dim=a.head_size, rope=rope, eps=a.rms_norm_eps)
        return cls(**{**base, **kw})

    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array, Any]:
        """x [B, T, hidden] -> q, k, v [B, T, heads * D] and whatever ``output`` needs besides the attention
        (the output gate's pre-activation, where there is one)."""
        q, k = self.q_proj(x), self.k_proj(x)
        v = k if self.k_eq_v else self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v, (self[self.gate.name](x) if self.gate is not None else None)

    def attend(self, q: mx.array, k: mx.array, v: mx.array, mask: Causal | None) -> mx.array:
        return attend(q, k, v, self.scale, mask)

    def output(self, o: mx.array, extra: Any) -> mx.array:
        """o [B, T, H * D] (and ``project``'s extra) -> [B, T, hidden]."""
        if self.gate is not None:
            o = self.gate(o, extra, self.head_dim)
        return self.o_proj(o)

    def __call__(self, x: mx.array, mask: Causal | None, cache: KVCache | None) -> mx.array:
        B, T, _ = x.shape
        q, k, v, extra = self.project(x)
        q = q.reshape(B, T, self.n_heads, self.head_dim)  # [B, T, H, D]
        k = k.reshape(B, T, self.n_kv_heads, self.head_dim)
        v = v.reshape(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        elif self.qk_norm == "unit":
            q, k = mx.fast.rms_norm(q, None, self.eps), mx.fast.rms_norm(k, None, self.eps)
        if self.v_norm:
            v = mx.fast.rms_norm(v, None, self.eps)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # [B, H, T, D]
        offset = cache.offset if cache is not None else 0
        if self.rope is not None:
            q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if self.temperature is not None:
            q = q * query_temperature(offset, T, *self.temperature).astype(q.dtype)
        indexer = self.get("indexer")  # a sparse-attention indexer (dsa.py): its keys live in the cache beside these
        side = (indexer.keys(x, offset),) if indexer is not None else ()
        if cache is not None:
            k, v, *side = cache.update_and_fetch(k, v, *side)
        if indexer is not None:
            mask = indexer.select(x, x, side[0], mask or Causal(offset))
        return self.output(self.attend(q, k, v, mask), extra)
