"""OLMoE: RMSNorm over the whole q and k projections, optional clip_qkv, softmax top-k routing, no shared expert.

Every layer is MoE and ``intermediate_size`` is the per-expert width (there is no dense MLP).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from moepack.runtime.models.attention import Attention
from moepack.runtime.models.base import CausalLM, DecoderLayer, MoEArgs
from moepack.runtime.models.moe import MoE, SoftmaxRouter, StreamedExperts


@dataclass(kw_only=True)
class ModelArgs(MoEArgs):
    norm_topk_prob: bool = False
    clip_qkv: float | None = None
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False


class ClippedAttention(Attention):
    """q, k and v clamped to [-clip_qkv, clip_qkv] after the full-projection norm, before RoPE."""

    def __init__(self, clip_qkv: float | None, **kw):
        super().__init__(**kw)
        self.clip_qkv = clip_qkv

    def project(self, x: mx.array):
        q, k, v, _ = super().project(x)
        if self.clip_qkv is not None:
            q, k, v = (mx.clip(t, -self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        return q, k, v, None


class Model(CausalLM):
    def __init__(self, cfg: dict, store):
        a = ModelArgs.from_config(cfg)
        layers = []
        for i in range(a.num_hidden_layers):  # q_norm spans n_heads * head_dim
            attn = ClippedAttention.for_args(a, nn.RoPE(a.head_size, base=a.rope_theta), clip_qkv=a.clip_qkv,
                                             qkv_bias=a.attention_bias, o_bias=a.attention_bias, qk_norm="full")
            moe = MoE(SoftmaxRouter(a.hidden_size, a.num_experts, a.top_k, renormalize=a.norm_topk_prob),
                      StreamedExperts(store, i))
            layers.append(DecoderLayer(attn, moe, a))
        super().__init__(a, layers)
