"""dots.llm1 (rednote-hilab): Qwen3 attention (per-head q/k RMSNorm, optional sliding-window layers) and
DeepSeek-V3 MoE (sigmoid scores, selection-only correction bias, group-limited top-k on each group's two best,
``routed_scaling_factor``, ungated shared experts), dense MLPs in the first ``first_k_dense_replace`` layers.
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
    n_shared_experts: int | None = None
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    attention_bias: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 62
    layer_types: list[str] | None = None

    def window(self, i: int) -> int | None:
        """Layer i's sliding window; without ``layer_types``, layers from ``max_window_layers`` on slide (as
        transformers derives them)."""
        kind = self.layer_types[i] if self.layer_types else (
            "sliding_attention" if self.sliding_window is not None and i >= self.max_window_layers else "full")
        return self.sliding_window if kind == "sliding_attention" else None


class Model(CausalLM):
    args: type[ModelArgs] = ModelArgs  # Hunyuan v3 builds this model from its own config fields

    def __init__(self, cfg: dict, store):
        a = self.args.from_config(cfg)
        rope = ScaledRoPE(a.head_size, a.rope_theta, a.rope_scaling, a.max_position_embeddings)
        moe = set(arch.moe_layers(cfg))
        layers = []
        for i in range(a.num_hidden_layers):
            attn = Attention.for_args(a, rope, qkv_bias=a.attention_bias, o_bias=a.attention_bias, qk_norm="head")
            if i in moe:
                router = GroupedRouter(a.hidden_size, a.num_experts, a.top_k, n_group=a.n_group,
                                       topk_group=a.topk_group, renormalize=a.norm_topk_prob,
                                       scaling=a.routed_scaling_factor)
                width = a.moe_intermediate_size * (a.n_shared_experts or 0)
                mlp = MoE(router, StreamedExperts(store, i), shared=MLP(a.hidden_size, width) if width else None)
            else:
                mlp = MLP(a.hidden_size, a.intermediate_size)
            layers.append(DecoderLayer(attn, mlp, a, sliding_window=a.window(i)))
        super().__init__(a, layers)
