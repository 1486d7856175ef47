"""Sarvam MoE (sarvam-30b): the GLM-4 MoE design (transformers runs it as ``Glm4MoeForCausalLM``) under the
release's own names, so this is GLM-4 MoE's model with a name map and one different default.

- Tensors: ``word_embeddings``, ``attention.query_key_value`` ([q; k; v] rows, split at load), ``attention.dense``,
  ``query_layernorm``/``key_layernorm`` (per-head q/k norm) and the router's ``expert_bias``; transformers 5's
  own saves use GLM's names, which pass through unchanged.
- Config: the release spells ``num_experts``, ``num_shared_experts``, ``use_qkv_bias`` (``arch.CONFIG_ALIASES``).
- RoPE covers the whole head unless the config says otherwise (GLM's default is half).
"""

from __future__ import annotations

from moepack.runtime.models import glm4_moe

ModelArgs = glm4_moe.ModelArgs


class Model(glm4_moe.Model):
    rotary_default = 1.0
    renames = (("model.word_embeddings.", "model.embed_tokens."), (".attention.", ".self_attn."),
               (".self_attn.dense.", ".self_attn.o_proj."), (".query_layernorm.", ".q_norm."),
               (".key_layernorm.", ".k_norm."), (".mlp.gate.expert_bias", ".mlp.gate.e_score_correction_bias"))
    splits = (("query_key_value", ("q_proj", "k_proj", "v_proj")),)
