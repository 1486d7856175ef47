"""The decoder skeleton every family builds on: config parsing (``MoEArgs``), the dense MLP, the pre-norm decoder
layer and the HF-named ``CausalLM`` tree that pack tensors load into by name.

The pieces a family picks from live beside this file: ``attention.py``, ``moe.py`` (routers, streamed experts,
the MoE block), ``rope.py`` and ``cache.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import mlx.core as mx
import mlx.nn as nn

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
    """SwiGLU feed-forward (dense layers and shared experts)."""

    def __init__(self, hidden: int, width: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=bias)
        self.up_proj = nn.Linear(hidden, width, bias=bias)
        self.down_proj = nn.Linear(width, hidden, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); ``mlp`` is a dense MLP or an MoE block.

    ``sliding_window``: this layer attends only to the last that many positions.
    ``mixer``: the token mixer's attribute (and checkpoint) name, e.g. "linear_attn" for Qwen3-Next's DeltaNet layers.
    """

    def __init__(self, mixer: nn.Module, mlp: nn.Module, a: MoEArgs, *, sliding_window: int | None = None,
                 mixer_name: str = "self_attn"):
        super().__init__()
        hidden, eps = a.hidden_size, a.rms_norm_eps
        self.sliding_window, self.mixer = sliding_window, mixer_name
        setattr(self, mixer_name, mixer)
        self.mlp = mlp
        self.input_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(hidden, eps=eps)

    def __call__(self, x: mx.array, mask: Causal, cache: KVCache | None) -> mx.array:
        return self.feed_forward(self.mix(x, mask, cache))

    def mix(self, x: mx.array, mask: Causal, cache: KVCache | None) -> mx.array:
        """The first half: x + attn(norm(x)) (a batch of sequences runs it per sequence, runtime/batch.py)."""
        return x + self[self.mixer](self.input_layernorm(x), mask, cache)

    def feed_forward(self, h: mx.array) -> mx.array:
        """The second half: h + mlp(norm(h))."""
        return h + self.mlp(self.post_attention_layernorm(h))


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

    def __init__(self, a: MoEArgs, layers: list[nn.Module]):
        super().__init__()
        self.model = Body(a.vocab_size, a.hidden_size, layers, a.rms_norm_eps)
        self.tie = a.tie_word_embeddings
        if not self.tie:
            self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, cache: list | None = None) -> mx.array:
        """tokens [B, T] -> logits [B, T, vocab]."""
        return self.head(self.run_layers(self.model.embed_tokens(tokens), cache))  # [B, T, H] in between

    def run_layers(self, h: mx.array, cache: list | None = None, layers: range | None = None) -> mx.array:
        """Hidden states [B, T, H] through ``layers`` (default: all), ``cache[j]`` serving the j-th of them.

        All T positions pass through layer L before layer L+1 starts (a pipeline stage runs its own range).
        """
        layers = range(len(self.model.layers)) if layers is None else layers
        offset = cache[0].offset if cache else 0
        for j, i in enumerate(layers):
            layer = self.model.layers[i]
            mask = Causal(offset, getattr(layer, "sliding_window", None))
            h = layer(h, mask, cache[j] if cache else None)
        return h

    def head(self, h: mx.array) -> mx.array:
        """Final norm and LM head: [B, T, H] -> logits [B, T, vocab]."""
        h = self.model.norm(h)
        return self.model.embed_tokens.as_linear(h) if self.tie else self.lm_head(h)

    def make_cache(self) -> list:
        return [KVCache() for _ in self.model.layers]

    # (old, new) substrings renamed in dense tensor names at load, e.g. hub "block_sparse_moe" -> in-model "mlp".
    renames: tuple[tuple[str, str], ...] = ()

    def rename(self, name: str) -> str:
        """A pack tensor name (the checkpoint's own) -> its parameter path in this module tree."""
        for old, new in (*self.renames, *COMMON_RENAMES):
            name = name.replace(old, new)
        return name

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map the pack's dense tensors onto this module tree (families may also adjust values here)."""
        return {self.rename(k): v for k, v in weights.items()}
