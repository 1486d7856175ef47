"""Hunyuan v3 (Hy3-preview): GQA with per-head q/k RMSNorm, sigmoid routing with a selection-only correction bias,
always renormalised then scaled by ``router_scaling_factor``, one ungated shared expert, and dense layers where
``mlp_layer_types`` says "dense" (by default the first).

The release names the router ``mlp.router.gate``, the correction bias ``mlp.expert_bias`` (on the block) and the
shared expert ``mlp.shared_mlp``; transformers 5's own saves say ``mlp.gate``, ``mlp.e_score_correction_bias`` and
``mlp.shared_experts``. ``renames`` maps both onto this tree.
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
    num_shared_experts: int = 1
    router_scaling_factor: float = 2.826
    attention_bias: bool = False
    mlp_bias: bool = False
    rms_norm_eps: float = 1e-5
    rope_theta: float = 11_158_840.0


class Model(CausalLM):
    renames = ((".mlp.router.gate.", ".mlp.gate."), (".mlp.shared_mlp.", ".mlp.shared_experts."),
               (".mlp.expert_bias", ".mlp.gate.e_score_correction_bias"),
               (".mlp.e_score_correction_bias", ".mlp.gate.e_score_correction_bias"))

    def __init__(self, cfg: dict, store):
        a = ModelArgs.from_config(cfg)
        rope = ScaledRoPE(a.head_size, a.rope_theta, a.rope_scaling, a.max_position_embeddings)
        moe = set(arch.moe_layers(cfg))
        layers = []
        for i in range(a.num_hidden_layers):
            attn = Attention.for_args(a, rope, qkv_bias=a.attention_bias, o_bias=a.attention_bias, qk_norm="head")
            if i in moe:
                router = GroupedRouter(a.hidden_size, a.num_experts, a.top_k, scaling=a.router_scaling_factor)
                shared = MLP(a.hidden_size, a.moe_intermediate_size * a.num_shared_experts, a.mlp_bias)
                mlp = MoE(router, StreamedExperts(store, i), shared=shared)
            else:
                mlp = MLP(a.hidden_size, a.intermediate_size, a.mlp_bias)
            layers.append(DecoderLayer(attn, mlp, a))
        super().__init__(a, layers)
