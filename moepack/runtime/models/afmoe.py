"""AFMoE (Arcee's Trinity): sliding-window layers with RoPE and, every ``global_attn_every_n_layers``-th, full
attention without positions (NoPE); per-head q/k norm and a sigmoid output gate (``gate_proj``) in every layer;
norms on both sides of each sublayer; muP input scaling (embeddings × sqrt(hidden) where ``mup_enabled``);
sigmoid routing with a selection-only ``expert_bias``, renormalised and scaled by ``route_scale``, plus ungated
shared experts; the first ``num_dense_layers`` layers dense.
"""

from __future__ import annotations

from dataclasses import dataclass

from moepack import arch
from moepack.runtime.models.attention import Attention, OutputGate
from moepack.runtime.models.base import MLP, CausalLM, DecoderLayer, MoEArgs
from moepack.runtime.models.moe import GroupedRouter, MoE, StreamedExperts
from moepack.runtime.models.rope import ScaledRoPE


@dataclass(kw_only=True)
class ModelArgs(MoEArgs):
    intermediate_size: int
    moe_intermediate_size: int
    head_dim: int = 128
    n_shared_experts: int = 2
    route_scale: float = 1.0
    mup_enabled: bool = False
    sliding_window: int = 1024
    global_attn_every_n_layers: int = 4
    layer_types: list[str] | None = None
    attention_bias: bool = False
    rms_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer_types is None:  # as transformers derives them; older configs spell only the interval
            n = self.global_attn_every_n_layers
            self.layer_types = ["full_attention" if (i + 1) % n == 0 else "sliding_attention"
                                for i in range(self.num_hidden_layers)]


class Model(CausalLM):
    # the router's weight is ``router.gate`` and its correction bias sits on the block
    renames = ((".mlp.router.gate.", ".mlp.router."), (".mlp.expert_bias", ".mlp.router.e_score_correction_bias"))

    def __init__(self, cfg: dict, store):
        a = ModelArgs.from_config(cfg)
        rope = ScaledRoPE(a.head_size, a.rope_theta, a.rope_scaling, a.max_position_embeddings)
        moe = set(arch.moe_layers(cfg))
        layers = []
        for i in range(a.num_hidden_layers):
            sliding = a.layer_types[i] == "sliding_attention"
            attn = Attention.for_args(a, rope if sliding else None, qkv_bias=a.attention_bias, o_bias=a.attention_bias,
                                      qk_norm="head", gate=OutputGate("gate_proj"))
            if i in moe:
                router = GroupedRouter(a.hidden_size, a.num_experts, a.top_k, scaling=a.route_scale)
                shared = MLP(a.hidden_size, a.moe_intermediate_size * a.n_shared_experts)
                mlp = MoE(router, StreamedExperts(store, i), shared=shared)
            else:
                mlp = MLP(a.hidden_size, a.intermediate_size)
            layers.append(DecoderLayer(attn, mlp, a, sliding_window=a.sliding_window if sliding else None, sandwich=True))
        super().__init__(a, layers)
        self.embed_scale = a.hidden_size**0.5 if a.mup_enabled else 1.0
