"""KDA (Kimi Delta Attention), the linear-attention layer of Kimi Linear, GLM-5.3-Flash and Bailing hybrid:
separate q/k/v projections through one causal short conv (kernel 4) + SiLU, L2-normalised q/k, a per-channel
forget gate (``f_b_proj(f_a_proj(x)) + dt_bias``, Bailing's in one projection ``f_proj``), ``beta = sigmoid(b_proj(x))``, the delta rule with that
per-channel decay (delta_rule.py, shared with Qwen3-Next's Gated DeltaNet), then RMSNorm(o)·sigmoid(low-rank gate)
and ``o_proj``. Its cache is a RecurrentCache (the conv's last inputs and the [H, Dk, Dk] state).

Module names are the releases' (``q_conv1d``/``k_conv1d``/``v_conv1d``, ``f_a_proj``, ``dt_bias``, ``A_log`` on the
attention module); transformers' own names (one stacked ``conv1d``, a ``forget_gate`` submodule) load through
``RENAMES`` and ``SPLITS``, which a model using this layer adds to its ``renames``/``splits``.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from moepack.runtime.models.cache import KVCache, RecurrentCache
from moepack.runtime.models.delta_rule import (
    GatedRMSNorm,
    delta_rule,
    l2norm,
    short_conv,
)

RENAMES = ((".forget_gate.", "."),)
# a release's ``linear_attn_config`` keys -> transformers' config keys
LINEAR_KEYS = {"head_dim": "linear_head_dim", "num_heads": "linear_num_heads",
               "short_conv_kernel_size": "linear_conv_kernel_dim", "gate_lower_bound": "linear_lower_bound"}
SPLITS = (("conv1d", ("q_conv1d", "k_conv1d", "v_conv1d")),)


class KimiDeltaAttention(nn.Module):
    """``lower_bound``: GLM-5.3's and Bailing's bounded forget gate, log-decay = lower_bound·sigmoid(e^A·g); None:
    Kimi's −e^A·softplus(g). ``low_rank``: the forget and output gates project through ``head_dim``
    (``f_a_proj``/``f_b_proj``, ``g_a_proj``/``g_b_proj``); else in one step (Bailing: ``f_proj``, ``g_proj``)."""

    def __init__(self, hidden: int, n_heads: int, head_dim: int, conv_kernel: int, eps: float,
                 lower_bound: float | None = None, low_rank: bool = True):
        super().__init__()
        self.n_heads, self.head_dim, self.lower_bound = n_heads, head_dim, lower_bound
        D = n_heads * head_dim
        for name in ("q", "k", "v"):
            setattr(self, f"{name}_proj", nn.Linear(hidden, D, bias=False))
            setattr(self, f"{name}_conv1d", nn.Conv1d(D, D, conv_kernel, groups=D, bias=False))
        for gate in ("f", "g"):
            if low_rank:
                setattr(self, f"{gate}_a_proj", nn.Linear(hidden, head_dim, bias=False))
                setattr(self, f"{gate}_b_proj", nn.Linear(head_dim, D, bias=False))
            else:
                setattr(self, f"{gate}_proj", nn.Linear(hidden, D, bias=False))
        self.dt_bias = mx.zeros((D,))
        self.A_log = mx.zeros((n_heads,))  # Kimi's release stores [1, 1, H, 1]: reshaped in __call__
        self.b_proj = nn.Linear(hidden, n_heads, bias=False)
        self.o_norm = GatedRMSNorm(head_dim, eps, activation="sigmoid")
        self.o_proj = nn.Linear(D, hidden, bias=False)

    def _gate_proj(self, gate: str, x: mx.array) -> mx.array:
        """The forget ("f") or output ("g") gate's projection of x [B, T, hidden] -> [B, T, H·Dk]."""
        if f"{gate}_proj" in self:
            return self[f"{gate}_proj"](x)
        return self[f"{gate}_b_proj"](self[f"{gate}_a_proj"](x))

    def forget_gate(self, x: mx.array) -> mx.array:
        """x [B, T, hidden] -> per-channel log decay g [B, T, H, Dk] (float32, ≤ 0)."""
        B, T, _ = x.shape
        g = self._gate_proj("f", x).astype(mx.float32) + self.dt_bias.astype(mx.float32)
        g = g.reshape(B, T, self.n_heads, self.head_dim)
        rate = mx.exp(self.A_log.astype(mx.float32).reshape(self.n_heads, 1))
        if self.lower_bound is not None:
            return self.lower_bound * mx.sigmoid(rate * g)
        return -rate * nn.softplus(g)

    def __call__(self, x: mx.array, mask, cache: RecurrentCache | None) -> mx.array:
        B, T, _ = x.shape
        H, Dk = self.n_heads, self.head_dim
        qkv = mx.concatenate([self.q_proj(x), self.k_proj(x), self.v_proj(x)], axis=-1)
        weight = mx.concatenate([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight], axis=0)
        q, k, v = mx.split(short_conv(qkv, weight, cache).astype(mx.float32).reshape(B, T, 3, H, Dk), 3, axis=2)
        q, k, v = l2norm(q[:, :, 0]) * Dk**-0.5, l2norm(k[:, :, 0]), v[:, :, 0]  # [B, T, H, Dk]
        beta = mx.sigmoid(self.b_proj(x).astype(mx.float32))  # [B, T, H]
        o = delta_rule(*(t.swapaxes(1, 2) for t in (q, k, v, self.forget_gate(x), beta)), cache)  # heads first
        o = o.swapaxes(1, 2).astype(x.dtype)  # [B, T, H, Dv]
        gate = self._gate_proj("g", x).reshape(B, T, H, Dk)
        return self.o_proj(self.o_norm(o, gate).reshape(B, T, -1))


def linear_config(cfg: dict) -> dict:
    """``cfg`` with a release's ``linear_attn_config`` read into transformers' keys (``linear_head_dim``, ...)."""
    linear = cfg.get("linear_attn_config") or {}
    return {**cfg, **{new: linear[old] for old, new in LINEAR_KEYS.items() if old in linear}}


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """The convs' checkpoint weight [C, 1, K] -> MLX's [C, K, 1]; Kimi's A_log [1, 1, H, 1] -> [H]."""
    out = {}
    for k, v in weights.items():
        if k.endswith("conv1d.weight") and v.ndim == 3:
            v = v.swapaxes(1, 2)
        elif k.endswith(".A_log") and v.ndim == 4:
            v = v.reshape(-1)
        out[k] = v
    return out


class HybridLM:
    """Mixin for a CausalLM whose ``layer_types`` mark its KDA layers ("linear_attention"; the others attend): their
    caches are recurrent states, and the KDA tensors load as ``sanitize`` above says."""

    layer_types: list[str]
    renames = RENAMES
    splits = SPLITS

    def make_cache(self) -> list:
        return [RecurrentCache() if t == "linear_attention" else KVCache() for t in self.layer_types]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        return sanitize(super().sanitize(weights))
