"""Choosing the next token: penalties, temperature, top-k / top-p / min-p, seeded draws and log-probabilities.

The order follows what OpenAI-compatible servers (vLLM, llama.cpp) do, so the same request means the same
thing here: penalties on the raw logits, then temperature, then the truncations, then one draw. The
repetition penalty (divide positive logits, multiply negative ones, as transformers) sees the prompt and the
output; presence and frequency penalties (subtracted, as OpenAI defines them) see only the output.
Log-probabilities are those of the model's own distribution, before any of this processing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or negative: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logprobs: int | None = None  # None: none; 0: the chosen token's; n: also the n most likely


# The ranges a user may give, the server's (OpenAI's) own: option -> (low, high, low exclusive).
RANGES = {"temperature": (0.0, 2.0, False), "top_p": (0.0, 1.0, True), "top_k": (-1, 1 << 31, False),
          "max_tokens": (1, 1 << 31, False)}


def check_options(**values: float | int | None) -> None:
    """Refuse sampling options out of RANGES (NaN included) with a UsageError naming the option as ``--flag``."""
    import math

    from moepack.errors import UsageError

    for name, v in values.items():
        if v is None:
            continue
        lo, hi, open_low = RANGES[name]
        ok = math.isfinite(v) and (lo < v if open_low else lo <= v) and v <= hi
        if not ok:
            flag = "--" + {"temperature": "temp"}.get(name, name).replace("_", "-")
            span = f"({lo}, {hi}]" if open_low else f"[{lo}, {hi}]"
            raise UsageError(f"{flag} {v} is out of range {span}")


@dataclass
class Sampled:
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)  # (token, logprob), most likely first


def log_softmax(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.float64)
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


class Sampler:
    """Stateful per request: owns the seeded generator and the counts of tokens generated so far."""

    def __init__(self, params: SamplingParams, prompt: Sequence[int] = ()):
        self.params = params
        seed = None if params.seed is None else params.seed & 0xFFFFFFFFFFFFFFFF
        self.rng = np.random.default_rng(seed)
        self.seen = np.array(sorted(set(prompt)), dtype=np.int64)  # for the repetition penalty
        self.counts: Counter[int] = Counter()  # generated tokens, for presence/frequency penalties

    def penalize(self, logits: np.ndarray) -> np.ndarray:
        p = self.params
        z = logits.astype(np.float64, copy=True)
        if p.repetition_penalty != 1.0:
            ids = np.union1d(self.seen, np.fromiter(self.counts, dtype=np.int64, count=len(self.counts)))
            ids = ids[ids < z.size]
            v = z[ids]
            with np.errstate(over="ignore"):  # inf for a penalty near 0; probs() caps it
                z[ids] = np.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        if self.counts and (p.presence_penalty or p.frequency_penalty):
            ids = np.fromiter(self.counts.keys(), dtype=np.int64, count=len(self.counts))
            n = np.fromiter(self.counts.values(), dtype=np.float64, count=len(self.counts))
            keep = ids < z.size
            z[ids[keep]] -= p.presence_penalty + p.frequency_penalty * n[keep]
        return z

    def probs(self, z: np.ndarray) -> np.ndarray:
        """Temperature, then top-k, then top-p (nucleus), then min-p: the distribution a draw is made from."""
        p = self.params
        z = np.minimum(z, np.finfo(np.float64).max)  # a repetition penalty near 0 can make a logit inf
        with np.errstate(over="ignore"):  # shifted first: a tiny temperature gives -inf, never inf - inf = NaN
            z = (z - z.max()) / p.temperature
        if 0 < p.top_k < z.size:
            kth = np.partition(z, -p.top_k)[-p.top_k]
            z = np.where(z < kth, -np.inf, z)
        q = np.exp(z - z.max())
        q /= q.sum()
        if p.top_p < 1.0:
            order = np.argsort(-q, kind="stable")
            csum = np.cumsum(q[order])
            keep = order[: int(np.searchsorted(csum, p.top_p) + 1)]
            mask = np.zeros_like(q)
            mask[keep] = q[keep]
            q = mask / mask.sum()
        if p.min_p > 0.0:
            q = np.where(q >= p.min_p * q.max(), q, 0.0)
            q /= q.sum()
        return q

    def __call__(self, logits: np.ndarray, allowed: np.ndarray | None = None) -> Sampled:
        """Draw the next token; ``allowed`` (boolean [vocab], from a grammar) removes every other token before the
        penalties and truncations. Log-probabilities stay the model's own."""
        z = self.penalize(logits)
        if allowed is not None and allowed.any():  # a grammar in an error state allows nothing: ignored
            z[~allowed] = -np.inf
        if self.params.temperature <= 0:
            tok = int(np.argmax(z))
        else:
            q = self.probs(z)
            tok = int(self.rng.choice(q.size, p=q))
        self.counts[tok] += 1
        out = Sampled(tok)
        if self.params.logprobs is not None:
            lp = log_softmax(logits)
            out.logprob = float(lp[tok])
            n = self.params.logprobs
            if n > 0:
                top = np.argsort(-lp, kind="stable")[:n]
                out.top = [(int(i), float(lp[i])) for i in top]
        return out
