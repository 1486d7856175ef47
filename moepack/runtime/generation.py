"""The generation loop, the one every caller uses (``Engine.generate``, the CLI, ``moepack chat``, the server, a
pipeline's rank 0), built from two named steps over the engine interface (runtime/engine.py):

- :func:`prefill`: the whole prompt (or its uncached part) through the model, layer by layer; logits of its last token.
- :func:`decode`: one sampled token through the model; its logits.
- :class:`Generation`: one request's token loop over a KV cache, advanced a token at a time so a scheduler can
  interleave requests, stop one early (``close()``) or survive an interruption (``settle()``).
- :class:`PromptCache`: KV caches of recent sequences; a prompt that starts with one of them (the next turn
  of a conversation, a shared system prompt) only prefills what is new.
- :class:`TextStream`: token ids to text deltas, ending at the first stop string and never emitting it.

Engine interface used here: ``make_cache()`` -> list of caches with ``offset``/``trim(n)``, and
``forward(ids, cache, logits="last")`` -> float32 logits [1, vocab] of the last position.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from moepack.runtime.sampling import Sampled, Sampler, SamplingParams
from moepack.runtime.tokenizer import StreamDecoder, Tokenizer

log = logging.getLogger(__name__)


def context_length(config: dict) -> int:
    """The model's context in tokens (``max_position_embeddings``; 4096 when the config gives none)."""
    return int(config.get("max_position_embeddings") or 4096)


def fit_to_context(n_prompt: int, max_tokens: int, context: int) -> int:
    """How many tokens may follow a prompt of ``n_prompt`` within ``context``: ``max_tokens`` or fewer; a prompt
    that fills the context already is a UsageError."""
    from moepack.errors import UsageError

    if n_prompt == 0:
        raise UsageError("the prompt has no tokens: nothing to continue")
    if n_prompt >= context:
        raise UsageError(f"the prompt is {n_prompt} tokens, but the model's context holds {context}; shorten it")
    return min(max_tokens, context - n_prompt)


def prefill(engine: Any, prompt: Sequence[int], cache: list) -> np.ndarray:
    """The prompt step: ``prompt`` appended to ``cache`` in one pass (all tokens through a layer before the next, so
    each expert the prompt needs is read once per layer); float32 logits [vocab] of its last token."""
    return engine.forward(prompt, cache, "last")[-1]


def decode(engine: Any, token: int, cache: list) -> np.ndarray:
    """The decode step: one token appended to ``cache``; float32 logits [vocab] for the next."""
    return engine.forward([token], cache, "last")[-1]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def trim_to(cache: list, n: int) -> None:
    """Make every layer's cache hold exactly its first ``n`` positions (layers may be ahead after an interrupt)."""
    for c in cache:
        if c.offset > n:
            c.trim(c.offset - n)


class PromptCache:
    """Up to ``size`` KV caches keyed by the token sequence they hold, most recently used last.

    ``take`` hands a cache out (it is mutated by the generation that uses it) and ``put`` gives it back, so
    two concurrent requests never share one.
    """

    def __init__(self, size: int = 2):
        self.size = size
        self.entries: list[tuple[list[int], list]] = []

    def take(self, prompt: Sequence[int], make_cache) -> tuple[list, int]:
        """A cache holding the longest cached prefix of ``prompt`` (at most all but its last token) and its length."""
        best, best_n = None, 0
        for i, (tokens, _) in enumerate(self.entries):
            n = min(common_prefix(tokens, prompt), len(prompt) - 1)  # the last token is always fed: it gives logits
            if n > best_n:
                best, best_n = i, n
        if best is None:
            return make_cache(), 0
        _, cache = self.entries.pop(best)
        # a recurrent (linear-attention) state rewinds only to its snapshot (the end of the cached prompt)
        best_n = min([best_n] + [c.rewind_point(best_n) for c in cache if hasattr(c, "rewind_point")])
        trim_to(cache, best_n)
        if best_n == 0 or any(c.offset != best_n for c in cache):
            return make_cache(), 0
        return cache, best_n

    def put(self, tokens: Sequence[int], cache: list) -> None:
        if self.size <= 0 or not tokens or any(c.offset != len(tokens) for c in cache):
            return
        self.entries.append((list(tokens), cache))
        del self.entries[: -self.size]

    def clear(self) -> None:
        self.entries.clear()


class Generation:
    """Prefill the uncached part of ``prompt`` into ``cache``, then sample up to ``max_tokens`` tokens.

    Iterate to get :class:`Sampled` tokens. ``tokens`` always lists exactly what ``cache`` holds once
    ``settle()`` has run, so the cache can be kept (for the next turn) whatever stopped the loop.
    ``finish_reason`` is "stop" (a stop token, or a ``constraint`` whose grammar is complete), "length"
    (``max_tokens``) or None (stopped from outside).

    ``constraint``: a grammar the reply must follow (serve/constrain.py): ``start()`` is called before each forward
    pass so its mask is computed while the pass runs, ``allowed(n)`` gives the mask, ``accept(token)`` advances it
    and ``done`` says the grammar is complete.
    """

    def __init__(self, engine: Any, prompt: Sequence[int], max_tokens: int, params: SamplingParams = SamplingParams(),
                 stop_tokens: Sequence[int] = (), cache: list | None = None, reused: int = 0,
                 constraint: Any = None):
        if not prompt:
            raise ValueError("generation needs at least one prompt token")
        if not 0 <= reused < len(prompt):
            raise ValueError(f"reused={reused} must leave at least one of {len(prompt)} prompt tokens to prefill")
        self.engine = engine
        self.prompt = list(prompt)
        self.max_tokens = max_tokens
        self.sampler = Sampler(params, self.prompt)
        self.stop_tokens = set(stop_tokens)
        self.cache = cache if cache is not None else engine.make_cache()
        self.reused = reused
        self.tokens = self.prompt[:reused]  # what the cache holds
        self.generated: list[int] = []
        self.finish_reason: str | None = None
        self.constraint = constraint

    def __iter__(self) -> Iterator[Sampled]:
        if self.max_tokens <= 0:
            self.finish_reason = "length"
            return
        self.begin()
        last = prefill(self.engine, self.prompt[self.reused :], self.cache)
        self.tokens = list(self.prompt)
        while True:
            s = self.sample(last)
            yield s
            if self.finish_reason:
                return
            self.begin()
            last = decode(self.engine, s.token, self.cache)
            self.tokens.append(s.token)

    def begin(self) -> None:
        """Before a forward pass: the grammar's mask for its position starts computing meanwhile."""
        if self.constraint is not None:
            self.constraint.start()

    def sample(self, logits: np.ndarray) -> Sampled:
        """The next token from the logits of the last pass (masked by the grammar), and whether that ends it."""
        c = self.constraint
        s = self.sampler(logits, c.allowed(logits.shape[-1]) if c is not None else None)
        if c is not None:
            c.accept(s.token)
        self.generated.append(s.token)
        if s.token in self.stop_tokens or (c is not None and c.done):
            self.finish_reason = "stop"
        elif len(self.generated) >= self.max_tokens:
            self.finish_reason = "length"
        return s

    def settle(self) -> None:
        """Trim the cache back to ``tokens`` (after an exception or KeyboardInterrupt inside a forward pass)."""
        trim_to(self.cache, len(self.tokens))


def held_back(text: str, markers: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is a proper prefix of one of ``markers`` (may still become it)."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:k]):
                best = k
                break
    return best


class TextStream:
    """Detokenize a stream of ids into text deltas; stop at the first stop string, which is not emitted."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True):
        self.decoder = StreamDecoder(tokenizer, skip_special_tokens)
        self.stop = [s for s in stop if s]
        self.pending = ""  # decoded, not yet emitted: it may be the start of a stop string
        self.text = ""  # everything emitted
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        return self._emit(self.decoder.push(token), final=False)

    def flush(self) -> str:
        if self.stopped:
            return ""
        return self._emit(self.decoder.flush(), final=True)

    def _emit(self, piece: str, final: bool) -> str:
        buf = self.pending + piece
        hits = [i for i in (buf.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.pending, self.stopped = buf[: min(hits)], "", True
        else:
            keep = 0 if final else held_back(buf, self.stop)
            out, self.pending = buf[: len(buf) - keep], buf[len(buf) - keep :]
        self.text += out
        return out


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
