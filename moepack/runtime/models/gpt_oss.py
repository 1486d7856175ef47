"""gpt-oss: GQA with q/k/v/o biases and a learned per-head attention sink, sliding-window and full attention
layers alternating (``layer_types``), YaRN RoPE (rotate-half), a biased router whose top-k *logits* are
softmaxed, and experts with biases and a clamped SwiGLU: ``(clip(up, ±limit) + 1) · g · σ(α g)``,
``g = min(gate, limit)``.

Checkpoints store experts fused, transposed and with gate/up interleaved (see ``arch.FusedLayout``); the converter
writes them per expert in the usual [out, in] gate/up/down layout with ``gate_bias``/``up_bias``/``down_bias``.
The sliding window is applied by the mask over a full KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from moepack.runtime.models.attention import Attention, attend
from moepack.runtime.models.base import CausalLM, DecoderLayer, MoEArgs
from moepack.runtime.models.cache import Causal
from moepack.runtime.models.moe import MoE, StreamedExperts, TopKLogitsRouter
from moepack.runtime.models.rope import ScaledRoPE


@dataclass(kw_only=True)
class ModelArgs(MoEArgs):
    head_dim: int = 64  # transformers' default, not hidden_size // heads
    sliding_window: int | None = 128
    layer_types: list[str] | None = None
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    attention_bias: bool = True
    rms_norm_eps: float = 1e-5
    rope_theta: float = 150000.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer_types is None:  # transformers' default: sliding first, then alternating
            self.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                                for i in range(self.num_hidden_layers)]


def clamped_swiglu(alpha: float, limit: float):
    """gpt-oss's expert activation: gate clamped above, up clamped both ways and offset by 1."""

    def act(gate: mx.array, up: mx.array) -> mx.array:
        gate = mx.minimum(gate, limit)
        up = mx.clip(up, -limit, limit)
        return (up + 1) * gate * mx.sigmoid(alpha * gate)

    return act


class SinkAttention(Attention):
    """Attention with a learned per-head sink logit ``sinks [H]`` that joins the softmax and takes probability mass
    without contributing a value."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.sinks = mx.zeros((self.n_heads,))

    def attend(self, q: mx.array, k: mx.array, v: mx.array, mask: Causal | None) -> mx.array:
        return attend(q, k, v, self.scale, mask, self.sinks)


class Model(CausalLM):
    def __init__(self, cfg: dict, store):
        a = ModelArgs.from_config(cfg)
        rope = ScaledRoPE(a.head_size, a.rope_theta, a.rope_scaling, a.max_position_embeddings)
        act = clamped_swiglu(a.swiglu_alpha, a.swiglu_limit)
        layers = []
        for i in range(a.num_hidden_layers):
            attn = SinkAttention.for_args(a, rope, qkv_bias=a.attention_bias, o_bias=a.attention_bias)
            moe = MoE(TopKLogitsRouter(a.hidden_size, a.num_experts, a.top_k, bias=True),
                      StreamedExperts(store, i, activation=act))
            window = a.sliding_window if a.layer_types[i] == "sliding_attention" else None
            layers.append(DecoderLayer(attn, moe, a, sliding_window=window))
        super().__init__(a, layers)
