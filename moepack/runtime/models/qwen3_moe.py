"""Qwen3-MoE: GQA attention with per-head RMSNorm on q and k, softmax top-k routing, no shared expert."""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.nn as nn

from moepack import arch
from moepack.runtime.models.base import MLP, Attention, MoEArgs, CausalLM, DecoderLayer, SparseMoE, StreamedExperts


@dataclass(kw_only=True)
class ModelArgs(MoEArgs):
    intermediate_size: int
    moe_intermediate_size: int
    norm_topk_prob: bool = False
    attention_bias: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)


class Model(CausalLM):
    def __init__(self, cfg: dict, store):
        a = ModelArgs.from_config(cfg)
        head_dim = a.head_size
        moe = set(arch.moe_layers(cfg))
        layers = []
        for i in range(a.num_hidden_layers):
            attn = Attention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, head_dim,
                             nn.RoPE(head_dim, base=a.rope_theta), qkv_bias=a.attention_bias,
                             qk_norm="head", eps=a.rms_norm_eps)
            if i in moe:
                mlp = SparseMoE(a.hidden_size, a.num_experts, a.top_k, a.norm_topk_prob, StreamedExperts(store, i))
            else:
                mlp = MLP(a.hidden_size, a.intermediate_size)
            layers.append(DecoderLayer(attn, mlp, a.hidden_size, a.rms_norm_eps))
        super().__init__(a.vocab_size, a.hidden_size, layers, a.rms_norm_eps, a.tie_word_embeddings)
