"""LongCat-Flash (Meituan): each of ``num_layers`` layers holds two MLA + dense-MLP sublayers and one MoE block
connected as a shortcut: the MoE reads the first sublayer's normed state and its output joins the residual after the
second sublayer. MLA is DeepSeek-V3's with the query and the KV latent scaled by sqrt(hidden / LoRA rank).

Routing: softmax over ``n_routed_experts + zero_expert_num`` logits, top-k on scores plus a selection-only
correction bias, weights = scores × ``routed_scaling_factor`` (not renormalised). Ids from ``n_routed_experts`` on
are zero-computation experts: they return their input, weighted, and are never stored or read
(``StreamedExperts(zero_from=)``); the converter leaves out the unused gate/up rows transformers saves for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from moepack.errors import UnsupportedArchitecture
from moepack.runtime.models.base import MLP, CausalLM, MoEArgs
from moepack.runtime.models.cache import Causal, KVCache, LayerCaches
from moepack.runtime.models.deepseek import MLAttention
from moepack.runtime.models.moe import GroupedRouter, MoE, StreamedExperts
from moepack.runtime.models.rope import ScaledRoPE


@dataclass(kw_only=True)
class ModelArgs(MoEArgs):
    ffn_hidden_size: int
    expert_ffn_hidden_size: int
    kv_lora_rank: int
    q_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    zero_expert_num: int = 0
    routed_scaling_factor: float = 1.0
    router_bias: bool = False
    attention_bias: bool = False
    rope_theta: float = 1e7
    rms_norm_eps: float = 1e-5


class ShortcutLayer(nn.Module):
    """Two (MLA, dense MLP) sublayers; the MoE block branches off after the first attention and joins at the end."""

    def __init__(self, a: ModelArgs, rope: nn.Module, moe: MoE):
        super().__init__()
        H, eps = a.hidden_size, a.rms_norm_eps
        scales = ((H / a.q_lora_rank) ** 0.5, (H / a.kv_lora_rank) ** 0.5)
        self.mlp = moe
        self.self_attn = [MLAttention(a, rope, lora_scales=scales) for _ in range(2)]
        self.mlps = [MLP(H, a.ffn_hidden_size) for _ in range(2)]
        self.input_layernorm = [nn.RMSNorm(H, eps=eps) for _ in range(2)]
        self.post_attention_layernorm = [nn.RMSNorm(H, eps=eps) for _ in range(2)]

    def __call__(self, x: mx.array, mask: Causal, cache: LayerCaches | None) -> mx.array:
        c0, c1 = cache if cache is not None else (None, None)
        h = x + self.self_attn[0](self.input_layernorm[0](x), mask, c0)
        n = self.post_attention_layernorm[0](h)
        shortcut = self.mlp(n)
        h = h + self.mlps[0](n)
        h = h + self.self_attn[1](self.input_layernorm[1](h), mask, c1)
        return h + self.mlps[1](self.post_attention_layernorm[1](h)) + shortcut


class Model(CausalLM):
    renames = ((".mlp.router.classifier.", ".mlp.router."),)

    def __init__(self, cfg: dict, store):
        a = ModelArgs.from_config(cfg)
        if a.router_bias:
            raise UnsupportedArchitecture("longcat_flash with router_bias=true is not supported")
        rope = ScaledRoPE(a.qk_rope_head_dim, a.rope_theta, a.rope_scaling, a.max_position_embeddings, traditional=True)
        layers = []
        for i in range(a.num_hidden_layers):
            router = GroupedRouter(a.hidden_size, a.num_experts + a.zero_expert_num, a.top_k, renormalize=False,
                                   scaling=a.routed_scaling_factor, score="softmax")
            experts = StreamedExperts(store, i, zero_from=a.num_experts if a.zero_expert_num else None)
            layers.append(ShortcutLayer(a, rope, MoE(router, experts)))
        super().__init__(a, layers)

    def make_cache(self) -> list:
        return [LayerCaches([KVCache(), KVCache()]) for _ in self.model.layers]
