"""The delta rule shared by the linear-attention layers (Qwen3-Next's Gated DeltaNet, the KDA layers of Kimi
Linear, GLM-5.3-Flash and Bailing hybrid): a causal depthwise short conv over the projected inputs, L2-normalised
q/k, the gated delta-rule recurrence and a gated RMSNorm on its output.

The recurrence ``S ← S·diag(e^g) + k ⊗ beta(v − Sᵀk)``, ``o = Sᵀq``: Gated DeltaNet decays the whole state by one
scalar per head (``g`` [..., 1]), KDA decays each key channel by its own gate (``g`` [..., Dk]); both run here, the
per-head gate broadcast as a channel axis of 1. Prefill runs it chunkwise (the UT transform, as transformers'
``torch_chunk_gated_delta_rule`` / ``chunk_kimi_delta_attention``), decoding one token at a time.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from moepack.runtime.models.cache import RecurrentCache

CHUNK = 64  # the delta rule's chunk length in prefill
GATES = {"silu": nn.silu, "sigmoid": mx.sigmoid}


class GatedRMSNorm(nn.Module):
    """RMSNorm(x)·w·act(gate) over the last axis (plain weight, not zero-centred); act: Gated DeltaNet silu, KDA
    sigmoid."""

    def __init__(self, dims: int, eps: float, activation: str = "silu"):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps
        self.activation = activation

    def __call__(self, x: mx.array, gate: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps) * GATES[self.activation](gate)


def l2norm(x: mx.array, eps: float = 1e-6) -> mx.array:
    return x * mx.rsqrt((x * x).sum(axis=-1, keepdims=True) + eps)


def short_conv(x: mx.array, weight: mx.array, cache: RecurrentCache | None, dilation: int = 1,
               aux: str | None = None) -> mx.array:
    """silu(causal depthwise conv(x)), continuing from the cache's last ``(K - 1)·dilation`` inputs (which it then
    updates): ``cache.conv``, or ``cache.aux[aux]`` for a second conv of the layer (Qwen3.8's PLE, dilated).

    x [B, T, C]; weight [C, K, 1] (MLX's layout of the checkpoint's [C, 1, K]) -> [B, T, C].
    """
    B, _, C = x.shape
    keep = (weight.shape[1] - 1) * dilation
    held = None if cache is None else cache.aux.get(aux) if aux else cache.conv
    past = held if held is not None else mx.zeros((B, keep, C), x.dtype)
    xp = mx.concatenate([past, x], axis=1)  # [B, keep+T, C]
    if cache is not None:
        if aux:
            cache.aux[aux] = xp[:, -keep:]
        else:
            cache.conv = xp[:, -keep:]
    return nn.silu(mx.conv1d(xp, weight, dilation=dilation, groups=C))


def _channel_gate(g: mx.array, per_head_ndim: int) -> mx.array:
    """A per-head gate gets a channel axis of 1, so one formula serves both gate kinds."""
    return g[..., None] if g.ndim == per_head_ndim else g


def delta_rule_step(q, k, v, g, beta, state):
    """One token. q, k [B, H, Dk]; v [B, H, Dv]; g [B, H] or [B, H, Dk]; beta [B, H]; state [B, H, Dk, Dv]
    -> o [B, H, Dv], state."""
    state = state * mx.exp(_channel_gate(g, 2))[..., None]
    kv = (state * k[..., None]).sum(axis=-2)  # [B, H, Dv]: what the state predicts for k
    state = state + k[..., None] * ((v - kv) * beta[..., None])[..., None, :]
    return (state * q[..., None]).sum(axis=-2), state


def _decayed_products(a: mx.array, b: mx.array, cum: mx.array, causal: mx.array) -> mx.array:
    """[..., i, j] = Σ_d a_i[d]·b_j[d]·exp(cum_i[d] − cum_j[d]) for j ≤ i, else 0; cum [..., C, 1 or Dk].

    A per-head gate factors out of the sum (one matmul); a per-channel one is summed explicitly, as transformers
    does, since exp(cum_i)·exp(−cum_j) apart would overflow over a chunk of strong decay.
    """
    if cum.shape[-1] == 1:
        c = cum[..., 0]
        decay = mx.where(causal, mx.exp(mx.where(causal, c[..., :, None] - c[..., None, :], 0)), 0)
        return a @ b.swapaxes(-1, -2) * decay
    diff = cum[..., :, None, :] - cum[..., None, :, :]  # [..., C, C, Dk]
    decay = mx.exp(mx.where(causal[..., None], diff, -mx.inf))
    return (a[..., :, None, :] * b[..., None, :, :] * decay).sum(axis=-1)


def delta_rule_chunked(q, k, v, g, beta, state, C: int = CHUNK):
    """A whole sequence, chunk by chunk. q, k [B, H, T, Dk]; v [B, H, T, Dv]; g [B, H, T] or [B, H, T, Dk];
    beta [B, H, T] -> [B, H, T, Dv], state.

    Inside a chunk the sequential updates collapse to a unit lower-triangular system (the UT transform); the
    state carries across chunks.
    """
    B, H, T, _ = k.shape
    g = _channel_gate(g, 3)  # [B, H, T, 1 or Dk]
    pad = -T % C
    if pad:
        q, k, v, g = (mx.pad(t, [(0, 0), (0, 0), (0, pad), (0, 0)]) for t in (q, k, v, g))
        beta = mx.pad(beta, [(0, 0), (0, 0), (0, pad)])
    N = (T + pad) // C
    kb, vb = k * beta[..., None], v * beta[..., None]
    q, k, kb, vb, g = (t.reshape(B, H, N, C, -1) for t in (q, k, kb, vb, g))  # [B, H, N, C, D]
    cum = mx.cumsum(g, axis=-2)  # log decay from the chunk's start to each position
    causal = mx.tril(mx.ones((C, C), dtype=mx.bool_))
    ut = mx.tril(_decayed_products(kb, k, cum, causal), -1) + mx.eye(C)  # [B, H, N, C, C], unit lower triangular
    ut_vk = mx.concatenate([vb, kb * mx.exp(cum)], axis=-1)
    ut_vk = mx.linalg.solve_triangular(ut, ut_vk, upper=False, stream=mx.cpu)  # MLX solves on the CPU only
    u, w = ut_vk[..., : vb.shape[-1]], ut_vk[..., vb.shape[-1] :]  # new values, decayed keys reading the old state
    attn = _decayed_products(q, k, cum, causal)  # within-chunk attention
    q_dec = q * mx.exp(cum)
    k_dec = k * mx.exp(cum[..., -1:, :] - cum)
    last = mx.exp(cum[..., -1, :])  # [B, H, N, 1 or Dk]: a whole chunk's decay
    outs = []
    for n in range(N):
        v_new = u[:, :, n] - w[:, :, n] @ state  # [B, H, C, Dv]
        outs.append(q_dec[:, :, n] @ state + attn[:, :, n] @ v_new)
        state = state * last[:, :, n, :, None] + k_dec[:, :, n].swapaxes(-1, -2) @ v_new
    return mx.concatenate(outs, axis=2)[:, :, :T], state


def delta_rule(q, k, v, g, beta, cache: RecurrentCache | None):
    """The recurrence over a block, from and into the cache's state: heads-first q, k, v, g, beta as above."""
    B, H, T, Dk = k.shape
    state = cache.state if cache is not None and cache.state is not None else \
        mx.zeros((B, H, Dk, v.shape[-1]), mx.float32)
    if T == 1:
        o, state = delta_rule_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], g[:, :, 0], beta[:, :, 0], state)
        o = o[:, :, None]
    else:
        o, state = delta_rule_chunked(q, k, v, g, beta, state)
    if cache is not None:
        cache.state = state
        cache.advanced(T)
    return o
