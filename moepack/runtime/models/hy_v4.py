"""Hunyuan v4 (``hy_v4``), as transformers' ``HYV4ForCausalLM`` computes it, from the shared pieces:

- attention: DeepSeek-style MLA (``deepseek.MLAttention``) with rotate-half RoPE, a learned sink per head and a
  sigmoid output gate over each head's values (``gate_proj``); DeepSeek Sparse Attention (``dsa.Indexer``) whose
  indexer rotates the *last* ``qk_rope_head_dim`` dims of its queries and keys and normalises its keys with
  ``rms_norm_eps``; "shared" layers reuse the last full layer's top-k (``indexer_types``; default: layer 0 and
  every fourth from 1);
- residual: ``hc_mult`` "independent" hyper-connection streams (``hyper.py`` without mixing, post scaled by
  ``hc_magnitude``), collapsed by ``hc_head`` before the final norm;
- MLP: dense or MoE per ``mlp_layer_types``; DeepSeek-V3 routing (sigmoid + selection-only correction bias, one
  group, renormalised, scaled) whose routed experts clamp their SwiGLU at ``swiglu_limit``; the shared expert does not.

Checkpoints: transformers' names or the release's (``hc_pre.hc_attn_layer.hc_fn``, ``hc_pre.hc_head.hc_head_fn``,
``learnable_sink_param``, ``linear_gate`` for every gate projection: ``arch.HY_V4_NAMES``). MTP layers are dropped by the converter.
"""

from __future__ import annotations

from dataclasses import dataclass

from moepack import arch
from moepack.runtime.models.attention import OutputGate
from moepack.runtime.models.base import MLP, CausalLM
from moepack.runtime.models.deepseek import VARIANTS, MLAttention, ModelArgs as DeepseekArgs, moe_block
from moepack.runtime.models.dsa import Indexer, Relay, RelayedLM
from moepack.runtime.models.hyper import HyperDecoderLayer, HyperHead, HyperLM
from moepack.runtime.models.moe import clamped_silu
from moepack.runtime.models.rope import ScaledRoPE


@dataclass(kw_only=True)
class ModelArgs(DeepseekArgs):
    hc_mult: int = 4
    hc_magnitude: float = 2.0
    hc_eps: float = 1e-6
    swiglu_limit: float = 10.0


class Model(RelayedLM, HyperLM, CausalLM):
    def __init__(self, cfg: dict, store):
        a = ModelArgs.from_config(cfg)
        v = VARIANTS[a.model_type]
        # rotate-half RoPE; the attention hands it just its rope dims, the indexer whole heads [nope | rope]
        rope = ScaledRoPE(a.qk_rope_head_dim, a.rope_theta, a.rope_scaling, a.max_position_embeddings, trailing=True)
        moe = set(arch.moe_layers(cfg))
        kinds = arch.indexer_kinds(cfg, a.num_hidden_layers)
        relay = Relay() if "shared" in kinds else None
        clamp = clamped_silu(a.swiglu_limit)
        layers = []
        for i in range(a.num_hidden_layers):
            indexer = None if kinds[i] != "full" else Indexer(
                hidden=a.hidden_size, q_dim=a.q_lora_rank, n_heads=a.index_n_heads, head_dim=a.index_head_dim,
                topk=a.index_topk, rope=rope, norm_eps=a.rms_norm_eps)
            attn = MLAttention(a, rope, indexer, relay, layer=i, sinks=True, gate=OutputGate("gate_proj"))
            mlp = moe_block(a, v, store, i, clamp) if i in moe else MLP(a.hidden_size, a.intermediate_size)
            layers.append(HyperDecoderLayer(attn, mlp, a.hidden_size, a.rms_norm_eps, a.hc_mult, 0, a.hc_eps,
                                            mixing=False, magnitude=a.hc_magnitude))
        super().__init__(a, layers)
        self.relay, self.streams = relay, a.hc_mult
        self.model.hc_head = HyperHead(a.hidden_size, a.hc_mult, a.hc_eps, a.rms_norm_eps)
