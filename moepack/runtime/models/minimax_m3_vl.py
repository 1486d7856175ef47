"""MiniMax-M3 (``minimax_m3_vl``), the text model of the multimodal checkpoint, as transformers'
``MiniMaxM3VLTextModel`` computes it: MiniMax-M2 grown by

- Gemma-style RMSNorms everywhere (scale by 1 + w: ``zero_centred``), per-head q/k norms, partial rotary;
- block-sparse attention on the ``minimax_m3_sparse`` layers (``layer_types``): a lightning indexer
  (``dsa.BlockIndexer``) picks each query's key blocks, one selection per group of query heads;
- SwiGLU-OAI (gpt-oss's clamped SwiGLU, gate and up not interleaved) in the experts, the shared expert and the
  dense MLPs; sigmoid routing with a selection-only correction bias, renormalised, times ``routed_scaling_factor``,
  plus an ungated shared expert; dense or MoE layers as ``mlp_layer_types`` (release: ``moe_layer_freq``) says.

The release nests the text model under ``language_model.`` (``arch.TEXT_PREFIXES``), says ``block_sparse_moe``,
keeps the correction bias on the block, stores experts as ``w1/w2/w3``, the dense and shared MLPs as
``gate_proj``/``up_proj`` and the indexer as ``self_attn.index_*``; transformers 5's saves fuse ``gate_up_proj``
and say ``self_attn.indexer.*``. Both load; the vision tower and projector are left out by the converter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moepack import arch
from moepack.errors import UnsupportedArchitecture
from moepack.runtime.models import minimax_m2
from moepack.runtime.models.attention import Attention
from moepack.runtime.models.base import MLP, CausalLM, DecoderLayer, MoEArgs
from moepack.runtime.models.dsa import BlockIndexer
from moepack.runtime.models.gpt_oss import clamped_swiglu
from moepack.runtime.models.moe import GroupedRouter, MoE, StreamedExperts
from moepack.runtime.models.rope import ScaledRoPE

SPARSE = "minimax_m3_sparse"  # the layer type with an indexer


@dataclass(kw_only=True)
class ModelArgs(MoEArgs):
    """transformers' MiniMaxM3VLTextConfig defaults."""

    num_key_value_heads: int | None = 4
    head_dim: int = 128
    dense_intermediate_size: int = 12288
    shared_intermediate_size: int = 3072
    routed_scaling_factor: float = 2.0
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    rope_theta: float = 5e6
    layer_types: list[str] | None = None
    index_n_heads: int = 4
    index_head_dim: int = 128
    index_block_size: int = 128
    index_topk_blocks: int = 16
    index_local_blocks: int = 1

    @classmethod
    def from_config(cls, cfg: dict) -> ModelArgs:
        return super().from_config(arch.flattened(cfg))  # the release's sparse_attention_config

    def __post_init__(self) -> None:
        super().__post_init__()
        self.layer_types = self.layer_types or ["full_attention"] * self.num_hidden_layers


class Model(CausalLM):
    renames = (*minimax_m2.Model.renames, (".self_attn.index_", ".self_attn.indexer."))
    splits = (("gate_up_proj", ("gate_proj", "up_proj")),)  # transformers' fused dense and shared MLPs
    zero_centred = re.compile(r"norm\.weight$")

    def __init__(self, cfg: dict, store):
        a = ModelArgs.from_config(cfg)
        rope = ScaledRoPE(arch.rotary_dim(cfg, a.head_size), a.rope_theta, a.rope_scaling, a.max_position_embeddings)
        if SPARSE in a.layer_types and (a.index_head_dim < rope.dims or a.num_attention_heads % a.index_n_heads):
            raise UnsupportedArchitecture(
                f"MiniMax-M3 indexer with index_head_dim {a.index_head_dim} < the {rope.dims} rotary dims, or "
                f"{a.index_n_heads} index heads not dividing {a.num_attention_heads} attention heads, is not supported")
        act = clamped_swiglu(a.swiglu_alpha, a.swiglu_limit)
        moe = set(arch.moe_layers(cfg))
        layers = []
        for i, kind in enumerate(a.layer_types):
            indexer = None if kind != SPARSE else BlockIndexer(
                hidden=a.hidden_size, n_heads=a.index_n_heads, head_dim=a.index_head_dim, block_size=a.index_block_size,
                topk=a.index_topk_blocks, local=a.index_local_blocks, rope=rope, eps=a.rms_norm_eps,
                attention_heads=a.num_attention_heads)
            attn = Attention.for_args(a, rope, qk_norm="head", indexer=indexer)
            if i in moe:
                router = GroupedRouter(a.hidden_size, a.num_experts, a.top_k, scaling=a.routed_scaling_factor)
                mlp = MoE(router, StreamedExperts(store, i, activation=act),
                          shared=MLP(a.hidden_size, a.shared_intermediate_size, activation=act))
            else:
                mlp = MLP(a.hidden_size, a.dense_intermediate_size, activation=act)
            layers.append(DecoderLayer(attn, mlp, a))
        super().__init__(a, layers)
