"""Manifold-constrained hyper-connections (mHC): the residual is ``n`` parallel streams [B, T, n, H] instead of one.

Each block (attention, then the MLP) reads one collapsed input from the streams and writes its output back into all of
them, through weights a small projection of the streams themselves computes per token:

- ``pre`` [n]: how the streams collapse into the block's input (sigmoid + eps);
- ``post`` [n]: how the block's output spreads back over the streams (2·sigmoid);
- ``comb`` [n, n]: how the streams mix into the new residual, projected onto the doubly-stochastic matrices by
  Sinkhorn-Knopp iterations so that mixing never grows the residual.

A final head (``HyperHead``) collapses the streams once more before the last norm. DeepSeek V4 and GLM-5.3 use this
form (transformers' ``DeepseekV4HyperConnection``, ``Glm5NextTextHyperConnection``); Hunyuan v4's "independent"
hyper-connections drop ``comb`` (the old streams are added as they are) and scale ``post`` by ``hc_magnitude``
(``HyperConnection(..., mixing=False, magnitude=...)``). Everything here runs in float32, as transformers keeps
these modules. Qwen3.8-Flash-Next's gated form (``GatedResidual``) learns the collapse per channel instead, and
runs in the model's dtype, as transformers does.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def unweighted_rms_norm(x: mx.array, eps: float) -> mx.array:
    """x / rms(x) over the last axis, no weight (transformers' ``UnweightedRMSNorm``)."""
    return mx.fast.rms_norm(x, None, eps)


def sinkhorn(comb: mx.array, iters: int, eps: float) -> mx.array:
    """[..., n, n] positive matrices -> (nearly) doubly stochastic: columns, then ``iters - 1`` rounds of rows and
    columns normalised to sum 1 (the order transformers uses)."""
    comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(axis=-1, keepdims=True) + eps)
        comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
    return comb


class HyperConnection(nn.Module):
    """The pre / post / comb weights of one block from its input streams. Parameters as transformers names them:
    ``fn`` [(2 + n)·n, n·H], ``base`` [(2 + n)·n], ``scale`` [3] (one each for pre, post and comb); without
    ``mixing`` (Hunyuan v4) [2n, n·H], [2n], [2]: no comb, and post = magnitude·sigmoid(·) + eps."""

    float32 = True  # the engine keeps these weights float32, as transformers does

    def __init__(self, hidden: int, n: int, iters: int, eps: float, norm_eps: float, *, mixing: bool = True,
                 magnitude: float = 2.0):
        super().__init__()
        self.n, self.iters, self.eps, self.norm_eps = n, iters, eps, norm_eps
        self.mixing, self.magnitude = mixing, magnitude
        width = (2 + n) * n if mixing else 2 * n
        self.fn = mx.zeros((width, n * hidden))
        self.base = mx.zeros((width,))
        self.scale = mx.ones((3 if mixing else 2,))

    def __call__(self, streams: mx.array) -> tuple[mx.array, mx.array | None, mx.array]:
        """streams [B, T, n, H] -> post [B, T, n], comb [B, T, n, n] (float32; None without ``mixing``), the
        block's input [B, T, H]."""
        B, T, n, _ = streams.shape
        flat = unweighted_rms_norm(streams.reshape(B, T, -1).astype(mx.float32), self.norm_eps)
        mix = flat @ self.fn.astype(mx.float32).T  # [B, T, (2 + n)·n]
        base, scale = self.base.astype(mx.float32), self.scale.astype(mx.float32)
        pre = mx.sigmoid(mix[..., :n] * scale[0] + base[:n]) + self.eps
        post = self.magnitude * mx.sigmoid(mix[..., n : 2 * n] * scale[1] + base[n : 2 * n])
        comb = None
        if self.mixing:
            comb = mx.softmax((mix[..., 2 * n :] * scale[2] + base[2 * n :]).reshape(B, T, n, n), axis=-1) + self.eps
            comb = sinkhorn(comb, self.iters, self.eps)
        else:
            post = post + self.eps
        collapsed = (pre[..., None] * streams).sum(axis=2).astype(streams.dtype)
        return post, comb, collapsed

    @staticmethod
    def merge(post: mx.array, comb: mx.array | None, out: mx.array, streams: mx.array) -> mx.array:
        """New streams: the block's output [B, T, H] spread by ``post``, plus the old streams mixed by ``comb``
        (new_k = Σ_j comb[j, k]·stream_j), or as they are without it."""
        dtype = streams.dtype
        spread = post.astype(dtype)[..., None] * out[..., None, :]
        return spread + (streams if comb is None else comb.astype(dtype).swapaxes(-1, -2) @ streams)


class HyperHead(nn.Module):
    """The final collapse of the streams: ``hc_fn`` [n, n·H], ``hc_base`` [n], ``hc_scale`` [1]."""

    float32 = True

    def __init__(self, hidden: int, n: int, eps: float, norm_eps: float):
        super().__init__()
        self.eps, self.norm_eps = eps, norm_eps
        self.hc_fn = mx.zeros((n, n * hidden))
        self.hc_base = mx.zeros((n,))
        self.hc_scale = mx.ones((1,))

    def __call__(self, streams: mx.array) -> mx.array:
        """[B, T, n, H] -> [B, T, H]."""
        B, T = streams.shape[:2]
        flat = unweighted_rms_norm(streams.reshape(B, T, -1).astype(mx.float32), self.norm_eps)
        mix = flat @ self.hc_fn.astype(mx.float32).T
        pre = mx.sigmoid(mix * self.hc_scale.astype(mx.float32) + self.hc_base.astype(mx.float32)) + self.eps
        return (pre[..., None] * streams).sum(axis=2).astype(streams.dtype)


class HyperDecoderLayer(nn.Module):
    """A pre-norm block over hyper-connection streams: the attention and the MLP each read the streams collapsed by
    their own ``HyperConnection`` (``attn_hc``, ``ffn_hc``) and write back through it.

    ``mlp`` gets the token ids too where it routes by them (``MoE.by_token``: hash-routed layers). ``mixing`` and
    ``magnitude``: the hyper-connections' (see ``HyperConnection``).
    """

    def __init__(self, mixer: nn.Module, mlp: nn.Module, hidden: int, eps: float, n: int, iters: int, hc_eps: float,
                 *, sliding_window: int | None = None, mixing: bool = True, magnitude: float = 2.0):
        super().__init__()
        self.sliding_window, self.mixer = sliding_window, "self_attn"
        self.self_attn = mixer
        self.mlp = mlp
        self.input_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.attn_hc = HyperConnection(hidden, n, iters, hc_eps, eps, mixing=mixing, magnitude=magnitude)
        self.ffn_hc = HyperConnection(hidden, n, iters, hc_eps, eps, mixing=mixing, magnitude=magnitude)

    def __call__(self, h: mx.array, mask, cache, tokens: mx.array | None = None) -> mx.array:
        """h [B, T, n, H] -> [B, T, n, H]."""
        by_token = getattr(self.mlp, "by_token", False)
        if by_token and tokens is not None:
            self.mlp.prefetch(tokens)  # its experts are known already: read them while the attention runs
        post, comb, x = self.attn_hc(h)
        h = HyperConnection.merge(post, comb, self.self_attn(self.input_layernorm(x), mask, cache), h)
        post, comb, x = self.ffn_hc(h)
        y = self.post_attention_layernorm(x)
        y = self.mlp(y, tokens) if by_token else self.mlp(y)
        return HyperConnection.merge(post, comb, y, h)


class MeanHead(nn.Module):
    """GLM-5.3-Flash's final collapse of the streams: a plain mean, no weights."""

    def __call__(self, streams: mx.array) -> mx.array:
        return streams.mean(axis=2)


class GroupedRMSNorm(nn.Module):
    """RMSNorm of each stream on its own with one weight [n·H] over all of them (transformers' ``Qwen4ExpTextRMSNorm``
    with ``group_size``); streams [..., n, H]."""

    def __init__(self, n: int, hidden: int, eps: float):
        super().__init__()
        self.n, self.hidden, self.eps = n, hidden, eps
        self.weight = mx.ones((n * hidden,))

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, None, self.eps) * self.weight.reshape(self.n, self.hidden).astype(x.dtype)


class GatedResidual(nn.Module):
    """Qwen3.8-Flash-Next's gated hyper-connections (transformers' ``Qwen4ExpTextGatedResidual``): the streams, each
    RMS-normalised (``hc_norm``), collapse into the block's input as the mean of the normalised streams gated per
    channel by sigmoid(up(silu(down(·) / n))); the block's output goes back into every stream weighted by
    2·sigmoid(``block_inject_weight``(·) / n), the old streams kept as they are. Without ``combine`` (the final
    ``hyper_connection_mixer``) only the collapse."""

    def __init__(self, hidden: int, n: int, rank: int, eps: float, combine: bool = True):
        super().__init__()
        self.n = n
        self.hc_norm = GroupedRMSNorm(n, hidden, eps)
        self.input_mix_weight_down = nn.Linear(n * hidden, rank, bias=False)
        self.input_mix_weight_up = nn.Linear(rank, n * hidden, bias=False)
        if combine:
            self.block_inject_weight = nn.Linear(n * hidden, n, bias=False)

    def __call__(self, streams: mx.array) -> tuple[mx.array, mx.array | None]:
        """streams [B, T, n, H] -> the block's input [B, T, H], the injection weights [B, T, n] (None without
        ``combine``)."""
        B, T, n, H = streams.shape
        normed = self.hc_norm(streams)
        flat = normed.reshape(B, T, n * H)
        mix = mx.sigmoid(self.input_mix_weight_up(nn.silu(self.input_mix_weight_down(flat) / n)))
        collapsed = (mix.reshape(B, T, n, H) * normed).mean(axis=2)
        if "block_inject_weight" not in self:
            return collapsed, None
        return collapsed, 2 * mx.sigmoid(self.block_inject_weight(flat) / n)

    @staticmethod
    def merge(inject: mx.array, out: mx.array, streams: mx.array) -> mx.array:
        """New streams: the old ones plus the block's output [B, T, H] weighted per stream by ``inject``."""
        return streams + inject[..., None] * out[..., None, :]


class HyperLM:
    """Mixin for a ``CausalLM`` whose residual is ``streams`` hyper-connection streams: every stream starts as the
    embedding, and ``model.hc_head`` (a ``HyperHead``) collapses them before the final norm."""

    streams: int

    def embed(self, tokens: mx.array) -> mx.array:
        """[B, T] -> every stream starts as the embedding: [B, T, n, H]."""
        e = super().embed(tokens)
        return mx.broadcast_to(e[:, :, None], (*e.shape[:2], self.streams, e.shape[-1]))

    def head(self, h: mx.array) -> mx.array:
        return super().head(self.model.hc_head(h))
