"""Mistral Large 4: DeepSeek-style MLA (no query LoRA) with DeepSeek Sparse Attention, and four things of its own,
all options of the shared pieces (deepseek.MLAttention, dsa.Indexer, rope.LearnedRoPE, CausalLM.softcap):

- NoPE layers (``no_rope_layers[i] == 0``): neither the attention nor its indexer rotates anything;
- cross-layer KV sharing (``kv_source_layers``): a layer pointing at an earlier one has no ``kv_a_proj_with_mqa``
  and attends to that layer's latent KV, caching only its indexer's keys (if it has an indexer);
- learned softmax scaling: queries (the attention's and the indexer's) times ``scale[h]·log(pos+1) + bias[h]``;
  LeRoPE: RoPE's inverse frequencies times exp(alpha), alpha learned (``model.rotary_emb.alpha``);
- final logit softcap.

The release is multimodal (a Pixtral vision tower); moepack runs its text model (``text_config``).
"""

from __future__ import annotations

from dataclasses import dataclass

from moepack import arch
from moepack.runtime.models.base import MLP, CausalLM, DecoderLayer
from moepack.runtime.models.deepseek import VARIANTS, MLAttention, moe_block
from moepack.runtime.models.deepseek import ModelArgs as DeepseekArgs
from moepack.runtime.models.dsa import Indexer, Relay, RelayedLM
from moepack.runtime.models.rope import LearnedRoPE

# transformers' MistralLarge4TextConfig defaults where the config says nothing
DEFAULT_ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2048.0, "original_max_position_embeddings": 512,
                "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 1.0}
DEFAULT_NO_ROPE_INTERVAL = 4  # every 4th layer is NoPE


@dataclass(kw_only=True)
class ModelArgs(DeepseekArgs):
    no_rope_layers: list[int] | None = None  # 1: RoPE, 0: NoPE, per layer
    kv_source_layers: list[int] | None = None  # per layer, the layer whose latent KV it attends to
    final_logit_softcapping: float | None = 30.0

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelArgs":
        if cfg.get("rope_parameters") is None and cfg.get("rope_scaling") is None:
            cfg = {**cfg, "rope_parameters": DEFAULT_ROPE}
        a = super().from_config(cfg)
        n = a.num_hidden_layers
        if a.no_rope_layers is None:
            every = cfg.get("no_rope_layer_interval") or DEFAULT_NO_ROPE_INTERVAL
            a.no_rope_layers = [int((i + 1) % every != 0) for i in range(n)]
        if a.kv_source_layers is None:
            a.kv_source_layers = list(range(n))
        return a


class Model(RelayedLM, CausalLM):
    def __init__(self, cfg: dict, store):
        a = ModelArgs.from_config(arch.text_config(cfg))
        v = VARIANTS[a.model_type]
        rope = LearnedRoPE(a.qk_rope_head_dim, a.rope_theta, a.rope_scaling, a.max_position_embeddings,
                           traditional=True)
        moe = set(arch.moe_layers(cfg))
        kinds = arch.indexer_kinds(cfg, a.num_hidden_layers)
        relay = Relay(kv={})
        layers = []
        for i in range(a.num_hidden_layers):
            layer_rope = rope if a.no_rope_layers[i] else None
            indexer = None if kinds[i] != "full" else Indexer(
                hidden=a.hidden_size, q_dim=a.hidden_size, n_heads=a.index_n_heads, head_dim=a.index_head_dim,
                topk=a.index_topk, rope=layer_rope, from_hidden=True)
            attn = MLAttention(a, layer_rope, indexer, relay, layer=i, kv_source=a.kv_source_layers[i],
                               lora_eps=a.rms_norm_eps, position_scaling=True)
            mlp = moe_block(a, v, store, i) if i in moe else MLP(a.hidden_size, a.intermediate_size, a.mlp_bias)
            layers.append(DecoderLayer(attn, mlp, a))
        super().__init__(a, layers)
        self.model.rotary_emb = rope  # its learned alpha loads from model.rotary_emb.alpha
        self.softcap = a.final_logit_softcapping
        self.relay = relay
