"""Several sequences decoded together: one step runs every active sequence through each layer before the next
layer starts, so an expert that several of them route to is read once per layer per step, not once per sequence.

- :func:`forward_rows`: one step. Each sequence (a row) keeps its own KV cache at its own offset, so attention runs
  row by row; the MoE block runs once for all the rows that decode a token: the union of the experts they route to
  is acquired at once (each read once) and every (token, choice) pair is computed as a lone token's pair is. A
  prompt chunk in the batch runs its MoE block as a prompt does. Every row computes exactly what it would alone
  (same kernels, same order), so a request's output never depends on what runs beside it.
- :class:`Stepper`: drives one :class:`~moepack.runtime.generation.Generation` a forward pass at a time: its prompt
  in chunks (so a long prompt joining the batch does not stall the others for its whole length), then a token per
  step.

An engine without the model in this process (a pipeline over several hosts) runs the rows one after another.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import mlx.core as mx
import numpy as np

from moepack.runtime.generation import Generation
from moepack.runtime.models.base import DecoderLayer
from moepack.runtime.models.cache import Causal
from moepack.runtime.models.moe import MoE
from moepack.runtime.sampling import Sampled


def batchable(engine: Any) -> bool:
    """Whether ``engine`` runs its whole model here (an :class:`~moepack.runtime.engine.Engine` of one stage) and its
    layers are plain decoder layers (:class:`DecoderLayer`: a mixer, then an MLP or an MoE block routed by the hidden
    state), whose halves this module runs. Other models (hyper-connection streams, layers that hand things on, token
    routing, sandwich norms, shortcut MoE) step each request alone: the same output, without shared reads."""
    stage, m = getattr(engine, "stage", None), getattr(engine, "model", None)
    if m is None or stage is None or stage.count != 1:
        return False
    if getattr(m, "streams", 1) != 1 or getattr(m, "routes_by_token", False) or getattr(m, "relay", None) is not None:
        return False
    return all(type(layer) is DecoderLayer and not layer.sandwich
               and (not isinstance(layer.mlp, MoE) or layer.mlp.batchable) for layer in m.model.layers)


def _moe_decoding(layer: Any, hs: list[mx.array]) -> list[mx.array]:
    """The MoE half of a layer for rows that each decode one token: the routed experts of all rows in one call (the
    union of their experts acquired at once, each read once; every (token, choice) pair computed as a lone token's
    pair is), the router and the shared expert row by row, as each row alone runs them."""
    moe: MoE = layer.mlp
    xs = [layer.post_attention_layernorm(h).reshape(-1, h.shape[-1]) for h in hs]  # each [1, H]
    routes = [moe.router(x) for x in xs]
    flat = mx.concatenate(xs)
    inds = mx.concatenate([i for i, _ in routes])
    w = mx.concatenate([w.astype(x.dtype) for (_, w), x in zip(routes, xs)])
    y = moe.experts(flat, inds, w, decode=True)  # [N, H]
    return [h + moe.add_shared(x, y[r : r + 1]).reshape(h.shape) for r, (h, x) in enumerate(zip(hs, xs))]


def forward_rows(engine: Any, rows: Sequence[tuple[list[int], list]]) -> list[np.ndarray]:
    """One step for a batch: each row's ``ids`` appended to its own ``cache``; float32 logits [vocab] of each row's
    last position."""
    if not batchable(engine) or len(rows) == 1:
        return [engine.forward(ids, cache, "last")[-1] for ids, cache in rows]
    t0, io0 = time.perf_counter(), engine.store.counters.io_wait_s
    m = engine.model
    hs = [m.embed(mx.array([ids], dtype=mx.int32)) for ids, _ in rows]  # each [1, T_r, H]
    for i, layer in enumerate(m.model.layers):
        window, chunk = layer.sliding_window, layer.attention_chunk
        hs = [layer.mix(h, Causal(cache[i].offset, window, chunk), cache[i]) for h, (_, cache) in zip(hs, rows)]
        one = [r for r, h in enumerate(hs) if h.shape[1] == 1] if isinstance(layer.mlp, MoE) else []
        if len(one) > 1:  # the decoding rows' experts together
            for r, h in zip(one, _moe_decoding(layer, [hs[r] for r in one])):
                hs[r] = h
            mx.eval([hs[r] for r in one])  # computed now: the next rows' experts may take these slots
        for r, h in enumerate(hs):
            if len(one) < 2 or r not in one:  # a prompt chunk (or a dense layer): as alone
                hs[r] = layer.feed_forward(h)
                mx.eval(hs[r])
    outs = [m.head(h[:, -1:]).astype(mx.float32) for h in hs]
    mx.eval(outs)
    engine.compute_s += time.perf_counter() - t0 - (engine.store.counters.io_wait_s - io0)
    engine.tokens_processed += sum(len(ids) for ids, _ in rows)
    return [np.array(o[0, -1]) for o in outs]


class Stepper:
    """One generation advanced a forward pass at a time: ``ids()`` to feed, then ``absorb(logits)``, which
    returns the sampled token once the prompt is in (None after a prompt chunk that is not its last)."""

    def __init__(self, gen: Generation, chunk: int | None = None):
        self.gen = gen
        self.chunk = chunk  # prompt tokens per step (None: the whole prompt, in passes of the engine's max_pass)
        self.fed = gen.reused  # prompt tokens in the cache
        self.last: int | None = None  # the sampled token still to feed

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.gen.prompt)

    def ids(self) -> list[int]:
        if not self.prefilling:
            return [self.last]
        n = min(self.chunk or len(self.gen.prompt), getattr(self.gen.engine, "max_pass", 1 << 30))
        return self.gen.prompt[self.fed : self.fed + n]

    def samples_next(self) -> bool:
        """Whether the coming pass ends with a draw (then its grammar mask starts computing meanwhile)."""
        return not self.prefilling or self.fed + len(self.ids()) >= len(self.gen.prompt)

    def absorb(self, logits: np.ndarray) -> Sampled | None:
        g = self.gen
        if self.prefilling:
            self.fed += len(self.ids())
            g.tokens = g.prompt[: self.fed]
            if self.prefilling:
                return None
        else:
            g.tokens.append(self.last)
        s = g.sample(logits)
        self.last = s.token
        return s
