"""MiniMax-M2: GQA with RMSNorm over the whole q and k projections (statistics across heads), partial rotary
(rotate-half on the first ``rotary_dim`` dims of each head), sigmoid routing with a selection-only correction
bias, always renormalised, no scaling, no groups, no shared expert. Every layer is MoE.

Hub checkpoints name the MoE block ``block_sparse_moe`` and keep the correction bias on the block
(``block_sparse_moe.e_score_correction_bias``); transformers 5's fused saves say ``mlp``. ``renames`` maps both
onto this tree, where the bias sits on the router (``mlp.gate.e_score_correction_bias``) as in the other
sigmoid-routed families. The hub config's ``use_qk_norm``/``scoring_func``/``use_routing_bias`` switches are
ignored, as transformers ignores them: the model always uses all three.
"""

from __future__ import annotations

from dataclasses import dataclass

from moepack import arch
from moepack.runtime.models.attention import Attention
from moepack.runtime.models.base import CausalLM, DecoderLayer, MoEArgs
from moepack.runtime.models.moe import GroupedRouter, MoE, StreamedExperts
from moepack.runtime.models.rope import ScaledRoPE


@dataclass(kw_only=True)
class ModelArgs(MoEArgs):
    rope_theta: float = 5e6


class Model(CausalLM):
    renames = ((".block_sparse_moe.", ".mlp."), (".mlp.e_score_correction_bias", ".mlp.gate.e_score_correction_bias"))

    def __init__(self, cfg: dict, store):
        a = ModelArgs.from_config(cfg)
        rope = ScaledRoPE(arch.rotary_dim(cfg, a.head_size), a.rope_theta, a.rope_scaling, a.max_position_embeddings)
        layers = []
        for i in range(a.num_hidden_layers):
            attn = Attention.for_args(a, rope, qk_norm="full")
            moe = MoE(GroupedRouter(a.hidden_size, a.num_experts, a.top_k), StreamedExperts(store, i))
            layers.append(DecoderLayer(attn, moe, a))
        super().__init__(a, layers)
