"""Step 3.7 (StepFun; text model ``step3p5``): sliding-window and full attention layers (``layer_types``) with their
own query-head counts (sliding: ``num_sliding_attention_heads``) and RoPE (``rope_parameters`` keyed by layer type,
partial rotary); per-head q/k norm, a sigmoid head-wise output gate (``g_proj``: one gate per head) and scores scaled
by ``query_pre_attn_scalar^-0.5``; zero-centred RMSNorms (x̂·(1 + w)); sigmoid routing with a selection-only
correction bias, renormalised, scaled by ``moe_router_scaling_factor``, plus an ungated shared expert; dense and MoE
layers as ``mlp_layer_types`` says. SwiGLU is clamped per layer, after the activation:
``min(silu(gate), limit) · clip(up, ±limit)``, routed experts by ``swiglu_limits``, dense MLPs and shared experts by
``swiglu_limits_shared`` (0 or absent: no clamp).

The checkpoint is multimodal: the converter leaves out the vision tower and its projector, and the text model is run.
The release keeps the text model at top level (``model.layers``), experts stacked per projection
(``moe.gate_proj.weight [E, I, H]``, see ``arch.STACKED_EXPERT_TENSOR``), the router as ``moe.gate`` with
``moe.router_bias`` and the shared expert as ``share_expert``; its config spells the per-layer settings the
pre-transformers way (``read_legacy``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from moepack import arch
from moepack.runtime.models.attention import Attention, OutputGate
from moepack.runtime.models.base import MLP, CausalLM, DecoderLayer, MoEArgs
from moepack.runtime.models.moe import GroupedRouter, MoE, StreamedExperts, swiglu
from moepack.runtime.models.rope import ropes_by_layer_type

ZERO_CENTRED = re.compile(r"(layernorm|q_norm|k_norm)\.weight$|^model\.norm\.weight$")
PER_LAYER = ("layer_types", "mlp_layer_types", "swiglu_limits", "swiglu_limits_shared", "rope_theta",
             "partial_rotary_factors")


def read_legacy(cfg: dict) -> dict:
    """The release's config spelling -> transformers 5's, as ``Step3p7TextConfig`` reads it: per-layer lists padded
    with the multi-token-prediction layers are cut to ``num_hidden_layers``; ``rope_theta`` (one or per layer),
    ``partial_rotary_factors`` and ``rope_scaling`` (full-attention layers) become ``rope_parameters`` per layer type;
    ``attention_other_setting.num_attention_heads`` is the sliding layers' head count."""
    cfg, n = dict(cfg), arch.num_layers(cfg)
    for k in PER_LAYER:
        if isinstance(cfg.get(k), list):
            cfg[k] = cfg[k][:n]
    types = cfg.setdefault("layer_types", None) or ["full_attention"] * n
    cfg["layer_types"] = types
    if cfg.get("num_sliding_attention_heads") is None:
        other = cfg.get("attention_other_setting") or {}
        cfg["num_sliding_attention_heads"] = other.get("num_attention_heads", cfg["num_attention_heads"])
    rp = cfg.get("rope_parameters") or {}
    if not all(isinstance(rp.get(t), dict) for t in set(types)):
        theta = cfg.get("rope_theta", 10000.0)
        theta = theta if isinstance(theta, list) else [theta] * n
        factors = cfg.get("partial_rotary_factors")
        rp = {}
        for t in set(types):
            i = types.index(t)
            rp[t] = {"rope_type": "default", "rope_theta": theta[i],
                     **({"partial_rotary_factor": factors[i]} if factors else {})}
        if cfg.get("rope_scaling") and "full_attention" in rp:
            rp["full_attention"].update(cfg["rope_scaling"])
        cfg["rope_parameters"] = rp
    for k in ("rope_theta", "partial_rotary_factors", "rope_scaling"):  # now in rope_parameters
        cfg.pop(k, None)
    return cfg


@dataclass(kw_only=True)
class ModelArgs(MoEArgs):
    intermediate_size: int
    moe_intermediate_size: int
    share_expert_dim: int
    layer_types: list[str]
    num_sliding_attention_heads: int
    sliding_window: int | None = None
    query_pre_attn_scalar: float | None = None
    moe_router_scaling_factor: float = 1.0
    swiglu_limits: list[float | None] | None = None
    swiglu_limits_shared: list[float | None] | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    rms_norm_eps: float = 1e-5

    def limit(self, i: int, shared: bool) -> float | None:
        """Layer i's SwiGLU clamp (shared: dense MLPs and shared experts); None where it has none."""
        limits = self.swiglu_limits_shared if shared else self.swiglu_limits
        return (limits[i] if limits else None) or None


def clamped_silu(limit: float | None):
    """min(silu(gate), limit) · clip(up, -limit, limit); plain SwiGLU without a limit."""

    def act(gate: mx.array, up: mx.array) -> mx.array:
        return mx.minimum(nn.silu(gate), limit) * mx.clip(up, -limit, limit)

    return None if limit is None else act


class Model(CausalLM):
    renames = ((".moe.gate.", ".mlp.gate."), (".moe.router_bias", ".mlp.gate.e_score_correction_bias"),
               (".share_expert.", ".mlp.shared_expert."))
    zero_centred = ZERO_CENTRED

    def __init__(self, cfg: dict, store):
        cfg = read_legacy(arch.text_config(cfg))
        a = ModelArgs.from_config(cfg)
        ropes = ropes_by_layer_type(cfg, a.head_size, {})
        gate = OutputGate("g_proj", "sigmoid", per_head=True)
        scale = (a.query_pre_attn_scalar or a.head_size) ** -0.5
        moe = set(arch.moe_layers(cfg))
        layers = []
        for i, kind in enumerate(a.layer_types):
            sliding = kind == "sliding_attention"
            heads = a.num_sliding_attention_heads if sliding else a.num_attention_heads
            attn = Attention.for_args(a, ropes[kind], n_heads=heads, qkv_bias=a.attention_bias, o_bias=a.attention_bias,
                                      qk_norm="head", gate=gate, scale=scale)
            shared_act = clamped_silu(a.limit(i, shared=True))
            if i in moe:
                router = GroupedRouter(a.hidden_size, a.num_experts, a.top_k, scaling=a.moe_router_scaling_factor)
                experts = StreamedExperts(store, i, activation=clamped_silu(a.limit(i, shared=False)) or swiglu)
                mlp = MoE(router, experts, shared=MLP(a.hidden_size, a.share_expert_dim, a.mlp_bias, shared_act))
            else:
                mlp = MLP(a.hidden_size, a.intermediate_size, a.mlp_bias, shared_act)
            layers.append(DecoderLayer(attn, mlp, a, sliding_window=a.sliding_window if sliding else None))
        super().__init__(a, layers)
