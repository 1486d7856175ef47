"""Qwen3-Next and Qwen3.5-MoE: hybrid layers, mostly Gated DeltaNet (linear attention with a recurrent state) and
every ``full_attention_interval``-th one gated full attention; softmax top-k routing (renormalised) plus a shared
expert scaled by sigmoid(shared_expert_gate(x)).

- Gated full attention: ``q_proj`` yields [query | gate] per head, per-head q/k RMSNorm, partial rotary
  (rotate-half on the first quarter of each head by default), output × sigmoid(gate).
- Gated DeltaNet (``linear_attn``): causal depthwise conv (kernel 4) + SiLU over [q | k | v], L2-normalised q/k,
  decay ``g = -exp(A_log)·softplus(a + dt_bias)``, ``beta = sigmoid(b)``, the delta rule
  ``S ← S·e^g + k ⊗ beta(v − Sᵀk)``, ``o = Sᵀq / sqrt(d_k)``, then RMSNorm(o)·silu(z). Prefill runs it chunkwise
  (the UT transform, as transformers' ``torch_chunk_gated_delta_rule``), decoding one token at a time.
- Norms are zero-centred (``x̂·(1 + w)``) except the DeltaNet's output norm: ``zero_centred`` adds the 1 at load
  (exact in float32; in bf16 compute 1 + w is rounded to bf16, where transformers keeps it float32).

Qwen3-Next fuses the DeltaNet input projections per key head (``in_proj_qkvz``: [q, k, v, z] groups;
``in_proj_ba``); Qwen3.5 keeps them apart (``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a``) and its
multimodal checkpoints nest the text model under ``model.language_model`` (the converter renames it and drops the
vision tower and the multi-token-prediction head). Qwen3.5's multimodal RoPE sections coincide for text, so plain RoPE is exact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from moepack import arch
from moepack.runtime.models.attention import Attention
from moepack.runtime.models.base import MLP, CausalLM, DecoderLayer, MoEArgs
from moepack.runtime.models.cache import KVCache, RecurrentCache
from moepack.runtime.models.delta_rule import GatedRMSNorm, delta_rule, l2norm, short_conv
from moepack.runtime.models.moe import MoE, SoftmaxRouter, StreamedExperts
from moepack.runtime.models.rope import ScaledRoPE

ZERO_CENTRED = re.compile(r"(input_layernorm|post_attention_layernorm|q_norm|k_norm)\.weight$|^model\.norm\.weight$")


@dataclass(kw_only=True)
class ModelArgs(MoEArgs):
    moe_intermediate_size: int
    model_type: str = "qwen3_next"
    intermediate_size: int = 0  # dense layers (mlp_only_layers); Qwen3.5-MoE has none
    shared_expert_intermediate_size: int = 0
    head_dim: int = 256  # transformers' default, not hidden_size // heads
    norm_topk_prob: bool = True
    attention_bias: bool = False
    layer_types: list[str] | None = None
    full_attention_interval: int = 4
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    mlp_only_layers: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer_types is None:  # hub configs spell the pattern as an interval
            n = self.full_attention_interval
            self.layer_types = ["full_attention" if (i + 1) % n == 0 else "linear_attention"
                                for i in range(self.num_hidden_layers)]


class GatedAttention(Attention):
    """``q_proj`` yields [query | gate] per head; the attention output is scaled by sigmoid(gate) before ``o_proj``."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.q_proj = nn.Linear(self.k_proj.weight.shape[1], 2 * self.n_heads * self.head_dim,
                                bias="bias" in self.k_proj)

    def project(self, x: mx.array):
        B, T, _ = x.shape  # [B, T, H * 2D] -> query, gate [B, T, H * D]
        q, gate = mx.split(self.q_proj(x).reshape(B, T, self.n_heads, 2 * self.head_dim), 2, axis=-1)
        return q.reshape(B, T, -1), self.k_proj(x), self.v_proj(x), gate.reshape(B, T, -1)

    def output(self, o: mx.array, gate: mx.array) -> mx.array:
        return self.o_proj(o * mx.sigmoid(gate))


class GatedDeltaNet(nn.Module):
    """``activation``: the output gate's (silu; Qwen3.8-Flash-Next's ``output_gate_type`` may say sigmoid)."""

    def __init__(self, a: ModelArgs, split: bool, activation: str = "silu"):
        super().__init__()
        H = a.hidden_size
        self.nk, self.nv = a.linear_num_key_heads, a.linear_num_value_heads
        self.dk, self.dv = a.linear_key_head_dim, a.linear_value_head_dim
        self.key_dim, self.value_dim = self.nk * self.dk, self.nv * self.dv
        conv_dim = 2 * self.key_dim + self.value_dim
        if split:  # Qwen3.5
            self.in_proj_qkv = nn.Linear(H, conv_dim, bias=False)
            self.in_proj_z = nn.Linear(H, self.value_dim, bias=False)
            self.in_proj_b = nn.Linear(H, self.nv, bias=False)
            self.in_proj_a = nn.Linear(H, self.nv, bias=False)
        else:  # Qwen3-Next
            self.in_proj_qkvz = nn.Linear(H, conv_dim + self.value_dim, bias=False)
            self.in_proj_ba = nn.Linear(H, 2 * self.nv, bias=False)
        # causal depthwise conv, no bias: the checkpoint's weight [C, 1, K] is MLX's [C, K, 1] (sanitize)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, a.linear_conv_kernel_dim, groups=conv_dim, bias=False)
        self.dt_bias = mx.ones((self.nv,))
        self.A_log = mx.zeros((self.nv,))
        self.norm = GatedRMSNorm(self.dv, a.rms_norm_eps, activation)
        self.out_proj = nn.Linear(self.value_dim, H, bias=False)

    def _project(self, x: mx.array) -> tuple[mx.array, ...]:
        """x [B, T, H] -> qkv [B, T, 2·key_dim + value_dim], z [B, T, Hv, Dv], b and a [B, T, Hv]."""
        B, T, _ = x.shape
        if "in_proj_qkv" in self:
            z = self.in_proj_z(x).reshape(B, T, self.nv, self.dv)
            return self.in_proj_qkv(x), z, self.in_proj_b(x), self.in_proj_a(x)
        # per key head: [q (Dk), k (Dk), v (r·Dv), z (r·Dv)] and [b (r), a (r)], r value heads per key head
        r = self.nv // self.nk
        qkvz = self.in_proj_qkvz(x).reshape(B, T, self.nk, -1)
        q, k, v, z = mx.split(qkvz, [self.dk, 2 * self.dk, 2 * self.dk + r * self.dv], axis=-1)
        b, a = mx.split(self.in_proj_ba(x).reshape(B, T, self.nk, 2 * r), 2, axis=-1)
        qkv = mx.concatenate([t.reshape(B, T, -1) for t in (q, k, v)], axis=-1)
        return qkv, z.reshape(B, T, self.nv, self.dv), b.reshape(B, T, self.nv), a.reshape(B, T, self.nv)

    def __call__(self, x: mx.array, mask, cache: RecurrentCache | None) -> mx.array:
        B, T, _ = x.shape
        qkv, z, b, a = self._project(x)
        qkv = short_conv(qkv, self.conv1d.weight, cache)
        q, k, v = mx.split(qkv, [self.key_dim, 2 * self.key_dim], axis=-1)
        q = l2norm(q.reshape(B, T, self.nk, self.dk).astype(mx.float32)) * self.dk**-0.5
        k = l2norm(k.reshape(B, T, self.nk, self.dk).astype(mx.float32))
        v = v.reshape(B, T, self.nv, self.dv).astype(mx.float32)
        r = self.nv // self.nk  # each key head serves r consecutive value heads
        q, k = mx.repeat(q, r, axis=2), mx.repeat(k, r, axis=2)
        beta = mx.sigmoid(b.astype(mx.float32))  # [B, T, Hv]
        g = -mx.exp(self.A_log.astype(mx.float32)) * nn.softplus(a.astype(mx.float32) + self.dt_bias.astype(mx.float32))
        o = delta_rule(*(t.swapaxes(1, 2) for t in (q, k, v, g, beta)), cache)  # heads before time
        o = o.swapaxes(1, 2).astype(x.dtype)  # [B, T, Hv, Dv]
        return self.out_proj(self.norm(o, z).reshape(B, T, -1))


class Model(CausalLM):
    def __init__(self, cfg: dict, store):
        cfg = arch.text_config(cfg)
        a = ModelArgs.from_config(cfg)
        qwen3_5 = a.model_type.startswith("qwen3_5")
        rope = ScaledRoPE(arch.rotary_dim(cfg, a.head_size, default_factor=0.25), a.rope_theta, a.rope_scaling,
                          a.max_position_embeddings)
        moe = set(arch.moe_layers(cfg))
        layers = []
        for i in range(a.num_hidden_layers):
            if a.layer_types[i] == "linear_attention":
                mixer, name = GatedDeltaNet(a, split=qwen3_5), "linear_attn"
            else:
                mixer = GatedAttention.for_args(a, rope, qkv_bias=a.attention_bias, qk_norm="head")
                name = "self_attn"
            if i in moe:
                router = SoftmaxRouter(a.hidden_size, a.num_experts, a.top_k, renormalize=a.norm_topk_prob or qwen3_5)
                mlp = MoE(router, StreamedExperts(store, i), shared=MLP(a.hidden_size, a.shared_expert_intermediate_size),
                          shared_gate=True)
            else:
                mlp = MLP(a.hidden_size, a.intermediate_size)
            layers.append(DecoderLayer(mixer, mlp, a, mixer_name=name))
        super().__init__(a, layers)

    def make_cache(self) -> list:
        return [RecurrentCache() if layer.mixer == "linear_attn" else KVCache() for layer in self.model.layers]

    zero_centred = ZERO_CENTRED

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """The conv's weight goes from the checkpoint's [C, 1, K] to MLX's [C, K, 1] (zero-centred norms get their
        1 in ``CausalLM.sanitize``)."""
        weights = super().sanitize(weights)
        return {k: (v.swapaxes(1, 2) if k.endswith("conv1d.weight") else v) for k, v in weights.items()}
