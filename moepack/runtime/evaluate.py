"""Perplexity of a pack over a text, in sliding windows (``moepack eval``).

The windowing is the one of transformers' perplexity guide (and close to llama.cpp's ``llama-perplexity`` with a
stride): windows of ``context`` tokens start every ``stride`` tokens; each window scores only the tokens that no
earlier window scored, each predicted from up to ``context - 1`` tokens before it. With ``stride == context`` the
windows do not overlap (every token but the first of a window sees a shorter context, as ``llama-perplexity``
does); a smaller stride gives every scored token at least ``context - stride`` tokens of context. Figures are only
comparable at the same tokenizer, context and stride, which the result records.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from moepack.runtime.engine import BaseEngine


@dataclass(frozen=True)
class Window:
    """Tokens ``begin .. end-1`` go through the model; the last ``scored`` of them are scored."""

    begin: int
    end: int
    scored: int


def windows(n_tokens: int, context: int, stride: int) -> Iterator[Window]:
    """Sliding windows over ``n_tokens`` tokens; every token but the first is scored exactly once."""
    if context < 2 or not 1 <= stride <= context:
        raise ValueError(f"need context >= 2 and 1 <= stride <= context (got context {context}, stride {stride})")
    prev_end = 0
    for begin in range(0, max(n_tokens - 1, 1), stride):
        end = min(begin + context, n_tokens)
        scored = min(end - prev_end, end - begin - 1)
        if scored > 0:
            yield Window(begin, end, scored)
        prev_end = end
        if end == n_tokens:
            break


def token_nll(logits: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """Negative log-likelihood of each target under float32 logits [N, vocab], in float64."""
    x = logits.astype(np.float64)
    top = x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(x - top).sum(axis=-1)) + top[:, 0]
    return lse - x[np.arange(len(targets)), np.asarray(targets)]


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    scored_tokens: int
    text_tokens: int
    context: int
    stride: int
    windows: int
    seconds: float
    tokens_per_s: float  # tokens through the model (window overlap included) per second
    bytes_read: int  # expert bytes read from the pack
    bytes_per_token: float

    def as_dict(self) -> dict:
        return asdict(self)


def perplexity(engine: BaseEngine, ids: Sequence[int], context: int = 512, stride: int | None = None) -> Perplexity:
    """Perplexity of ``engine`` over ``ids`` in sliding windows of ``context`` tokens every ``stride`` (default
    ``context // 2``). Each window is one fresh sequence (no cache carried between windows)."""
    ids = [int(t) for t in ids]
    stride = stride or max(1, context // 2)
    if len(ids) < 2:
        raise ValueError("the text has fewer than 2 tokens: nothing to score")
    read0 = engine.stats().get("bytes_read", 0)
    total, scored, through, n_windows = 0.0, 0, 0, 0
    t0 = time.perf_counter()
    for w in windows(len(ids), context, stride):
        chunk = ids[w.begin:w.end]
        logits = engine.forward(chunk, None, "all")  # [len(chunk), vocab]
        pred = logits[len(chunk) - 1 - w.scored: len(chunk) - 1]
        total += float(token_nll(pred, chunk[len(chunk) - w.scored:]).sum())
        scored += w.scored
        through += len(chunk)
        n_windows += 1
    seconds = time.perf_counter() - t0
    read = engine.stats().get("bytes_read", 0) - read0
    nll = total / scored
    return Perplexity(perplexity=math.exp(nll), nll=nll, scored_tokens=scored, text_tokens=len(ids), context=context,
                      stride=stride, windows=n_windows, seconds=seconds, tokens_per_s=through / max(seconds, 1e-9),
                      bytes_read=read, bytes_per_token=read / max(through, 1))
