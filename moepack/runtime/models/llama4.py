"""Llama 4 (Scout, Maverick), the text model: MoE layers (``moe_layers`` or every ``interleave_moe_layer_step``-th)
between dense ones, top-k routing whose weights are the chosen logits' sigmoids and scale each expert's *input*, a
shared expert on every token; RoPE layers (interleaved pairs, llama3 scaling, per-head L2 q/k norm) that attend
within chunks of ``attention_chunk_size``, and every ``no_rope_layer_interval``-th layer NoPE over the whole context
with queries scaled by position (attention temperature tuning).

The release is ``Llama4ForConditionalGeneration``: the converter takes ``language_model.*`` and leaves the vision
model out. Its MoE block is ``feed_forward`` (router ``feed_forward.router``, ``feed_forward.shared_expert``), experts
fused and transposed (``arch.FusedLayout``); ``renames`` maps ``feed_forward`` onto this tree's ``mlp``.
"""

from __future__ import annotations

from dataclasses import dataclass

from moepack import arch
from moepack.runtime.models.attention import Attention
from moepack.runtime.models.base import MLP, CausalLM, DecoderLayer, MoEArgs
from moepack.runtime.models.moe import MoE, StreamedExperts, TopKLogitsRouter
from moepack.runtime.models.rope import ScaledRoPE


@dataclass(kw_only=True)
class ModelArgs(MoEArgs):
    intermediate_size: int  # routed and shared experts
    intermediate_size_mlp: int  # dense layers
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_qk_norm: bool = True
    attention_bias: bool = False
    no_rope_layers: list[int] | None = None  # 1: the layer uses RoPE
    no_rope_layer_interval: int = 4
    attention_chunk_size: int | None = 8192
    layer_types: list[str] | None = None
    attn_temperature_tuning: bool = True
    floor_scale: float = 8192
    attn_scale: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.no_rope_layers:  # transformers' defaults
            self.no_rope_layers = [int((i + 1) % self.no_rope_layer_interval != 0) for i in range(self.num_hidden_layers)]
        if self.layer_types is None:
            self.layer_types = ["chunked_attention" if rope and self.attention_chunk_size is not None
                                else "full_attention" for rope in self.no_rope_layers]


class Model(CausalLM):
    renames = ((".feed_forward.", ".mlp."),)

    def __init__(self, cfg: dict, store):
        a = ModelArgs.from_config(cfg)
        rope = ScaledRoPE(a.head_size, a.rope_theta, a.rope_scaling, a.max_position_embeddings, traditional=True)
        nope_temperature = (a.attn_scale, a.floor_scale, 1) if a.attn_temperature_tuning else None
        moe = set(arch.moe_layers(cfg))
        layers = []
        for i in range(a.num_hidden_layers):
            if a.no_rope_layers[i]:
                attn = Attention.for_args(a, rope, qkv_bias=a.attention_bias, o_bias=a.attention_bias,
                                          qk_norm="unit" if a.use_qk_norm else None)
            else:
                attn = Attention.for_args(a, None, qkv_bias=a.attention_bias, o_bias=a.attention_bias,
                                          temperature=nope_temperature)
            if i in moe:
                router = TopKLogitsRouter(a.hidden_size, a.num_experts, a.top_k, weigh="sigmoid")
                mlp = MoE(router, StreamedExperts(store, i), shared=MLP(a.hidden_size, a.intermediate_size),
                          scale_inputs=True)
            else:
                mlp = MLP(a.hidden_size, a.intermediate_size_mlp)
            chunk = a.attention_chunk_size if a.layer_types[i] == "chunked_attention" else None
            layers.append(DecoderLayer(attn, mlp, a, attention_chunk=chunk))
        super().__init__(a, layers)
