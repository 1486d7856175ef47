"""Qwen3-MoE: GQA attention with per-head RMSNorm on q and k, softmax top-k routing, no shared expert; dense MLPs
where ``mlp_only_layers``/``decoder_sparse_step`` say (``arch.moe_layers`` reads them)."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.nn as nn

from moepack import arch
from moepack.runtime.models.attention import Attention
from moepack.runtime.models.base import MLP, CausalLM, DecoderLayer, MoEArgs
from moepack.runtime.models.moe import MoE, SoftmaxRouter, StreamedExperts


@dataclass(kw_only=True)
class ModelArgs(MoEArgs):
    intermediate_size: int
    norm_topk_prob: bool = False
    attention_bias: bool = False


class Model(CausalLM):
    def __init__(self, cfg: dict, store):
        a = ModelArgs.from_config(cfg)
        moe = set(arch.moe_layers(cfg))
        layers = []
        for i in range(a.num_hidden_layers):
            attn = Attention.for_args(a, nn.RoPE(a.head_size, base=a.rope_theta), qkv_bias=a.attention_bias,
                                      qk_norm="head")
            if i in moe:
                mlp = MoE(SoftmaxRouter(a.hidden_size, a.num_experts, a.top_k, renormalize=a.norm_topk_prob),
                          StreamedExperts(store, i))
            else:
                mlp = MLP(a.hidden_size, a.intermediate_size)
            layers.append(DecoderLayer(attn, mlp, a))
        super().__init__(a, layers)
