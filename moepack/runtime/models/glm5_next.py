"""GLM-5.3-Flash (``glm5_next``, the text model of the multimodal checkpoint): KDA linear-attention layers (kda.py;
the forget gate bounded below, ``linear_lower_bound``) mixed with NoPE MLA layers whose DSA indexer scores pooled
keys (dsa.PooledIndexer; "shared" layers reuse the last indexer's selection), manifold-constrained hyper-connections
(``hc_mult`` streams, hyper.py) collapsed at the end by a plain mean, DeepSeek-V3 routing, clamped SwiGLU everywhere.

The release's names: ``hc_attn_fn``/``hc_ffn_base``... for the hyper-connections, the forget gate and split q/k/v
convs on the attention module (kda.py), the text model under ``model.language_model`` (the vision tower
``model.visual`` is left out by the converter).
"""

from __future__ import annotations

from dataclasses import dataclass


from moepack import arch
from moepack.runtime.models import deepseek, kda
from moepack.runtime.models.base import MLP, CausalLM
from moepack.runtime.models.dsa import PooledIndexer, Relay, RelayedLM
from moepack.runtime.models.hyper import HyperDecoderLayer, HyperLM, MeanHead
from moepack.runtime.models.moe import GroupedRouter, MoE, StreamedExperts, clamped_silu
from moepack.runtime.models.rope import unrotated


@dataclass(kw_only=True)
class ModelArgs(deepseek.ModelArgs):
    layer_types: list[str] | None = None
    linear_head_dim: int = 128
    linear_num_heads: int = 64
    linear_conv_kernel_dim: int = 4
    linear_lower_bound: float | None = -5.0
    hc_mult: int = 4
    hc_eps: float = 1e-6
    hc_sinkhorn_iters: int = 20
    swiglu_limit: float = 10.0
    index_kpool: int = 16
    index_kpool_always_select_tail: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer_types is None:  # transformers' default: every fourth layer MLA
            self.layer_types = ["linear_attention" if i % 4 != 3 else "indexed_attention"
                                for i in range(self.num_hidden_layers)]


class Model(kda.HybridLM, HyperLM, RelayedLM, CausalLM):
    renames = ((".hc_attn_", ".attn_hc."), (".hc_ffn_", ".ffn_hc."), *kda.RENAMES)

    def __init__(self, cfg: dict, store):
        cfg = kda.linear_config(arch.text_config(cfg))
        a = ModelArgs.from_config(cfg)
        variant = deepseek.VARIANTS[a.model_type]
        moe = set(arch.moe_layers(cfg))
        kinds = arch.indexer_kinds(cfg, a.num_hidden_layers)
        self.relay = Relay()
        act = clamped_silu(a.swiglu_limit)
        layers = []
        for i, kind in enumerate(a.layer_types):
            if kind == "linear_attention":
                mixer = kda.KimiDeltaAttention(a.hidden_size, a.linear_num_heads, a.linear_head_dim,
                                               a.linear_conv_kernel_dim, a.rms_norm_eps, a.linear_lower_bound)
            else:
                indexer = None if kinds[i] != "full" else PooledIndexer(
                    hidden=a.hidden_size, q_dim=a.q_lora_rank, n_heads=a.index_n_heads, head_dim=a.index_head_dim,
                    topk=a.index_topk, kpool=a.index_kpool, tail=a.index_kpool_always_select_tail)
                mixer = deepseek.MLAttention(a, unrotated, indexer, self.relay, layer=i, lora_eps=a.rms_norm_eps,
                                             q_lora_eps=a.rms_norm_eps)
            if i in moe:
                router = GroupedRouter(a.hidden_size, a.num_experts, a.top_k, n_group=a.n_group or 1,
                                       topk_group=a.topk_group or 1, renormalize=a.norm_topk_prob,
                                       scaling=a.routed_scaling_factor, group_score=variant.group_score)
                mlp = MoE(router, StreamedExperts(store, i, activation=act),
                          shared=MLP(a.hidden_size, a.moe_intermediate_size * (a.n_shared_experts or 1), activation=act))
            else:
                mlp = MLP(a.hidden_size, a.intermediate_size, activation=act)
            layers.append(HyperDecoderLayer(mixer, mlp, a.hidden_size, a.rms_norm_eps, a.hc_mult,
                                            a.hc_sinkhorn_iters, a.hc_eps))
        super().__init__(a, layers)
        self.streams = a.hc_mult
        self.model.hc_head = MeanHead()
        self.layer_types = a.layer_types
