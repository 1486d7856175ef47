"""DeepSeek-V2, DeepSeek-V3, Kimi K2 and Mistral 4: multi-head latent attention (MLA) with a compressed KV cache,
grouped routing with ungated shared experts, and leading dense layers. Mistral 4 routes with softmax scores,
groups scored by their two best, no correction bias, and scales queries by position (``llama_4_scaling_beta``).

The KV cache holds only what MLA compresses to: the normalised latent (``kv_lora_rank``) and the roped
shared key (``qk_rope_head_dim``) per position, one "head" each. Prefill expands the latent through
``kv_b_proj`` into per-head keys and values, exactly as transformers does; single-token decode instead
absorbs ``kv_b_proj`` into the query and the output (as mlx-lm's deepseek_v3 does), so it never expands
the whole cache.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn

from moepack import arch
from moepack.errors import UnsupportedArchitecture
from moepack.runtime.models.attention import OutputGate, attend, query_temperature
from moepack.runtime.models.base import MLP, CausalLM, DecoderLayer, MoEArgs
from moepack.runtime.models.cache import Causal, KVCache
from moepack.runtime.models.dsa import Indexer, PositionScaling, Relay, RelayedLM
from moepack.runtime.models.moe import GroupedRouter, MoE, StreamedExperts
from moepack.runtime.models.rope import ScaledRoPE, yarn_mscale

# q_a_layernorm / kv_a_layernorm are built with RMSNorm's default eps in transformers, not rms_norm_eps.
LORA_NORM_EPS = 1e-6


@dataclass(frozen=True)
class Variant:
    """What transformers' DeepseekV2 and DeepseekV3 code do differently (Kimi K2 runs the V3 code)."""

    score: str  # router score function, GroupedRouter's ``score``
    group_score: str  # how a group of experts is scored: its best ("max") or two best summed ("top2")
    correction_bias: bool  # router has e_score_correction_bias (selection only)
    honours_norm_topk_prob: bool  # V2 never renormalises, whatever norm_topk_prob says
    reads_topk_method: bool  # V2: "greedy" ignores groups; V3 always limits groups
    reads_rope_interleave: bool  # V2 always rotates interleaved pairs (as do V3.2 and GLM-5)
    defaults: tuple[tuple[str, object], ...] = ()  # config defaults that differ from ModelArgs'
    indexer_rope: str | None = None  # DSA: its indexer rotates "halves" (V3.2) or "interleaved" pairs (GLM-5)


V3 = Variant("sigmoid", "top2", True, True, False, True,
             (("routed_scaling_factor", 2.5), ("norm_topk_prob", True), ("n_group", 8), ("topk_group", 4)))
VARIANTS = {
    "deepseek_v2": Variant("softmax", "max", False, False, True, False),
    "deepseek_v3": V3,
    "kimi_k2": V3,
    "mistral4": Variant("softmax", "top2", False, True, False, True,
                        (("norm_topk_prob", True), ("max_position_embeddings", 1048576))),
    # V3 plus the DSA indexer; always interleaved MLA rope (rope_interleave is not a V3.2 config key)
    "deepseek_v32": replace(V3, reads_rope_interleave=False, indexer_rope="halves"),
    "glm_moe_dsa": replace(V3, reads_rope_interleave=False, indexer_rope="interleaved", defaults=(
        ("routed_scaling_factor", 2.5), ("norm_topk_prob", True), ("n_group", 1), ("topk_group", 1),
        ("rms_norm_eps", 1e-5), ("index_n_heads", 32))),
    # run by kimi_linear.py (its MLA layers, whose rope dims stay unrotated) and its routing
    "kimi_linear": replace(V3, defaults=(
        ("routed_scaling_factor", 2.446), ("norm_topk_prob", True), ("n_group", 1), ("topk_group", 1),
        ("rms_norm_eps", 1e-5), ("max_position_embeddings", 1048576))),
    # run by glm5_next.py (its NoPE MLA layers, with the pooled DSA indexer)
    "glm5_next_text": replace(V3, reads_rope_interleave=False, defaults=(
        ("routed_scaling_factor", 2.5), ("norm_topk_prob", True), ("n_group", 1), ("topk_group", 1),
        ("rms_norm_eps", 1e-5), ("index_n_heads", 32), ("qk_rope_head_dim", 0), ("max_position_embeddings", 1048576))),
    # run by bailing_hybrid.py (its MLA layers: always interleaved rope, a per-head output gate)
    "bailing_hybrid": replace(V3, reads_rope_interleave=False, defaults=(
        ("routed_scaling_factor", 2.5), ("norm_topk_prob", True), ("n_group", 8), ("topk_group", 4),
        ("rms_norm_eps", 1e-6), ("max_position_embeddings", 262144), ("rope_theta", 6e6))),
    # run by mistral_large4.py: softmax router over groups' top-2 sums, always renormalised, no correction bias
    # run by hy_v4.py: V3's router over one group; its indexer rotates halves (the trailing rope dims)
    "hy_v4": replace(V3, indexer_rope="halves", defaults=(
        ("routed_scaling_factor", 2.827), ("norm_topk_prob", True), ("n_group", 1), ("topk_group", 1),
        ("rms_norm_eps", 1e-5), ("index_n_heads", 16), ("max_position_embeddings", 262144))),
    "mistral_large4_text": Variant("softmax", "top2", False, True, False, False, indexer_rope="interleaved", defaults=(
        ("norm_topk_prob", True), ("n_group", 1), ("topk_group", 1), ("rms_norm_eps", 1e-5), ("index_n_heads", 32),
        ("n_shared_experts", 1))),
}
# DeepseekV2TopkRouter's topk_method -> does it limit experts to the best groups?
V2_TOPK_METHODS = {"greedy": False, "group_limited_greedy": True}


@dataclass(kw_only=True)
class ModelArgs(MoEArgs):
    model_type: str
    intermediate_size: int
    moe_intermediate_size: int
    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    n_shared_experts: int | None = None
    routed_scaling_factor: float = 1.0
    n_group: int | None = None
    topk_group: int | None = None
    topk_method: str | None = "greedy"
    norm_topk_prob: bool = False
    rope_interleave: bool = True
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    mlp_bias: bool = False
    index_topk: int = 2048  # DSA indexer (deepseek_v32, glm_moe_dsa)
    index_head_dim: int = 128
    index_n_heads: int = 64

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelArgs":
        return super().from_config({**dict(VARIANTS[cfg["model_type"]].defaults), **cfg})


def softmax_scale(a: ModelArgs) -> float:
    """qk_head_dim^-0.5, times mscale² when YaRN extends the context (transformers' yarn_apply_mscale)."""
    scale = (a.qk_nope_head_dim + a.qk_rope_head_dim) ** -0.5
    s = a.rope_scaling or {}
    if s.get("mscale_all_dim"):
        scale *= yarn_mscale(s["factor"], s["mscale_all_dim"]) ** 2
    return scale


class MLAttention(nn.Module):
    """Multi-head latent attention; module names are transformers' so pack tensors load by name.

    ``lora_scales``: the query and the normalised KV latent multiplied by these (LongCat-Flash:
    sqrt(hidden / q_lora_rank) and sqrt(hidden / kv_lora_rank)); the cache holds the scaled latent.
    Options for the MLA descendants (each off by default):
    ``indexer``: this layer's DSA indexer (dsa.py); ``relay``: what layers hand on within a forward pass (the last
    indexer selection, which a layer with a relay and no indexer reuses; latent KV for layers that share it).
    ``rope`` None: a NoPE layer, whose keys' rope dims join the nope part (kv_b_proj is that much wider).
    ``kv_source``: another (earlier) layer whose latent KV this layer attends to; it then has no kv_a_proj of its
    own and caches no latent (Mistral Large 4). ``lora_eps``: kv_a_layernorm's eps (``q_lora_eps``: q_a_layernorm's). ``position_scaling``: Mistral
    Large 4's learned per-head, per-position query scaling (``softmax_scaling``). ``sinks``: a learned logit per head
    in the softmax (``sinks``); ``gate``: an output gate over each head's values (Hunyuan v4: ``gate_proj``).
    """

    def __init__(self, a: ModelArgs, rope: nn.Module | None, indexer: Indexer | None = None,
                 relay: Relay | None = None, *, layer: int = 0, kv_source: int | None = None,
                 lora_eps: float = LORA_NORM_EPS, q_lora_eps: float = LORA_NORM_EPS,
                 position_scaling: bool = False,
                 lora_scales: tuple[float, float] = (1.0, 1.0), sinks: bool = False, gate: OutputGate | None = None):
        super().__init__()
        self.q_scale, self.kv_scale = lora_scales
        H, nH = a.hidden_size, a.num_attention_heads
        self.n_heads, self.kv_lora, self.v_dim = nH, a.kv_lora_rank, a.v_head_dim
        self.rope_dim = a.qk_rope_head_dim if rope is not None else 0
        self.nope = a.qk_nope_head_dim + a.qk_rope_head_dim - self.rope_dim
        qk = self.nope + self.rope_dim
        if a.q_lora_rank is None:
            self.q_proj = nn.Linear(H, nH * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(H, a.q_lora_rank, bias=a.attention_bias)
            self.q_a_layernorm = nn.RMSNorm(a.q_lora_rank, eps=q_lora_eps)
            self.q_b_proj = nn.Linear(a.q_lora_rank, nH * qk, bias=False)
        self.layer, self.kv_source = layer, layer if kv_source is None else kv_source
        if self.kv_source == layer:
            self.kv_a_proj_with_mqa = nn.Linear(H, self.kv_lora + self.rope_dim, bias=a.attention_bias)
            self.kv_a_layernorm = nn.RMSNorm(self.kv_lora, eps=lora_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora, nH * (self.nope + self.v_dim), bias=False)  # per head [k_nope; v]
        self.o_proj = nn.Linear(nH * self.v_dim, H, bias=a.attention_bias)
        if position_scaling:
            self.softmax_scaling = PositionScaling(nH)
        if sinks:
            self.sinks = mx.zeros((nH,))
        self.gate = gate
        if gate is not None:
            setattr(self, gate.name, nn.Linear(H, nH * (1 if gate.per_head else self.v_dim), bias=False))
        self._rope = rope  # underscore: a model-level module (learned in Mistral Large 4), not this layer's weights
        self.scale = softmax_scale(a)
        # Mistral 4: queries scaled by 1 + beta·ln(1 + floor(pos / original context))
        s = a.rope_scaling or {}
        self.temperature = s.get("llama_4_scaling_beta"), s.get("original_max_position_embeddings")
        self.indexer, self.relay = indexer, relay

    def __call__(self, x: mx.array, mask: Causal, cache: KVCache | None) -> mx.array:
        B, T, _ = x.shape
        q_lora = None if "q_proj" in self else self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_proj(x) if q_lora is None else self.q_b_proj(q_lora)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        q = q.reshape(B, T, self.n_heads, -1).transpose(0, 2, 1, 3)  # [B, nH, T, nope+rope]
        if self.temperature[0]:  # a per-position scale commutes with RoPE: applied before it
            q = q * query_temperature(mask.offset, T, *self.temperature).astype(q.dtype)
        if self.rope_dim:
            q = mx.concatenate([q[..., : self.nope], self._rope(q[..., self.nope :], offset=mask.offset)], axis=-1)
        if "softmax_scaling" in self:
            q = self.softmax_scaling(q, mask.offset)
        own = self._latent_kv(x, mask.offset) + (() if self.indexer is None else (self.indexer.keys(x, mask.offset),))
        if cache is not None:  # each [B, 1, S, ·]: latent, roped key (RoPE layers), indexer keys (DSA)
            own = cache.update_and_fetch(*own) if own else cache.advance(T)
        kv = self._attended_kv(own, mask.offset + T)  # latent [B, 1, S, kv_lora] (, roped key [B, 1, S, rope])
        mask = self._selection(x, q_lora, own[-1:] if self.indexer is not None else (), mask)
        if T == 1:
            return self._output(self._absorbed(q, kv, mask), x)
        latent, S = kv[0], kv[0].shape[2]
        kv_up = self.kv_b_proj(latent).reshape(B, S, self.n_heads, -1).transpose(0, 2, 1, 3)  # [B, nH, S, nope+v]
        k = kv_up[..., : self.nope]
        if self.rope_dim:
            k = mx.concatenate([k, mx.broadcast_to(kv[1], (B, self.n_heads, S, self.rope_dim))], axis=-1)
        # k [B, nH, S, nope+rope]
        return self._output(attend(q, k, kv_up[..., self.nope :], self.scale, mask, self._sinks(q.dtype)), x)

    def _sinks(self, dtype: mx.Dtype) -> mx.array | None:
        return self.sinks.astype(dtype) if "sinks" in self else None

    def _output(self, o: mx.array, x: mx.array) -> mx.array:
        """The heads' values o [B, T, nH·v] (gated by the layer input x where there is a gate) -> [B, T, hidden]."""
        if self.gate is not None:
            o = self.gate(o, self[self.gate.name](x), self.v_dim)
        return self.o_proj(o)

    def _latent_kv(self, x: mx.array, offset: int) -> tuple[mx.array, ...]:
        """This layer's own latent [B, 1, T, kv_lora] and roped shared key [B, 1, T, rope] (none on a NoPE layer;
        nothing on a layer that attends to another's)."""
        if "kv_a_proj_with_mqa" not in self:
            return ()
        ckv = self.kv_a_proj_with_mqa(x)  # [B, T, kv_lora+rope]
        latent = self.kv_a_layernorm(ckv[..., : self.kv_lora])[:, None]
        if self.kv_scale != 1.0:
            latent = latent * self.kv_scale
        if not self.rope_dim:
            return (latent,)
        return latent, self._rope(ckv[..., self.kv_lora :][:, None], offset=offset)  # one key head for all heads

    def _attended_kv(self, own: tuple[mx.array, ...], positions: int) -> tuple[mx.array, ...]:
        """The latent KV this layer attends to: its own (handed on to the layers that share it), or its source's."""
        if "kv_a_proj_with_mqa" not in self:
            return self._handed_on(self.relay.kv.get(self.kv_source), "latent KV", positions, lambda t: t[0].shape[2])
        kv = own[: len(own) - (self.indexer is not None)]
        if self.relay is not None and self.relay.kv is not None:
            self.relay.kv[self.layer] = kv
        return kv

    def _selection(self, x: mx.array, q_lora: mx.array | None, index_keys: tuple[mx.array, ...],
                   mask: Causal) -> Causal:
        """The mask sparse attention (DSA) adds: this layer's indexer's top-k keys per query, or on a layer that
        shares an earlier layer's selection, that one's; plain ``mask`` without DSA."""
        if self.indexer is not None:
            mask = self.indexer.select(x, x if q_lora is None else q_lora, index_keys[0], mask)
            if self.relay is not None:
                self.relay.selection = mask
        elif self.relay is not None:
            mask = self._handed_on(self.relay.selection, "top-k selection", mask.offset + x.shape[1],
                                   lambda m: m.offset + m.chosen.shape[1])
        return mask

    def _handed_on(self, value: Any, what: str, positions: int, covers: Callable[[Any], int]) -> Any:
        """What an earlier layer left in the relay during this very pass (``covers(value) == positions``)."""
        if value is None or covers(value) != positions:
            raise UnsupportedArchitecture(
                f"layer {self.layer} reuses the {what} of an earlier layer that did not run in this pass; a pipeline "
                "stage must start at a layer with its own indexer and latent KV (split the layers elsewhere)")
        return value

    def _absorbed(self, q: mx.array, kv: tuple[mx.array, ...], mask: Causal) -> mx.array:
        """Attention in latent space: q_nope·k_nope = (q_nope W_uk)·latent, and o = (p·latent) W_uvᵀ."""
        B, _, T, _ = q.shape
        latent = kv[0]  # [B, 1, S, kv_lora]
        q_lat = self._per_head(q[..., : self.nope], 0, self.nope, transpose=False)  # [B, nH, T, kv_lora]
        q = mx.concatenate([q_lat, q[..., self.nope :]], axis=-1)  # [B, nH, T, kv_lora+rope]
        k = mx.concatenate([latent, kv[1]], axis=-1) if self.rope_dim else latent  # [B, 1, S, kv_lora+rope]
        o = attend(q, k, latent, self.scale, mask, self._sinks(q.dtype), merge_heads=False)  # [B, nH, T, kv_lora]
        o = self._per_head(o, self.nope, self.nope + self.v_dim, transpose=True)  # [B, nH, T, v]
        return o.transpose(0, 2, 1, 3).reshape(B, T, -1)

    def _per_head(self, x: mx.array, lo: int, hi: int, transpose: bool) -> mx.array:
        """x [B, nH, T, ·] times rows lo:hi of each head's block of kv_b_proj (plain or quantized)."""
        lin = self.kv_b_proj

        def rows(w: mx.array) -> mx.array:
            return w.reshape(self.n_heads, self.nope + self.v_dim, -1)[:, lo:hi]

        if isinstance(lin, nn.QuantizedLinear):
            biases = lin.get("biases")
            return mx.quantized_matmul(x, rows(lin.weight), rows(lin.scales), None if biases is None else rows(biases),
                                       transpose=transpose, group_size=lin.group_size, bits=lin.bits, mode=lin.mode)
        w = rows(lin.weight)
        return x @ (w.swapaxes(-1, -2) if transpose else w)


def moe_block(a: ModelArgs, v: Variant, store, layer: int, activation: Callable | None = None) -> MoE:
    """Router (V2: softmax, group max; V3: sigmoid + correction bias, group top-2), routed and shared experts;
    ``activation``: the routed experts' instead of SwiGLU (Hunyuan v4 clamps them, not the shared expert)."""
    grouped = True
    if v.reads_topk_method:
        if a.topk_method not in V2_TOPK_METHODS:
            raise UnsupportedArchitecture(
                f"deepseek_v2 topk_method {a.topk_method!r} is not supported; supported: {', '.join(V2_TOPK_METHODS)}")
        grouped = V2_TOPK_METHODS[a.topk_method]
    shared = MLP(a.hidden_size, a.moe_intermediate_size * a.n_shared_experts, a.mlp_bias) if a.n_shared_experts else None
    router = GroupedRouter(a.hidden_size, a.num_experts, a.top_k, n_group=(a.n_group or 1) if grouped else 1,
                           topk_group=a.topk_group or 1, renormalize=a.norm_topk_prob and v.honours_norm_topk_prob,
                           scaling=a.routed_scaling_factor, correction_bias=v.correction_bias, score=v.score,
                           group_score=v.group_score)
    experts = StreamedExperts(store, layer) if activation is None else StreamedExperts(store, layer, activation)
    return MoE(router, experts, shared=shared)


class Model(RelayedLM, CausalLM):
    def __init__(self, cfg: dict, store):
        a = ModelArgs.from_config(cfg)
        v = VARIANTS[a.model_type]
        interleaved = a.rope_interleave or not v.reads_rope_interleave
        rope = ScaledRoPE(a.qk_rope_head_dim, a.rope_theta, a.rope_scaling, a.max_position_embeddings,
                          traditional=interleaved)
        moe = set(arch.moe_layers(cfg))
        kinds = arch.indexer_kinds(cfg, a.num_hidden_layers) if v.indexer_rope else [None] * a.num_hidden_layers
        relay = Relay() if "shared" in kinds else None
        index_rope = v.indexer_rope and ScaledRoPE(a.qk_rope_head_dim, a.rope_theta, a.rope_scaling,
                                                   a.max_position_embeddings, traditional=v.indexer_rope == "interleaved")
        layers = []
        for i in range(a.num_hidden_layers):
            mlp = moe_block(a, v, store, i) if i in moe else MLP(a.hidden_size, a.intermediate_size, a.mlp_bias)
            indexer = None if kinds[i] != "full" else Indexer(
                hidden=a.hidden_size, q_dim=a.q_lora_rank, n_heads=a.index_n_heads, head_dim=a.index_head_dim,
                topk=a.index_topk, rope=index_rope)
            layers.append(DecoderLayer(MLAttention(a, rope, indexer, relay), mlp, a))
        super().__init__(a, layers)
        self.relay = relay

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        # Some hub checkpoints save the rotary buffer; frequencies are recomputed from config.json.
        return super().sanitize({k: w for k, w in weights.items() if "rotary_emb.inv_freq" not in k})
