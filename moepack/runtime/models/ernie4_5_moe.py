"""ERNIE 4.5 MoE (ERNIE-4.5-21B-A3B, 300B-A47B): GQA rotating interleaved pairs, ``use_bias`` biases on every
attention and MLP projection and the LM head (not on routed experts, which transformers builds without), softmax
routing whose choice adds a selection-only correction bias and whose top-k weights are renormalised, ungated shared
experts, and MoE layers every ``moe_layer_interval`` from ``moe_layer_start_index`` to ``moe_layer_end_index``.

The correction bias ships as ``mlp.moe_statics.e_score_correction_bias [1, E]`` (transformers 5 saves it under
``mlp.gate.moe_statics``); ``renames`` and ``sanitize`` put it on the router as ``[E]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from moepack import arch
from moepack.runtime.models.attention import Attention
from moepack.runtime.models.base import MLP, CausalLM, DecoderLayer, MoEArgs
from moepack.runtime.models.moe import GroupedRouter, MoE, StreamedExperts
from moepack.runtime.models.rope import ScaledRoPE


@dataclass(kw_only=True)
class ModelArgs(MoEArgs):
    intermediate_size: int
    moe_intermediate_size: int
    moe_num_shared_experts: int = 2
    use_bias: bool = False
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    tie_word_embeddings: bool = True


class Model(CausalLM):
    renames = ((".mlp.gate.moe_statics.", ".mlp.gate."), (".mlp.moe_statics.", ".mlp.gate."))

    def __init__(self, cfg: dict, store):
        a = ModelArgs.from_config(cfg)
        rope = ScaledRoPE(a.head_size, a.rope_theta, a.rope_scaling, a.max_position_embeddings, traditional=True)
        moe = set(arch.moe_layers(cfg))
        layers = []
        for i in range(a.num_hidden_layers):
            attn = Attention.for_args(a, rope, qkv_bias=a.use_bias, o_bias=a.use_bias)
            if i in moe:
                router = GroupedRouter(a.hidden_size, a.num_experts, a.top_k, score="softmax")
                width = a.moe_intermediate_size * a.moe_num_shared_experts
                shared = MLP(a.hidden_size, width, a.use_bias) if width else None
                mlp = MoE(router, StreamedExperts(store, i), shared=shared)
            else:
                mlp = MLP(a.hidden_size, a.intermediate_size, a.use_bias)
            layers.append(DecoderLayer(attn, mlp, a))
        super().__init__(a, layers, head_bias=a.use_bias)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        # the correction bias is [1, E] on disk (one expert group), [E] on the router
        return {k: v.reshape(-1) if k.endswith("e_score_correction_bias") else v
                for k, v in super().sanitize(weights).items()}
