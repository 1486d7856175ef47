"""Kimi Linear: KDA linear-attention layers (kda.py) mixed with MLA layers that apply no rope (their "rope" dims of
the shared key pass unrotated), DeepSeek-V3 routing (sigmoid + correction bias, groups, scaled) with shared
experts, leading dense layers.

Both config spellings: transformers 5's (``layer_types``, ``linear_head_dim``, ``mlp_layer_types``) and the
release's (``linear_attn_config`` with 1-indexed ``kda_layers``/``full_attn_layers``, ``first_k_dense_replace``,
``num_experts_per_token``, ``moe_renormalize``, ``num_expert_group``, ``model_max_length``). The release names its
MoE ``block_sparse_moe`` and experts ``w1``/``w2``/``w3``.
"""

from __future__ import annotations

from dataclasses import dataclass

from moepack import arch
from moepack.runtime.models import deepseek, kda
from moepack.runtime.models.base import MLP, CausalLM, DecoderLayer
from moepack.runtime.models.rope import unrotated

# the release's config keys -> transformers' (KimiLinearConfig.attribute_map)
RELEASE_KEYS = {"moe_renormalize": "norm_topk_prob", "num_expert_group": "n_group",
                "num_experts_per_token": "num_experts_per_tok", "model_max_length": "max_position_embeddings"}


def release_keys(cfg: dict) -> dict:
    """``cfg`` with the release's MoE keys (Kimi Linear's and Bailing hybrid's) also under transformers' names."""
    return {**cfg, **{new: cfg[old] for old, new in RELEASE_KEYS.items() if cfg.get(old) is not None}}


def normalized(cfg: dict) -> dict:
    """config.json in transformers 5's spelling, whichever it was written in."""
    cfg = kda.linear_config(release_keys(cfg))
    linear = cfg.get("linear_attn_config") or {}
    n = arch.num_layers(cfg)
    if not cfg.get("layer_types"):
        if "kda_layers" in linear and "full_attn_layers" in linear:  # 1-indexed
            full = set(linear["full_attn_layers"])
            cfg["layer_types"] = ["full_attention" if i + 1 in full else "linear_attention" for i in range(n)]
        else:
            cfg["layer_types"] = ["full_attention" if i and i % 4 == 0 else "linear_attention" for i in range(n)]
    return cfg


@dataclass(kw_only=True)
class ModelArgs(deepseek.ModelArgs):
    layer_types: list[str]
    linear_head_dim: int = 128
    linear_num_heads: int = 32
    linear_conv_kernel_dim: int = 4


class Model(kda.HybridLM, CausalLM):
    """Also Bailing hybrid's (bailing_hybrid.py), which builds other mixers from another config."""

    renames = ((".block_sparse_moe.", ".mlp."), *kda.RENAMES)
    Args = ModelArgs

    def __init__(self, cfg: dict, store):
        cfg = self.normalized(cfg)
        a = self.Args.from_config(cfg)
        variant = deepseek.VARIANTS[a.model_type]
        moe = set(arch.moe_layers(cfg))
        layers = []
        for i, kind in enumerate(a.layer_types):
            mixer = self.linear_attention(a) if kind == "linear_attention" else self.attention(a, i)
            mlp = deepseek.moe_block(a, variant, store, i) if i in moe else MLP(a.hidden_size, a.intermediate_size)
            layers.append(DecoderLayer(mixer, mlp, a))
        super().__init__(a, layers)
        self.layer_types = a.layer_types

    normalized = staticmethod(normalized)

    @staticmethod
    def linear_attention(a: ModelArgs) -> kda.KimiDeltaAttention:
        return kda.KimiDeltaAttention(a.hidden_size, a.linear_num_heads, a.linear_head_dim, a.linear_conv_kernel_dim,
                                      a.rms_norm_eps)

    @staticmethod
    def attention(a: ModelArgs, layer: int) -> deepseek.MLAttention:
        return deepseek.MLAttention(a, unrotated, layer=layer)
