"""OLMoE: RMSNorm over the whole q and k projections, optional clip_qkv, softmax top-k routing, no shared expert.

Every layer is MoE and ``intermediate_size`` is the per-expert width (there is no dense MLP).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.nn as nn

from moepack.runtime.models.base import Attention, MoEArgs, CausalLM, DecoderLayer, SparseMoE, StreamedExperts


@dataclass(kw_only=True)
class ModelArgs(MoEArgs):
    norm_topk_prob: bool = False
    clip_qkv: float | None = None
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False


class Model(CausalLM):
    def __init__(self, cfg: dict, store):
        a = ModelArgs.from_config(cfg)
        head_dim = a.head_size  # q_norm spans n_heads * head_dim
        layers = []
        for i in range(a.num_hidden_layers):
            attn = Attention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, head_dim,
                             nn.RoPE(head_dim, base=a.rope_theta), qkv_bias=a.attention_bias,
                             o_bias=a.attention_bias, qk_norm="full", eps=a.rms_norm_eps, clip_qkv=a.clip_qkv)
            moe = SparseMoE(a.hidden_size, a.num_experts, a.top_k, a.norm_topk_prob, StreamedExperts(store, i))
            layers.append(DecoderLayer(attn, moe, a.hidden_size, a.rms_norm_eps))
        super().__init__(a.vocab_size, a.hidden_size, layers, a.rms_norm_eps, a.tie_word_embeddings)
