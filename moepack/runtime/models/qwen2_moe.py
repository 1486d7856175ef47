"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): GQA attention with q/k/v bias, softmax top-k routing, and a shared
expert scaled per token by sigmoid(shared_expert_gate(x)); ``mlp_only_layers``/``decoder_sparse_step`` pick dense layers.
"""

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
    shared_expert_intermediate_size: int
    norm_topk_prob: bool = False
    qkv_bias: bool = True  # hub configs predate the key; transformers defaults it to True
    rope_theta: float = 1e6
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 28
    layer_types: list[str] | None = None

    def window(self, i: int) -> int | None:
        """Layer i's sliding window, as transformers derives ``layer_types`` when the config has none."""
        if not self.use_sliding_window or not self.sliding_window:
            return None
        kind = self.layer_types[i] if self.layer_types else (
            "sliding_attention" if (i + 1) % 2 and i < self.max_window_layers else "full_attention")
        return self.sliding_window if kind == "sliding_attention" else None


class Model(CausalLM):
    def __init__(self, cfg: dict, store):
        a = ModelArgs.from_config(cfg)
        moe = set(arch.moe_layers(cfg))
        layers = []
        for i in range(a.num_hidden_layers):
            attn = Attention.for_args(a, nn.RoPE(a.head_size, base=a.rope_theta), qkv_bias=a.qkv_bias)
            if i in moe:
                mlp = MoE(SoftmaxRouter(a.hidden_size, a.num_experts, a.top_k, renormalize=a.norm_topk_prob),
                          StreamedExperts(store, i), shared=MLP(a.hidden_size, a.shared_expert_intermediate_size),
                          shared_gate=True)
            else:
                mlp = MLP(a.hidden_size, a.intermediate_size)
            layers.append(DecoderLayer(attn, mlp, a, sliding_window=a.window(i)))
        super().__init__(a, layers)
