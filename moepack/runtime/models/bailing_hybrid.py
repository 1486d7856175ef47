"""Bailing hybrid (Ling 3 / Ring 3 hybrids): groups of ``layer_group_size`` layers, KDA linear attention (kda.py,
full-rank forget and output gates ``f_proj``/``g_proj``, the forget gate bounded below with ``kda_safe_gate``) and
one MLA layer closing each group (interleaved RoPE, each head's output gated by sigmoid(``g_proj``)); DeepSeek-V3
grouped routing with a shared expert; leading dense layers; MTP layers past ``num_hidden_layers`` dropped.

The release's names (``word_embeddings``, ``attention``, ``attention.dense``, the router's ``expert_bias``, split
q/k/v convs) load through ``renames``; config keys as Kimi Linear's release spells them; KDA sizes ``linear_*`` where
transformers saved them, else the release's ``head_dim``, ``num_attention_heads``, ``short_conv_kernel_size``.
"""

from __future__ import annotations

from dataclasses import dataclass

from moepack.runtime.models import deepseek, kda, kimi_linear
from moepack.runtime.models.attention import OutputGate
from moepack.runtime.models.rope import ScaledRoPE


@dataclass(kw_only=True)
class ModelArgs(deepseek.ModelArgs):
    layer_types: list[str] | None = None
    linear_head_dim: int | None = None  # transformers' saves; the release's head_dim (which transformers' own
    linear_num_heads: int | None = None  # config then overwrites with qk_rope_head_dim), num_attention_heads and
    linear_conv_kernel_dim: int | None = None  # short_conv_kernel_size otherwise
    short_conv_kernel_size: int = 4
    layer_group_size: int = 6
    kda_safe_gate: bool = True
    kda_lower_bound: float = -5.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.linear_head_dim = self.linear_head_dim or self.head_size
        self.linear_num_heads = self.linear_num_heads or self.num_attention_heads
        self.linear_conv_kernel_dim = self.linear_conv_kernel_dim or self.short_conv_kernel_size
        if self.layer_types is None:  # the last layer of every group is MLA
            self.layer_types = ["full_attention" if (i + 1) % self.layer_group_size == 0 else "linear_attention"
                                for i in range(self.num_hidden_layers)]


class Model(kimi_linear.Model):
    renames = (("model.word_embeddings.", "model.embed_tokens."), (".attention.", ".self_attn."),
               (".self_attn.dense.", ".self_attn.o_proj."), (".mlp.gate.expert_bias", ".mlp.gate.e_score_correction_bias"),
               *kda.RENAMES)
    Args = ModelArgs
    normalized = staticmethod(kimi_linear.release_keys)

    @staticmethod
    def linear_attention(a: ModelArgs) -> kda.KimiDeltaAttention:
        return kda.KimiDeltaAttention(a.hidden_size, a.linear_num_heads, a.linear_head_dim, a.linear_conv_kernel_dim,
                                      a.rms_norm_eps, a.kda_lower_bound if a.kda_safe_gate else None, low_rank=False)

    @staticmethod
    def attention(a: ModelArgs, layer: int) -> deepseek.MLAttention:
        rope = ScaledRoPE(a.qk_rope_head_dim, a.rope_theta, a.rope_scaling, a.max_position_embeddings, traditional=True)
        return deepseek.MLAttention(a, rope, layer=layer, gate=OutputGate("g_proj", "sigmoid", per_head=True))
