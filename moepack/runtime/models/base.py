"""The decoder skeleton every family builds on: config parsing (``MoEArgs``), the dense MLP, the pre-norm decoder
layer and the HF-named ``CausalLM`` tree that pack tensors load into by name.

The pieces a family picks from live beside this file: ``attention.py``, ``moe.py`` (routers, streamed experts,
the MoE block), ``rope.py`` and ``cache.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from moepack import arch
from moepack.runtime.models.cache import Causal, KVCache


@dataclass
class BaseArgs:
    @classmethod
    def from_config(cls, cfg: dict) -> "BaseArgs":
        """Build from config.json in either spelling: canonical aliases first, then same-named keys."""
        theta, scaling = arch.rope(cfg)
        known = {f.name for f in fields(cls)}
        vals: dict[str, Any] = {k: v for k, v in cfg.items() if k in known}
        for k in arch.CONFIG_ALIASES:
            if k in known and arch.get(cfg, k) is not None:
                vals[k] = arch.get(cfg, k)
        if "rope_theta" in known and theta is not None:
            vals["rope_theta"] = theta
        if "rope_scaling" in known:
            vals["rope_scaling"] = scaling
        return cls(**vals)


@dataclass(kw_only=True)
class MoEArgs(BaseArgs):
    """Config fields every family here shares; a family's ModelArgs adds its own (and may change defaults)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_experts: int
    top_k: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:  # as transformers: no key means plain multi-head attention
            self.num_key_value_heads = self.num_attention_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


class MLP(nn.Module):
    """SwiGLU feed-forward (dense layers and shared experts); ``activation(gate, up)`` replaces silu(gate)·up
    (DeepSeek V4's and Step 3.7's clamped SwiGLU)."""

    def __init__(self, hidden: int, width: int, bias: bool = False,
                 activation: Callable[[mx.array, mx.array], mx.array] | None = None):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=bias)
        self.up_proj = nn.Linear(hidden, width, bias=bias)
        self.down_proj = nn.Linear(width, hidden, bias=bias)
        self.activation = activation

    def __call__(self, x: mx.array) -> mx.array:
        g, u = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.activation(g, u) if self.activation else nn.silu(g) * u)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); ``mlp`` is a dense MLP or an MoE block.

    ``sliding_window``: this layer attends only to the last that many positions; ``attention_chunk``: only to the
    positions of its own chunk of that many (Llama 4).
    ``mixer``: the token mixer's attribute (and checkpoint) name, e.g. "linear_attn" for Qwen3-Next's DeltaNet layers.
    ``sandwich``: norms on both sides of each sublayer (AFMoE): x + post_attention_layernorm(attn(input_layernorm(x))),
    then x + post_mlp_layernorm(mlp(pre_mlp_layernorm(x))).
    """

    def __init__(self, mixer: nn.Module, mlp: nn.Module, a: MoEArgs, *, sliding_window: int | None = None,
                 attention_chunk: int | None = None, mixer_name: str = "self_attn", sandwich: bool = False):
        super().__init__()
        hidden, eps = a.hidden_size, a.rms_norm_eps
        self.sliding_window, self.attention_chunk = sliding_window, attention_chunk
        self.mixer, self.sandwich = mixer_name, sandwich
        setattr(self, mixer_name, mixer)
        self.mlp = mlp
        self.input_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(hidden, eps=eps)
        if sandwich:
            self.pre_mlp_layernorm = nn.RMSNorm(hidden, eps=eps)
            self.post_mlp_layernorm = nn.RMSNorm(hidden, eps=eps)

    def __call__(self, x: mx.array, mask: Causal, cache: KVCache | None) -> mx.array:
        return self.feed_forward(self.mix(x, mask, cache))

    def mix(self, x: mx.array, mask: Causal, cache: KVCache | None) -> mx.array:
        """The first half: x + attn(norm(x)) (a batch of sequences runs it per sequence, runtime/batch.py)."""
        a = self[self.mixer](self.input_layernorm(x), mask, cache)
        return x + (self.post_attention_layernorm(a) if self.sandwich else a)

    def feed_forward(self, h: mx.array) -> mx.array:
        """The second half: h + mlp(norm(h)) (sandwich: norms before and after the MLP)."""
        if not self.sandwich:
            return h + self.mlp(self.post_attention_layernorm(h))
        return h + self.post_mlp_layernorm(self.mlp(self.pre_mlp_layernorm(h)))


class Body(nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: list[nn.Module], eps: float):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = layers
        self.norm = nn.RMSNorm(hidden, eps=eps)


# (old, new) substrings of checkpoint names -> this module tree, after each family's own ``renames``: every MoE
# block calls its router ``router`` and its shared expert ``shared_expert``, whatever the checkpoint says.
COMMON_RENAMES = ((".mlp.gate.", ".mlp.router."), (".mlp.shared_experts.", ".mlp.shared_expert."))


class CausalLM(nn.Module):
    """HF-named module tree (``model.embed_tokens``, ``model.layers.N...``, ``lm_head``) so pack tensors load by name."""

    def __init__(self, a: MoEArgs, layers: list[nn.Module], head_bias: bool = False):
        """``head_bias``: the LM head has a bias ``lm_head.bias`` (ERNIE 4.5 with ``use_bias``), also when its weight
        is tied to the embedding."""
        super().__init__()
        self.model = Body(a.vocab_size, a.hidden_size, layers, a.rms_norm_eps)
        self.hidden_size = a.hidden_size
        self.tie = a.tie_word_embeddings
        if not self.tie:
            self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=head_bias)
        elif head_bias:
            self.lm_head = nn.Module()
            self.lm_head.bias = mx.zeros((a.vocab_size,))

    # Embeddings are multiplied by this (AFMoE's muP: sqrt(hidden_size)).
    embed_scale: float = 1.0

    # Residual streams between layers: the hidden state is [B, T, H], or [B, T, streams, H] (hyper-connections).
    streams: int = 1
    # The layers need the token ids besides the hidden state (hash-routed MoE): run_layers passes them on.
    routes_by_token: bool = False

    def __call__(self, tokens: mx.array, cache: list | None = None) -> mx.array:
        """tokens [B, T] -> logits [B, T, vocab]."""
        return self.head(self.run_layers(self.embed(tokens), cache, tokens=tokens))

    def embed(self, tokens: mx.array) -> mx.array:
        """tokens [B, T] -> the first layer's input [B, T, H] (``hidden_shape``)."""
        h = self.model.embed_tokens(tokens)
        return h if self.embed_scale == 1.0 else h * self.embed_scale

    def hidden_shape(self, B: int, T: int) -> tuple[int, ...]:
        """The hidden state between layers (what one pipeline stage hands the next)."""
        H = self.hidden_size
        return (B, T, H) if self.streams == 1 else (B, T, self.streams, H)

    def run_layers(self, h: mx.array, cache: list | None = None, layers: range | None = None,
                   tokens: mx.array | None = None) -> mx.array:
        """Hidden states (``hidden_shape``) through ``layers`` (default: all), ``cache[j]`` serving the j-th of them;
        ``tokens`` [B, T], the ids, go to layers that route by them (``routes_by_token``).

        All T positions pass through layer L before layer L+1 starts (a pipeline stage runs its own range).
        """
        layers = range(len(self.model.layers)) if layers is None else layers
        offset = cache[0].offset if cache else 0
        extra = (tokens,) if self.routes_by_token else ()
        for j, i in enumerate(layers):
            layer = self.model.layers[i]
            mask = Causal(offset, getattr(layer, "sliding_window", None), getattr(layer, "attention_chunk", None))
            h = layer(h, mask, cache[j] if cache else None, *extra)
        return h

    # final_logit_softcapping: logits -> cap·tanh(logits / cap) (Mistral Large 4); None for none
    softcap: float | None = None

    def head(self, h: mx.array) -> mx.array:
        """Final norm and LM head: the hidden state -> logits [B, T, vocab]."""
        h = self.model.norm(h)
        logits = self.model.embed_tokens.as_linear(h) if self.tie else self.lm_head(h)
        if self.tie and "lm_head" in self:  # a tied head with its own bias (ERNIE 4.5)
            logits = logits + self.lm_head.bias
        return logits if not self.softcap else mx.tanh(logits / self.softcap) * self.softcap

    def make_cache(self) -> list:
        return [KVCache() for _ in self.model.layers]

    # (old, new) substrings renamed in dense tensor names at load, e.g. hub "block_sparse_moe" -> in-model "mlp".
    renames: tuple[tuple[str, str], ...] = ()
    # Norm weights w (tensor names after ``rename``) that scale by 1 + w (zero-centred: Qwen3-Next, Step 3.7):
    # ``sanitize`` adds the 1 (exact in float32), so plain RMSNorm runs them.
    zero_centred: re.Pattern | None = None
    # (fused, parts): a checkpoint module whose rows stack several of this tree's modules, split at load by each
    # part's output rows, e.g. Sarvam's ``query_key_value`` = [q; k; v]. Rows quantize independently, so a quantized
    # tensor's weight, scales and biases split the same way.
    splits: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def rename(self, name: str) -> str:
        """A pack tensor name (the checkpoint's own) -> its parameter path in this module tree."""
        for old, new in (*self.renames, *COMMON_RENAMES):
            name = name.replace(old, new)
        return name

    def _parts(self, module: str) -> list[str] | None:
        """The modules a (renamed) fused module path splits into, or None."""
        for fused, parts in self.splits:
            if module.endswith("." + fused):
                return [module[: -len(fused)] + p for p in parts]
        return None

    def module_paths(self, name: str) -> list[str]:
        """The module path(s) a pack tensor ``<module>.weight`` loads into (several where ``splits`` splits it)."""
        module = self.rename(name).removesuffix(".weight")
        return self._parts(module) or [module]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map the pack's dense tensors onto this module tree (families may also adjust values here)."""
        out, modules = {}, None
        for k, v in weights.items():
            k = self.rename(k)
            if self.zero_centred is not None and self.zero_centred.search(k):
                v = v.astype(mx.float32) + 1
            module, _, leaf = k.rpartition(".")
            parts = self._parts(module)
            if parts is None:
                out[k] = v
                continue
            modules = modules or dict(self.named_modules())
            rows = [modules[p].weight.shape[0] for p in parts]  # still unquantized here: [out, in]
            out.update({f"{p}.{leaf}": t for p, t in zip(parts, mx.split(v, np.cumsum(rows)[:-1].tolist(), axis=0))})
        return out
