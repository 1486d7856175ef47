"""Gemma 4, its MoE release (26B-A4B; text model ``gemma4_text`` of the multimodal ``gemma4``): in every layer a dense
GELU MLP and a MoE in parallel, each with norms of its own, summed and normed once more before the residual; sliding
-window and global attention layers (``layer_types``), the global ones with wider heads (``global_head_dim``), fewer
KV heads and keys that serve as values (``attention_k_eq_v``); q/k norms with weights, values normed without; scores
unscaled (scale 1); RoPE per layer type (the global layers' "proportional": zeroed frequencies past
``partial_rotary_factor``); a router with its own weightless norm, a learned input scale times hidden^-1/2, softmax,
top-k renormalised, times a learned per-expert scale; a learned scalar on each layer's output; embeddings times
sqrt(hidden); final logits soft-capped.

Per-layer embeddings (PLE, where ``hidden_size_per_layer_input`` is set): a token-indexed table
[vocab, layers x width] (streamed from the pack like the input embedding, SPEC 3.6) plus a projection of the
embedding give every layer a small input of its own, which gates a residual branch after its feed-forward.

The checkpoint is multimodal: the converter leaves out the vision and audio towers and their embedders. The release's
config spells the global layers' shapes ``global_head_dim`` / ``num_global_key_value_heads``; transformers 5's saves
spell them ``per_layer_config`` (both read here, as ``Gemma4TextConfig`` does).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from moepack import arch
from moepack.errors import UnsupportedArchitecture
from moepack.runtime import kernels
from moepack.runtime.models.attention import Attention
from moepack.runtime.models.base import MLP, CausalLM, DecoderLayer, MoEArgs
from moepack.runtime.models.cache import Causal, KVCache
from moepack.runtime.models.moe import MoE, StreamedExperts, geglu, route_softmax
from moepack.runtime.models.rope import ropes_by_layer_type

# transformers' defaults where the config gives no rope_parameters
DEFAULT_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}}


@dataclass(kw_only=True)
class ModelArgs(MoEArgs):
    intermediate_size: int
    moe_intermediate_size: int | None = None
    num_key_value_heads: int | None = 4
    head_dim: int = 256
    layer_types: list[str] | None = None
    sliding_window: int = 512
    final_logit_softcapping: float | None = None
    attention_k_eq_v: bool = False
    vocab_size_per_layer_input: int = 262_144
    num_kv_shared_layers: int = 0
    use_bidirectional_attention: str | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer_types is None:  # as transformers: every sixth layer global
            self.layer_types = ["sliding_attention" if (i + 1) % 6 else "full_attention"
                                for i in range(self.num_hidden_layers)]
        self.layer_types = [*self.layer_types[:-1], "full_attention"]  # transformers forces the last layer global
        if self.num_kv_shared_layers:
            raise UnsupportedArchitecture("Gemma 4 with num_kv_shared_layers (layers reusing another's KV: the small "
                                          "dense releases) is not supported; moepack runs the MoE release")
        if self.use_bidirectional_attention == "all":
            raise UnsupportedArchitecture("Gemma 4 with use_bidirectional_attention='all' is not a causal language "
                                          "model; moepack runs causal ones")


def layer_shapes(cfg: dict, a: ModelArgs) -> list[tuple[int, int]]:
    """(head_dim, KV heads) of each layer: ``per_layer_config`` (transformers 5's saves: overrides by layer index),
    else the release's spelling: global layers get ``global_head_dim`` (default 512) and, where keys serve as values,
    ``num_global_key_value_heads``."""
    overrides = cfg.get("per_layer_config")
    if overrides is None:
        kv = cfg.get("num_global_key_value_heads") if a.attention_k_eq_v else None
        glob = {"head_dim": cfg.get("global_head_dim", 512), **({"num_key_value_heads": kv} if kv is not None else {})}
        overrides = {str(i): glob for i, t in enumerate(a.layer_types) if t == "full_attention"}
    out = []
    for i in range(a.num_hidden_layers):
        o = overrides.get(str(i), overrides.get(i, {})) or {}
        out.append((int(o.get("head_dim", a.head_dim)), int(o.get("num_key_value_heads", a.num_key_value_heads))))
    return out


class Router(nn.Module):
    """Gemma 4's router: weightless RMSNorm of the layer input, times ``scale`` [H] and hidden^-1/2, linear to expert
    logits, softmax, top-k renormalised, each weight times ``per_expert_scale`` of its expert. float32 throughout."""

    float32 = True

    def __init__(self, hidden: int, n_experts: int, top_k: int, eps: float):
        super().__init__()
        self.weight = mx.zeros((n_experts, hidden))
        self.scale = mx.ones((hidden,))
        self.per_expert_scale = mx.ones((n_experts,))
        self.top_k, self.eps = top_k, eps

    def __call__(self, flat: mx.array) -> tuple[mx.array, mx.array]:
        x = mx.fast.rms_norm(flat.astype(mx.float32), None, self.eps) * self.scale * self.weight.shape[1] ** -0.5
        inds, w = route_softmax(kernels.matmul_nt(x, self.weight.astype(mx.float32)), self.top_k, renormalize=True)
        return inds, w * self.per_expert_scale[inds]


class Layer(DecoderLayer):
    """DecoderLayer with sandwich norms whose feed-forward is the dense MLP plus, in parallel, the MoE (``moe``: its
    router on the raw residual, its experts on their own norm), then the per-layer input's gated branch (PLE) and the
    learned ``layer_scalar`` on the whole output."""

    def __init__(self, attn: Attention, mlp: MLP, moe: MoE | None, a: ModelArgs, index: int, ple_width: int,
                 sliding_window: int | None):
        super().__init__(attn, mlp, a, sliding_window=sliding_window, sandwich=True)
        H, eps = a.hidden_size, a.rms_norm_eps
        self.index = index
        if moe is not None:
            self.moe = moe
            self.post_feedforward_layernorm_1 = nn.RMSNorm(H, eps=eps)  # the MLP's output
            self.post_feedforward_layernorm_2 = nn.RMSNorm(H, eps=eps)  # the experts'
        if ple_width:
            self.per_layer_input_gate = nn.Linear(H, ple_width, bias=False)
            self.per_layer_projection = nn.Linear(ple_width, H, bias=False)
            self.post_per_layer_input_norm = nn.RMSNorm(H, eps=eps)
        self.layer_scalar = mx.ones((1,))

    def __call__(self, x: mx.array, mask: Causal, cache: KVCache | None, per_layer: mx.array | None = None) -> mx.array:
        """``per_layer``: every layer's per-layer inputs [B, T, layers, width] (PLE), this layer takes its own."""
        h = self.feed_forward(self.mix(x, mask, cache))
        if per_layer is not None:
            gate = nn.gelu_approx(self.per_layer_input_gate(h)) * per_layer[:, :, self.index]
            h = h + self.post_per_layer_input_norm(self.per_layer_projection(gate))
        return h * self.layer_scalar

    def feed_forward(self, h: mx.array) -> mx.array:
        y = self.mlp(self.pre_mlp_layernorm(h))
        if "moe" in self:
            y = self.post_feedforward_layernorm_1(y) + self.post_feedforward_layernorm_2(self.moe(h))
        return h + self.post_mlp_layernorm(y)


class Model(CausalLM):
    # the router's projection is its weight; the MoE block owns the router and the experts' norm; the sandwich norms
    # are DecoderLayer's pre/post_mlp_layernorm
    renames = ((".router.", ".moe.router."), (".router.proj.", ".router."),
               (".pre_feedforward_layernorm_2.", ".moe.expert_norm."),
               (".pre_feedforward_layernorm.", ".pre_mlp_layernorm."),
               (".post_feedforward_layernorm.", ".post_mlp_layernorm."))

    def __init__(self, cfg: dict, store):
        cfg = arch.text_config(cfg)
        a = ModelArgs.from_config(cfg)
        shapes = layer_shapes(cfg, a)
        kinds = {t: shapes[a.layer_types.index(t)][0] for t in set(a.layer_types)}  # head_dim per layer type
        ropes = ropes_by_layer_type(cfg, kinds, DEFAULT_ROPE)
        moe = set(arch.moe_layers(cfg))
        ple = arch.per_layer_width(cfg)
        layers = []
        for i, kind in enumerate(a.layer_types):
            sliding = kind == "sliding_attention"
            head_dim, kv_heads = shapes[i]
            attn = Attention.for_args(a, ropes[kind], head_dim=head_dim, n_kv_heads=kv_heads,
                                      qkv_bias=a.attention_bias, o_bias=a.attention_bias, qk_norm="head", scale=1.0,
                                      v_norm=True, k_eq_v=a.attention_k_eq_v and not sliding)
            block = None
            if i in moe:
                block = MoE(Router(a.hidden_size, a.num_experts, a.top_k, a.rms_norm_eps),
                            StreamedExperts(store, i, activation=geglu),
                            expert_norm=nn.RMSNorm(a.hidden_size, eps=a.rms_norm_eps))
            layers.append(Layer(attn, MLP(a.hidden_size, a.intermediate_size, activation=geglu), block, a, i,
                                ple, a.sliding_window if sliding else None))
        super().__init__(a, layers)
        self.ple_width = ple
        self.embed_scale = a.hidden_size**0.5
        self.softcap = a.final_logit_softcapping
        if self.ple_width:
            body, width = self.model, a.num_hidden_layers * self.ple_width
            body.embed_tokens_per_layer = nn.Embedding(a.vocab_size_per_layer_input, width)
            body.per_layer_model_projection = nn.Linear(a.hidden_size, width, bias=False)
            body.per_layer_projection_norm = nn.RMSNorm(self.ple_width, eps=a.rms_norm_eps)
            self.routes_by_token = True  # run_layers gets the token ids: the per-layer inputs are made from them

    def per_layer_inputs(self, embeds: mx.array, tokens: mx.array) -> mx.array:
        """Every layer's PLE input [B, T, layers, width]: (norm(projection of the scaled embedding · hidden^-1/2) +
        table rows · sqrt(width)) / sqrt(2), as transformers' get_per_layer_inputs and project_per_layer_inputs."""
        B, T = tokens.shape
        body, shape = self.model, (B, T, -1, self.ple_width)
        rows = body.embed_tokens_per_layer(tokens) * self.ple_width**0.5
        proj = body.per_layer_model_projection(embeds) * self.hidden_size**-0.5
        return (body.per_layer_projection_norm(proj.reshape(shape)) + rows.reshape(shape)) * 2**-0.5

    def run_layers(self, h: mx.array, cache: list | None = None, layers: range | None = None,
                   tokens: mx.array | None = None) -> mx.array:
        """As CausalLM's, where PLE is configured the layers get the per-layer inputs, made from ``h`` (the
        embedding: a pass starts at layer 0, ``arch.stage_starts``) and ``tokens``, in place of the ids."""
        if not self.ple_width:
            return super().run_layers(h, cache, layers)
        if layers is not None and layers.start != 0:
            raise ValueError("Gemma 4's per-layer inputs are made from the embedding: its layers run from layer 0")
        return super().run_layers(h, cache, layers, tokens=self.per_layer_inputs(h, tokens))
