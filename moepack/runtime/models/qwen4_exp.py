"""Qwen3.8-Flash-Next (``qwen4_exp``; transformers' ``Qwen4ExpTextModel``): Qwen3.5's hybrid layers (Gated DeltaNet,
qwen3_next.py, and gated attention) over gated hyper-connection streams, with a sparse-attention indexer and n-gram
Per-Layer Embeddings.

- Residual: ``hc_count`` streams (hyper.py ``GatedResidual``); each block reads their gated mean and adds its output
  back to every stream with its own weight; the final ``hyper_connection_mixer`` collapses them for the LM head (no
  final norm). There are no pre-norms: the streams' own norm (``hc_norm``) stands for them.
- Attention layers: gated attention (``q_proj`` gives [query | gate]) whose QSA indexer (dsa.py ``QSAIndexer``)
  lets each query see ``indexer_budget`` tokens of the best key blocks plus its own incomplete block.
- PLE on the layers of ``ple_layer_ids`` (one-indexed, linear-attention layers only): every token's 2..n-gram ids
  (ending at it, cut at an end-of-sequence token: a new document starts after one) are hashed per head into a
  large table (``ngram_embedding``, streamed from the pack like the input embedding: only the rows of a step's
  n-grams are read); the embedding gates a value into each stream by its match with the stream, followed by a
  dilated depthwise conv. Their state (the conv's last inputs, the last n-1 token ids) lives in the layer's
  RecurrentCache, snapshotted with the DeltaNet's for prefix reuse.
- MoE: softmax top-k plus a shared expert scaled by sigmoid(shared_expert_gate(x)), as Qwen3-Next.
- RoPE: partial (a quarter of each head by default), interleaved multimodal sections; text positions are equal on
  every section, where M-RoPE is plain RoPE.
- Zero-centred norms (``x̂·(1 + w)``: q/k norms, the indexer's, the hyper-connections' and PLE's) get their 1 at load.

The hash constants (per-head prime table sizes, per-layer multipliers) are derived from the config as transformers
derives them; the checkpoint's copies of them (int64 buffers) are left out of the pack.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from moepack import arch
from moepack.runtime.models import qwen3_next
from moepack.runtime.models.base import MLP, CausalLM
from moepack.runtime.models.cache import RecurrentCache
from moepack.runtime.models.delta_rule import short_conv
from moepack.runtime.models.dsa import QSAIndexer
from moepack.runtime.models.hyper import GatedResidual, GroupedRMSNorm, HyperLM
from moepack.runtime.models.moe import MoE, SoftmaxRouter, StreamedExperts
from moepack.runtime.models.rope import ScaledRoPE

ZERO_CENTRED = re.compile(r"(q_norm|k_norm|q_layernorm|k_layernorm|hc_norm|norm_key|norm_query|norm_conv)\.weight$")


@dataclass(kw_only=True)
class ModelArgs(qwen3_next.ModelArgs):
    model_type: str = "qwen4_exp_text"
    hidden_act: str = "silu"
    output_gate_type: str | None = None
    eos_token_id: int | list[int] | None = None
    hc_count: int = 4
    hc_lowrank: int = 320
    ple_layer_ids: list[int] = field(default_factory=list)
    ple_embed_dim: int | None = None
    ple_conv_kernel_size: int = 4
    ngram_size: int = 3
    heads_per_ngram: int = 8
    ngram_vocab_size_base: int = 20_000_000
    make_ngram_vocab_size_divisible_by: int = 128
    seed: int = 1234
    indexer_n_heads: int | None = None
    indexer_head_dim: int | None = None
    indexer_budget: int | None = None
    indexer_compress_ratio: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.ple_layer_ids = sorted(set(self.ple_layer_ids or []))
        self.ple_embed_dim = self.ple_embed_dim or self.hidden_size
        if isinstance(self.eos_token_id, list):
            self.eos_token_id = self.eos_token_id[0] if self.eos_token_id else None

    @property
    def ngram_heads(self) -> int:
        return (self.ngram_size - 1) * self.heads_per_ngram


# transformers' splitmix64 derivation of the per-layer hash multipliers
_MASK64, _GAMMA, _M1, _M2, _PRIME_1 = (1 << 64) - 1, 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 10007


def _splitmix64(v: int) -> int:
    v = (v + _GAMMA) & _MASK64
    v = ((v ^ (v >> 30)) * _M1) & _MASK64
    v = ((v ^ (v >> 27)) * _M2) & _MASK64
    return (v ^ (v >> 31)) & _MASK64


def layer_multipliers(vocab: int, n: int, ple_index: int, seed: int) -> list[int]:
    """Odd multipliers below 2^63 / vocab, so token·multiplier never overflows int64."""
    half = max(1, ((1 << 63) - 1) // max(vocab, 1) // 2)
    base = seed + _PRIME_1 * ple_index
    return [2 * (_splitmix64((base + _GAMMA * (i + 1)) & _MASK64) % half) + 1 for i in range(n)]


def primes_from(start: int, count: int) -> list[int]:
    """The first ``count`` primes >= ``start`` (head g of the model's PLE heads, in layer order, hashes into a table
    of the g-th of them)."""
    out, p = [], max(start, 2)
    while len(out) < count:
        if all(p % d for d in range(2, math.isqrt(p) + 1)):
            out.append(p)
        p += 1
    return out


class NGramEmbedding(nn.Module):
    """The hashed n-gram ids of each token and their rows of ``ngram_embedding`` (a streamed table, or resident):
    [B, T] -> [B, T, heads·dim]. Hashing runs on the host in int64, as transformers computes it."""

    def __init__(self, a: ModelArgs, ple_index: int, primes: list[int]):
        super().__init__()
        h, div = a.ngram_heads, a.make_ngram_vocab_size_divisible_by
        self.n, self.heads_per_ngram, self.eos = a.ngram_size, a.heads_per_ngram, a.eos_token_id
        self._sizes = np.array(primes[ple_index * h : (ple_index + 1) * h], np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self._sizes)[:-1]]).astype(np.int64)
        self._mult = np.array(layer_multipliers(a.vocab_size, a.ngram_size, ple_index, a.seed), np.int64)
        rows = -(-int(self._sizes.sum()) // div) * div
        self.ngram_embedding = nn.Embedding(rows, a.ple_embed_dim // h)

    def ids(self, history: np.ndarray) -> np.ndarray:
        """history [B, n-1+T] (the last n-1 ids before the T new ones) -> table rows [B, T, heads]: per n-gram order
        ``heads_per_ngram`` rows, of the XOR of token·multiplier over the n-gram, modulo each head's prime."""
        C = self.n - 1
        L = history.shape[1]
        eos = history == self.eos
        mixed = history[:, C:] * self._mult[0]
        blocked = np.zeros(mixed.shape, bool)
        out = []
        for s in range(1, self.n):  # the token s back, or EOS where an EOS lies between (a document boundary)
            blocked |= eos[:, C - s : L - s]
            back = np.where(blocked, self.eos, history[:, C - s : L - s])
            mixed = mixed ^ (back * self._mult[s])
            heads = slice((s - 1) * self.heads_per_ngram, s * self.heads_per_ngram)
            out.append(mixed[..., None] % self._sizes[heads] + self._offsets[heads])
        return np.concatenate(out, axis=-1)

    def __call__(self, tokens: mx.array, cache: RecurrentCache | None) -> mx.array:
        B, T = tokens.shape
        ids = np.array(tokens).astype(np.int64)
        held = cache.aux.get("ngram") if cache is not None else None
        ctx = np.array(held) if held is not None else np.full((B, self.n - 1), self.eos, np.int64)
        history = np.concatenate([ctx, ids], axis=1)
        if cache is not None:
            cache.aux["ngram"] = mx.array(history[:, history.shape[1] - (self.n - 1) :])
        return self.ngram_embedding(mx.array(self.ids(history).astype(np.int32))).reshape(B, T, -1)


class PerLayerEmbedding(nn.Module):
    """PLE (transformers' ``Qwen4ExpTextPLELayer``): streams [B, T, n, H] -> the streams plus, per stream,
    sigmoid(signed sqrt of key·stream / sqrt(H))·value, and a dilated (by ``ngram_size``) depthwise conv of that."""

    def __init__(self, a: ModelArgs, ple_index: int, primes: list[int]):
        super().__init__()
        n, H, E = a.hc_count, a.hidden_size, a.ple_embed_dim
        self.ple_embedding = NGramEmbedding(a, ple_index, primes)
        self.key_proj = nn.Linear(E, n * H, bias=False)
        self.value_proj = nn.Linear(E, H, bias=False)
        self.norm_key, self.norm_query, self.norm_conv = (GroupedRMSNorm(n, H, a.rms_norm_eps) for _ in range(3))
        self.conv1d = nn.Conv1d(n * H, n * H, a.ple_conv_kernel_size, dilation=a.ngram_size, groups=n * H, bias=False)
        self.dilation = a.ngram_size

    def __call__(self, h: mx.array, tokens: mx.array, cache: RecurrentCache | None) -> mx.array:
        B, T, n, H = h.shape
        e = self.ple_embedding(tokens, cache)
        key = self.norm_key(self.key_proj(e).reshape(B, T, n, H))
        gate = (key * self.norm_query(h)).sum(axis=-1, keepdims=True) / math.sqrt(H)  # [B, T, n, 1]
        gate = mx.sqrt(mx.maximum(mx.abs(gate), 1e-6)) * mx.sign(gate)
        gated = mx.sigmoid(gate) * self.value_proj(e)[:, :, None]  # [B, T, n, H]
        conv = short_conv(self.norm_conv(gated).reshape(B, T, n * H), self.conv1d.weight, cache, self.dilation, "ple")
        return h + gated + conv.reshape(B, T, n, H)


class DecoderLayer(nn.Module):
    """PLE (where the layer has it), then the token mixer and the MoE block, each through its gated residual."""

    def __init__(self, mixer: nn.Module, name: str, mlp: nn.Module, a: ModelArgs, ple: PerLayerEmbedding | None):
        super().__init__()
        self.mixer = name
        setattr(self, name, mixer)
        self.mlp = mlp
        if ple is not None:
            self.ple = ple
        self.attn_hyper_connection = GatedResidual(a.hidden_size, a.hc_count, a.hc_lowrank, a.rms_norm_eps)
        self.mlp_hyper_connection = GatedResidual(a.hidden_size, a.hc_count, a.hc_lowrank, a.rms_norm_eps)

    def __call__(self, h: mx.array, mask, cache, tokens: mx.array | None = None) -> mx.array:
        """h [B, T, n, H] -> [B, T, n, H]; ``tokens`` [B, T] feed PLE."""
        if "ple" in self:
            h = self.ple(h, tokens, cache)
        x, inject = self.attn_hyper_connection(h)
        h = GatedResidual.merge(inject, self[self.mixer](x, mask, cache), h)
        x, inject = self.mlp_hyper_connection(h)
        return GatedResidual.merge(inject, self.mlp(x), h)


class Model(HyperLM, qwen3_next.Model):
    """Qwen3-Next's caches and weight loading (conv layouts, zero-centred norms), its own layers; HyperLM's streams."""

    routes_by_token = True  # PLE layers hash the token ids
    zero_centred = ZERO_CENTRED

    def __init__(self, cfg: dict, store):
        cfg = arch.text_config(cfg)
        a = ModelArgs.from_config(cfg)
        rope = ScaledRoPE(arch.rotary_dim(cfg, a.head_size, default_factor=0.25), a.rope_theta, a.rope_scaling,
                          a.max_position_embeddings)
        primes = primes_from(a.ngram_vocab_size_base, len(a.ple_layer_ids) * a.ngram_heads) if a.ple_layer_ids else []
        moe = set(arch.moe_layers(cfg))
        layers = []
        for i in range(a.num_hidden_layers):
            if a.layer_types[i] == "linear_attention":
                mixer, name = qwen3_next.GatedDeltaNet(a, split=True, activation=a.output_gate_type or a.hidden_act), \
                    "linear_attn"
            else:
                indexer = None if a.indexer_n_heads is None else QSAIndexer(
                    hidden=a.hidden_size, n_heads=a.indexer_n_heads, head_dim=a.indexer_head_dim,
                    budget=a.indexer_budget, ratio=a.indexer_compress_ratio, rope=rope, eps=a.rms_norm_eps)
                mixer = qwen3_next.GatedAttention.for_args(a, rope, indexer=indexer, qkv_bias=a.attention_bias, qk_norm="head")
                name = "self_attn"
            if i in moe:
                router = SoftmaxRouter(a.hidden_size, a.num_experts, a.top_k, renormalize=a.norm_topk_prob)
                mlp = MoE(router, StreamedExperts(store, i), shared=MLP(a.hidden_size, a.shared_expert_intermediate_size),
                          shared_gate=True)
            else:
                mlp = MLP(a.hidden_size, a.intermediate_size)
            ple = PerLayerEmbedding(a, a.ple_layer_ids.index(i + 1), primes) if i + 1 in a.ple_layer_ids else None
            layers.append(DecoderLayer(mixer, name, mlp, a, ple))
        CausalLM.__init__(self, a, layers)
        self.streams = a.hc_count
        self.model.hyper_connection_mixer = GatedResidual(a.hidden_size, a.hc_count, a.hc_lowrank, a.rms_norm_eps,
                                                          combine=False)
        del self.model["norm"]  # none: the mixer's hc_norm stands for it

    def head(self, h: mx.array) -> mx.array:
        x, _ = self.model.hyper_connection_mixer(h)
        return self.model.embed_tokens.as_linear(x) if self.tie else self.lm_head(x)
