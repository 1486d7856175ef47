"""GLM-4.5 / 4.6 MoE: GQA with q/k/v bias and optional per-head qk-norm, partial rotary (rotate-half on the first
half of each head by default), DeepSeek-V3-style sigmoid routing with a selection-only correction bias, ungated
shared experts, and dense MLPs in the first ``first_k_dense_replace`` layers.

Multi-token-prediction layers (index >= num_hidden_layers) are not run; the converter leaves them out.
"""

from __future__ import annotations

from dataclasses import dataclass

from moepack import arch
from moepack.runtime.models.attention import Attention
from moepack.runtime.models.base import MLP, CausalLM, DecoderLayer, MoEArgs
from moepack.runtime.models.moe import GroupedRouter, MoE, StreamedExperts
from moepack.runtime.models.rope import ScaledRoPE


@dataclass(kw_only=True)
class ModelArgs(MoEArgs):
    intermediate_size: int
    moe_intermediate_size: int
    n_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    use_qk_norm: bool = False
    attention_bias: bool = False
    rms_norm_eps: float = 1e-5


class Model(CausalLM):
    rotary_default = 0.5  # share of each head RoPE rotates when the config does not say (transformers' default)

    def __init__(self, cfg: dict, store):
        a = ModelArgs.from_config(cfg)
        rotary = arch.rotary_dim(cfg, a.head_size, default_factor=self.rotary_default)
        rope = ScaledRoPE(rotary, a.rope_theta, a.rope_scaling, a.max_position_embeddings)
        moe = set(arch.moe_layers(cfg))
        layers = []
        for i in range(a.num_hidden_layers):
            attn = Attention.for_args(a, rope, qkv_bias=a.attention_bias, qk_norm="head" if a.use_qk_norm else None)
            if i in moe:
                width = a.moe_intermediate_size * a.n_shared_experts
                router = GroupedRouter(a.hidden_size, a.num_experts, a.top_k, n_group=a.n_group,
                                       topk_group=a.topk_group, renormalize=a.norm_topk_prob,
                                       scaling=a.routed_scaling_factor)
                mlp = MoE(router, StreamedExperts(store, i), shared=MLP(a.hidden_size, width) if width else None)
            else:
                mlp = MLP(a.hidden_size, a.intermediate_size)
            layers.append(DecoderLayer(attn, mlp, a))
        super().__init__(a, layers)
