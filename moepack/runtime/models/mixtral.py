"""Mixtral: plain GQA attention (optionally sliding-window), softmax top-k routing always renormalised, no shared expert.

Hub checkpoints name the MoE block ``block_sparse_moe`` (experts ``w1``/``w3``/``w2``); transformers 5's fused
saves name it ``mlp``. The pack keeps either spelling for its dense tensors (the router), so ``renames`` maps the
old one onto this module tree; the experts themselves are streamed by (layer, expert), whatever their names.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.nn as nn

from moepack.runtime.models.attention import Attention
from moepack.runtime.models.base import CausalLM, DecoderLayer, MoEArgs
from moepack.runtime.models.moe import MoE, SoftmaxRouter, StreamedExperts


@dataclass(kw_only=True)
class ModelArgs(MoEArgs):
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    sliding_window: int | None = None


class Model(CausalLM):
    renames = ((".block_sparse_moe.", ".mlp."),)

    def __init__(self, cfg: dict, store):
        a = ModelArgs.from_config(cfg)
        layers = []
        for i in range(a.num_hidden_layers):  # every layer is MoE
            attn = Attention.for_args(a, nn.RoPE(a.head_size, base=a.rope_theta))
            moe = MoE(SoftmaxRouter(a.hidden_size, a.num_experts, a.top_k, renormalize=True), StreamedExperts(store, i))
            layers.append(DecoderLayer(attn, moe, a, sliding_window=a.sliding_window))
        super().__init__(a, layers)
