"""Laguna (poolside): sliding-window and full attention layers (``layer_types``) with their own RoPE each
(``rope_parameters`` keyed by layer type: full layers rotate half of each head at theta 5e5 by default) and their own
query-head counts (``num_attention_heads_per_layer``; the KV heads are shared); per-head q/k norm; a softplus output
gate (``g_proj``: one per head, or one per element with ``gating="per-element"``); sigmoid routing over
tanh-softcapped logits with a selection-only correction bias, renormalised, scaled by ``moe_routed_scaling_factor``,
plus an ungated shared expert; dense and MoE layers as ``mlp_layer_types`` says.

The release stores the correction bias as ``mlp.experts.e_score_correction_bias`` and the shared expert as
``shared_expert``; transformers 5's saves say ``mlp.gate.e_score_correction_bias`` and ``shared_experts``.
"""

from __future__ import annotations

from dataclasses import dataclass

from moepack import arch
from moepack.runtime.models.attention import Attention, OutputGate
from moepack.runtime.models.base import MLP, CausalLM, DecoderLayer, MoEArgs
from moepack.runtime.models.moe import GroupedRouter, MoE, StreamedExperts
from moepack.runtime.models.rope import ropes_by_layer_type

# transformers' LagunaConfig defaults when the config has no rope_parameters
ROPE_DEFAULTS = {
    "full_attention": {"rope_type": "default", "rope_theta": 500000.0, "partial_rotary_factor": 0.5},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
}


@dataclass(kw_only=True)
class ModelArgs(MoEArgs):
    intermediate_size: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    head_dim: int = 128
    sliding_window: int = 512
    layer_types: list[str] | None = None
    num_attention_heads_per_layer: list[int] | None = None
    gating: bool | str = True
    moe_routed_scaling_factor: float = 1.0
    moe_router_logit_softcapping: float = 0.0
    attention_bias: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.num_hidden_layers
        self.layer_types = self.layer_types or ["full_attention"] * n
        self.num_attention_heads_per_layer = self.num_attention_heads_per_layer or [self.num_attention_heads] * n


class Model(CausalLM):
    renames = ((".mlp.experts.e_score_correction_bias", ".mlp.gate.e_score_correction_bias"),)

    def __init__(self, cfg: dict, store):
        a = ModelArgs.from_config(cfg)
        ropes = ropes_by_layer_type(cfg, a.head_size, ROPE_DEFAULTS)
        gate = OutputGate("g_proj", "softplus", per_head=a.gating is True or a.gating == "per-head")
        moe = set(arch.moe_layers(cfg))
        layers = []
        for i, kind in enumerate(a.layer_types):
            attn = Attention.for_args(a, ropes[kind], n_heads=a.num_attention_heads_per_layer[i],
                                      qkv_bias=a.attention_bias, o_bias=a.attention_bias, qk_norm="head", gate=gate)
            if i in moe:
                router = GroupedRouter(a.hidden_size, a.num_experts, a.top_k, scaling=a.moe_routed_scaling_factor,
                                       softcap=a.moe_router_logit_softcapping)
                mlp = MoE(router, StreamedExperts(store, i), shared=MLP(a.hidden_size, a.shared_expert_intermediate_size))
            else:
                mlp = MLP(a.hidden_size, a.intermediate_size)
            window = a.sliding_window if kind == "sliding_attention" else None
            layers.append(DecoderLayer(attn, mlp, a, sliding_window=window))
        super().__init__(a, layers)
