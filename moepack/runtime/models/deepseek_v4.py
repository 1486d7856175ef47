"""DeepSeek V4 (Flash, Pro), as transformers' ``deepseek_v4`` computes it.

- Residual: ``hc_mult`` hyper-connection streams [B, T, n, H] (``hyper.py``), collapsed by ``hc_head`` at the end.
- Attention: shared-KV multi-query attention (one head, K = V) with a learned sink per query head; a low-rank query
  (``q_a_proj`` -> norm -> ``q_b_proj``, each head RMS-normalised without weight); partial interleaved RoPE on the
  *last* ``rope_dim`` features of each head, undone on the output at the query's position; a grouped low-rank output
  (``o_a_proj`` per group of heads, then ``o_b_proj``). Two RoPE sets: "main" for sliding-window layers, "compress"
  (its own theta, YaRN) for the others.
- Three layer kinds (``layer_types``), each attending to the last ``sliding_window`` positions plus:
  ``sliding_attention``: nothing more; ``heavily_compressed_attention`` (HCA): one entry per ``rate`` positions, a
  softmax-gated sum of that window (every entry whose window has closed is visible); ``compressed_sparse_attention``
  (CSA): entries over overlapping windows of 2·rate, of which a lightning indexer (its own compressor at
  ``index_head_dim``, scored by Σ_h w_h·relu(q_h·k)) keeps the ``index_topk`` best per query.
- MoE on every layer: the first ``hash_moe`` layers pick experts from a token-id table (``tid2eid``, stored in the
  pack), the rest by sqrt(softplus) scores plus a selection-only correction bias; weights renormalised and scaled;
  experts and the shared expert use a clamped SwiGLU.

The compressors, the indexer, the per-layer cache and the mask are in ``compressed.py``. The cache
(``V4Cache``) holds the last ``sliding_window - 1`` keys and each compressor's state: the positions of a window not
yet closed, the previous window's first half (CSA), and the entries so far. Decoding with it gives the logits of a
full forward pass. Selection depends only on the positions and scores of each query, never on how the queries are
split into blocks or on the memory budget.

Checkpoints: transformers' names, or the hub release's (``layers.N.attn.wq_a``, ``ffn.experts.E.w1``, ``embed``,
``head``, ``hc_head_fn``...; :data:`RELEASE_RENAMES`, as transformers' conversion mapping reads them). Configs:
transformers 5's (``layer_types``, ``mlp_layer_types``, ``compress_rates``, nested ``rope_parameters``) or the
legacy spelling (``compress_ratios``, ``num_hash_layers``, ``compress_rate_csa``/``_hca``, ``qk_rope_head_dim``,
``rope_scaling`` + ``compress_rope_theta``). MTP layers are dropped by the converter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from moepack import arch
from moepack.runtime.models.attention import attend
from moepack.runtime.models.base import MLP, CausalLM, MoEArgs
from moepack.runtime.models.cache import Causal
from moepack.runtime.models.compressed import CompressedMask, Compressor, CompressorState, Indexer, V4Cache
from moepack.runtime.models.hyper import HyperDecoderLayer, HyperHead, HyperLM, unweighted_rms_norm
from moepack.runtime.models.moe import GroupedRouter, HashRouter, MoE, StreamedExperts, clamped_silu
from moepack.runtime.models.rope import ScaledRoPE

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
DEFAULT_RATES = {CSA: 4, HCA: 128}
RATIO_KINDS = {0: SLIDING, 4: CSA, 128: HCA}  # legacy ``compress_ratios`` entries -> layer kind
DEFAULT_HASH_LAYERS = 3
DEFAULT_ROTARY_FACTOR = 64 / 512

# Hub release names -> transformers', in transformers' order (applied to names without the "model." prefix).
RELEASE_RENAMES = tuple((re.compile(a), b) for a, b in (
    (r"\.attn\.", ".self_attn."), (r"\.ffn\.", ".mlp."), (r"\.indexer\.compressor\.", ".compressor.indexer."),
    (r"^embed\.weight", "embed_tokens.weight"), (r"^hc_head_fn", "hc_head.hc_fn"), (r"^hc_head_base", "hc_head.hc_base"),
    (r"^hc_head_scale", "hc_head.hc_scale"), (r"\.attn_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."), (r"\.hc_attn_fn", ".attn_hc.fn"), (r"\.hc_attn_base", ".attn_hc.base"),
    (r"\.hc_attn_scale", ".attn_hc.scale"), (r"\.hc_ffn_fn", ".ffn_hc.fn"), (r"\.hc_ffn_base", ".ffn_hc.base"),
    (r"\.hc_ffn_scale", ".ffn_hc.scale"), (r"\.attn_sink", ".sinks"),
    (r"\.indexer\.weights_proj\.", ".compressor.indexer.scorer.weights_proj."),
    (r"\.indexer\.wq_b\.", ".compressor.indexer.q_b_proj."), (r"\.norm\.", ".kv_norm."), (r"\.ape", ".position_bias"),
    (r"\.wq_a\.", ".q_a_proj."), (r"\.self_attn\.wq_b\.", ".self_attn.q_b_proj."), (r"\.wkv\.", ".kv_proj."),
    (r"\.wgate\.", ".gate_proj."), (r"\.wo_a\.", ".o_a_proj."), (r"\.wo_b\.", ".o_b_proj."), (r"\.q_norm\.", ".q_a_norm."),
    (r"\.gate\.bias", ".gate.e_score_correction_bias"), (r"\.shared_experts\.w1\.", ".shared_experts.gate_proj."),
    (r"\.shared_experts\.w2\.", ".shared_experts.down_proj."), (r"\.shared_experts\.w3\.", ".shared_experts.up_proj."),
))


@dataclass(kw_only=True)
class ModelArgs(MoEArgs):
    moe_intermediate_size: int
    model_type: str = "deepseek_v4"
    head_dim: int = 512
    q_lora_rank: int = 1024
    num_key_value_heads: int = 1
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.5
    layer_types: list[str] = field(default_factory=list)
    mlp_layer_types: list[str] = field(default_factory=list)
    compress_rates: dict = field(default_factory=dict)
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    swiglu_limit: float = 10.0
    sliding_window: int = 128
    o_groups: int = 8
    o_lora_rank: int = 1024
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    max_position_embeddings: int = 1048576
    ropes: dict = field(default_factory=dict)  # "main" / "compress" -> (rotary dims, theta, scaling)

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelArgs":
        """Both spellings: transformers 5's fields, or the legacy ones folded in as transformers'
        ``DeepseekV4Config.__post_init__`` folds them."""
        n, head_dim = int(cfg["num_hidden_layers"]), int(cfg.get("head_dim", 512))
        rates = {**DEFAULT_RATES, **(cfg.get("compress_rates") or {})}
        for kind, key in ((CSA, "compress_rate_csa"), (HCA, "compress_rate_hca")):
            if cfg.get(key) is not None:
                rates[kind] = int(cfg[key])
        kinds = cfg.get("layer_types")
        if kinds is None and cfg.get("compress_ratios") is not None:
            kinds = [RATIO_KINDS[int(r)] for r in cfg["compress_ratios"]]
        if kinds is None:  # transformers' default: two HCA layers, then CSA and HCA alternating
            kinds = [HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]
        mlp_kinds = cfg.get("mlp_layer_types")
        if mlp_kinds is None:
            n_hash = cfg.get("num_hash_layers")
            n_hash = DEFAULT_HASH_LAYERS if n_hash is None else int(n_hash)
            mlp_kinds = ["hash_moe"] * min(n, n_hash) + ["moe"] * max(0, n - n_hash)
        factor = cfg.get("partial_rotary_factor")
        if factor is None:
            factor = cfg["qk_rope_head_dim"] / head_dim if cfg.get("qk_rope_head_dim") else DEFAULT_ROTARY_FACTOR
        derived = {"layer_types": list(kinds[:n]), "mlp_layer_types": list(mlp_kinds[:n]), "compress_rates": rates,
                   "ropes": rope_sets(cfg, head_dim, factor)}
        return super().from_config({**cfg, **derived})


def rope_sets(cfg: dict, head_dim: int, factor: float) -> dict[str, tuple[int, float, dict | None]]:
    """The "main" and "compress" RoPE sets: (rotary dims, theta, scaling or None).

    Nested ``rope_parameters={"main": {...}, "compress": {...}}`` as saved by transformers; else the flat spelling:
    main is plain RoPE at ``rope_theta``, compress is ``rope_scaling`` at ``compress_rope_theta`` (YaRN there with
    no cos/sin factor unless the config gives one, as transformers forces ``attention_factor=1``).
    """
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("main"), dict) and isinstance(params.get("compress"), dict):
        out = {}
        for name in ("main", "compress"):
            p = dict(params[name])
            kind = p.get("rope_type", p.get("type", "default"))
            dims = int(head_dim * p.get("partial_rotary_factor", 1.0))
            out[name] = (dims, float(p["rope_theta"]), None if kind == "default" else {**p, "rope_type": kind})
        return out
    theta, scaling = arch.rope(cfg)
    dims = int(head_dim * factor)
    if scaling is not None and scaling["rope_type"] == "yarn":
        scaling.setdefault("attention_factor", 1.0)
    return {"main": (dims, theta if theta is not None else 10000.0, None),
            "compress": (dims, float(cfg.get("compress_rope_theta", 160000.0)), scaling)}


# ---- attention -------------------------------------------------------------------------------


class GroupedLinear(nn.Module):
    """``o_a_proj``: the heads in ``groups`` groups, each group's [.., in] times its own rows of ``weight``
    [groups·R, in] (plain or quantized, see ``to_quantized``)."""

    def __init__(self, in_per_group: int, out: int, groups: int):
        super().__init__()
        self.groups, self.quant = groups, None
        self.weight = mx.zeros((out, in_per_group))

    def to_quantized(self, group_size: int, bits: int, mode: str = "affine", **_) -> "GroupedLinear":
        q = GroupedLinear(self.weight.shape[1], self.weight.shape[0], self.groups)
        parts = mx.quantize(self.weight, group_size, bits, mode=mode)
        q.weight, q.scales = parts[0], parts[1]
        if len(parts) > 2 and parts[2] is not None:
            q.biases = parts[2]
        q.quant = {"group_size": group_size, "bits": bits, "mode": mode}
        return q

    def __call__(self, x: mx.array) -> mx.array:
        """[..., groups, in] -> [..., groups, R]."""
        lead, G = x.shape[:-2], self.groups
        xg = x.reshape(-1, G, x.shape[-1]).swapaxes(0, 1)  # [G, N, in]

        def rows(a: mx.array) -> mx.array:
            return a.reshape(G, -1, a.shape[-1])

        if self.quant is None:
            y = xg @ rows(self.weight).swapaxes(-1, -2)
        else:
            biases = self.get("biases")
            y = mx.gather_qmm(xg, rows(self.weight), rows(self.scales), None if biases is None else rows(biases),
                              rhs_indices=mx.arange(G), transpose=True, **self.quant)
        return y.swapaxes(0, 1).reshape(*lead, G, -1)


class V4Attention(nn.Module):
    """Shared-KV MQA with sinks over the sliding window and (CSA, HCA) the compressed entries."""

    float32 = True  # sinks stay float32

    def __init__(self, a: ModelArgs, kind: str, ropes: dict[str, ScaledRoPE]):
        super().__init__()
        H, nH, D, eps = a.hidden_size, a.num_attention_heads, a.head_dim, a.rms_norm_eps
        self.n_heads, self.head_dim, self.eps, self.window = nH, D, eps, a.sliding_window
        self.scale = D**-0.5
        self.q_a_proj = nn.Linear(H, a.q_lora_rank, bias=False)
        self.q_a_norm = nn.RMSNorm(a.q_lora_rank, eps=eps)
        self.q_b_proj = nn.Linear(a.q_lora_rank, nH * D, bias=False)
        self.kv_proj = nn.Linear(H, D, bias=False)
        self.kv_norm = nn.RMSNorm(D, eps=eps)
        self.o_a_proj = GroupedLinear(nH * D // a.o_groups, a.o_groups * a.o_lora_rank, a.o_groups)
        self.o_b_proj = nn.Linear(a.o_groups * a.o_lora_rank, H, bias=False)
        self.sinks = mx.zeros((nH,))
        self.rope = ropes["main" if kind == SLIDING else "compress"]
        self.kind = kind
        if kind != SLIDING:
            rate = a.compress_rates[kind]
            self.compressor = Compressor(H, D, rate, kind == CSA, self.rope, eps)
            if kind == CSA:
                self.compressor.indexer = Indexer(H, a.q_lora_rank, a.index_n_heads, a.index_head_dim, rate,
                                                  a.index_topk, self.rope, eps)

    def __call__(self, x: mx.array, mask: Causal, cache: V4Cache | None) -> mx.array:
        B, T, _ = x.shape
        if B != 1:
            raise ValueError("DeepSeek V4 attention runs one sequence at a time (batch 1)")
        offset = mask.offset
        pos = mx.arange(offset, offset + T)
        q_res = self.q_a_norm(self.q_a_proj(x))
        q = self.q_b_proj(q_res).reshape(B, T, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)  # [B, nH, T, D]
        q = self.rope.at(unweighted_rms_norm(q, self.eps), pos)
        kv = self.rope.at(self.kv_norm(self.kv_proj(x))[:, None], pos)  # [B, 1, T, D]: the one key (and value) head
        prior = cache.keys if cache is not None else None
        keys = kv if prior is None else mx.concatenate([prior, kv], axis=2)
        start = offset - (0 if prior is None else prior.shape[2])
        if cache is not None:
            keep = self.window - 1
            cache.keys = keys[:, :, max(0, keys.shape[2] - keep) :] if keep > 0 else None
            cache.offset += T
        states = cache.state if cache is not None else (lambda name: CompressorState())
        m = CompressedMask(offset, start, self.window, keys.shape[2])
        if "compressor" in self:
            c = self.compressor
            entries = c(x, states("compressor"))[:, None]  # [B, 1, S, D]
            selected = c.indexer.select(x, q_res, pos, states("indexer")) if "indexer" in c else None
            m = CompressedMask(offset, start, self.window, keys.shape[2], entries.shape[2], c.rate, selected)
            keys = mx.concatenate([keys, entries], axis=2)
        o = attend(q, keys, keys, self.scale, m, self.sinks.astype(q.dtype), merge_heads=False)  # [B, nH, T, D]
        o = self.rope.at(o, pos, conjugate=True)  # V carried the keys' rotation: undo it at the query's position
        o = o.transpose(0, 2, 1, 3).reshape(B, T, self.o_a_proj.groups, -1)
        return self.o_b_proj(self.o_a_proj(o).reshape(B, T, -1))


# ---- the model -------------------------------------------------------------------------------


def moe_block(a: ModelArgs, store, layer: int) -> MoE:
    act = clamped_silu(a.swiglu_limit)
    if a.mlp_layer_types[layer] == "hash_moe":
        router = HashRouter(a.hidden_size, a.num_experts, a.top_k, a.vocab_size, scaling=a.routed_scaling_factor,
                            score=a.scoring_func)
    else:  # transformers renormalises whatever norm_topk_prob says
        router = GroupedRouter(a.hidden_size, a.num_experts, a.top_k, scaling=a.routed_scaling_factor,
                               score=a.scoring_func)
    return MoE(router, StreamedExperts(store, layer, activation=act),
               shared=MLP(a.hidden_size, a.moe_intermediate_size, activation=act))


class Model(HyperLM, CausalLM):
    routes_by_token = True

    def __init__(self, cfg: dict, store):
        a = ModelArgs.from_config(cfg)
        ropes = {name: ScaledRoPE(dims, theta, scaling, a.max_position_embeddings, traditional=True, trailing=True)
                 for name, (dims, theta, scaling) in a.ropes.items()}
        layers = [HyperDecoderLayer(V4Attention(a, a.layer_types[i], ropes), moe_block(a, store, i), a.hidden_size,
                                    a.rms_norm_eps, a.hc_mult, a.hc_sinkhorn_iters, a.hc_eps,
                                    sliding_window=a.sliding_window)
                  for i in range(a.num_hidden_layers)]
        super().__init__(a, layers)
        self.streams = a.hc_mult
        self.model.hc_head = HyperHead(a.hidden_size, a.hc_mult, a.hc_eps, a.rms_norm_eps)

    def make_cache(self) -> list:
        return [V4Cache() for _ in self.model.layers]

    def rename(self, name: str) -> str:
        """Release or transformers names -> this module tree (transformers' conversion mapping, then the common
        MoE renames)."""
        if name.startswith("model."):
            name = name[len("model."):]
        for pattern, new in RELEASE_RENAMES:
            name = pattern.sub(new, name)
        name = "lm_head." + name[len("head."):] if name.startswith("head.") else name
        return super().rename(name if name.startswith("lm_head.") else "model." + name)
