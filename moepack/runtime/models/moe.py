"""The MoE block: a router picks each token's experts, the routed experts stream from the expert store, and an
optional shared expert runs on every token.

One block serves every family; what differs is the router module (softmax top-k, grouped sigmoid, top-k logits
then softmax (gpt-oss) or sigmoid (Llama 4)), the expert activation, and whether routing weights scale the experts'
outputs or, as Llama 4's do, their inputs. Output never depends on the memory budget: the experts a layer needs are split
into pool-sized batches of whole experts (:func:`plan_batches`), and each (token, choice) pair is computed the same
way whichever batch it falls in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from moepack.runtime import kernels
from moepack.runtime.kernels import compute_streams, on_stream

# ---- routing ---------------------------------------------------------------------------------


def topk(scores: mx.array, k: int) -> mx.array:
    """Indices of the k largest scores along the last axis, largest first (as torch.topk orders them)."""
    return mx.argsort(-scores, axis=-1)[..., :k]


def route_softmax(logits: mx.array, k: int, renormalize: bool) -> tuple[mx.array, mx.array]:
    """Softmax over all experts, then top-k, then optionally renormalise (Mixtral, Qwen, OLMoE)."""
    probs = mx.softmax(logits.astype(mx.float32), axis=-1)
    inds = topk(probs, k)
    w = mx.take_along_axis(probs, inds, axis=-1)
    if renormalize:
        w = w / w.sum(axis=-1, keepdims=True)
    return inds, w


def route_grouped(scores: mx.array, k: int, bias: mx.array | None = None, n_group: int = 1, topk_group: int = 1,
                  group_score: str = "top2", renormalize: bool = True, scaling: float = 1.0) -> tuple[mx.array, mx.array]:
    """Group-limited top-k (DeepSeek, GLM, MiniMax): select on ``scores + bias``, weigh by ``scores``.

    ``group_score``: "top2" sums each group's two best (DeepSeek-V3, GLM), "max" takes its best (DeepSeek-V2).
    """
    choice = scores if bias is None else scores + bias
    if n_group > 1 and topk_group < n_group:
        N, E = choice.shape
        g = choice.reshape(N, n_group, E // n_group)
        gs = mx.sort(g, axis=-1)[..., -2:].sum(axis=-1) if group_score == "top2" else g.max(axis=-1)
        keep = topk(gs, topk_group)  # [N, topk_group]
        gmask = mx.put_along_axis(mx.zeros((N, n_group), dtype=mx.bool_), keep, mx.array(True), axis=-1)
        # -inf, as transformers masks: with a correction bias, kept scores can be negative
        choice = mx.where(mx.repeat(gmask, E // n_group, axis=-1), choice, mx.array(-math.inf, choice.dtype))
    inds = topk(choice, k)
    w = mx.take_along_axis(scores, inds, axis=-1)
    if renormalize:
        w = w / (w.sum(axis=-1, keepdims=True) + 1e-20)
    return inds, w * scaling


class SoftmaxRouter(nn.Linear):
    """Router weight [E, H]; softmax over all experts, top-k, optionally renormalised (Mixtral, Qwen, OLMoE)."""

    float32 = True  # the engine keeps router weights float32, as transformers does: near-ties stay ties

    def __init__(self, hidden: int, n_experts: int, top_k: int, renormalize: bool):
        super().__init__(hidden, n_experts, bias=False)
        self.top_k, self.renormalize = top_k, renormalize

    def __call__(self, flat: mx.array) -> tuple[mx.array, mx.array]:
        """[N, H] -> expert ids [N, K] and weights [N, K]."""
        return route_softmax(kernels.linear(self, flat), self.top_k, self.renormalize)


SCORES = {"sigmoid": mx.sigmoid, "softmax": lambda logits: mx.softmax(logits, axis=-1),
          "sqrtsoftplus": lambda logits: mx.sqrt(nn.softplus(logits))}  # DeepSeek V4


class TopKLogitsRouter(nn.Linear):
    """Router weight (and bias) -> top-k logits -> weights from those k alone: softmax over them (gpt-oss) or each
    one's sigmoid (Llama 4)."""

    def __init__(self, hidden: int, n_experts: int, top_k: int, bias: bool = False, weigh: str = "softmax"):
        super().__init__(hidden, n_experts, bias=bias)
        self.top_k, self.weigh = top_k, SCORES[weigh]

    def __call__(self, flat: mx.array) -> tuple[mx.array, mx.array]:
        """[N, H] -> expert ids [N, K] and weights [N, K]."""
        logits = kernels.linear(self, flat).astype(mx.float32)  # [N, E]
        inds = topk(logits, self.top_k)
        return inds, self.weigh(mx.take_along_axis(logits, inds, axis=-1))


class GroupedRouter(nn.Module):
    """Sigmoid- (or softmax-) scored, optionally group-limited routing with a selection-only
    ``e_score_correction_bias`` [E] (DeepSeek-V3, GLM-4.5, MiniMax-M2). Logits in float32.

    ``score="softmax", group_score="max", correction_bias=False, renormalize=False`` is DeepSeek-V2's router.
    ``softcap``: logits pass through softcap·tanh(logits / softcap) first (Laguna).
    """

    float32 = True

    def __init__(self, hidden: int, n_experts: int, top_k: int, *, n_group: int = 1, topk_group: int = 1,
                 renormalize: bool = True, scaling: float = 1.0, correction_bias: bool = True,
                 score: str = "sigmoid", group_score: str = "top2", softcap: float | None = None):
        super().__init__()
        self.softcap = softcap or None
        self.weight = mx.zeros((n_experts, hidden))
        if correction_bias:
            self.e_score_correction_bias = mx.zeros((n_experts,))
        self.top_k, self.n_group, self.topk_group = top_k, n_group, topk_group
        self.renormalize, self.scaling = renormalize, scaling
        self.score, self.group_score = SCORES[score], group_score

    def scores(self, flat: mx.array) -> mx.array:
        """[N, H] -> float32 scores [N, E] (logits soft-capped first where the family caps them)."""
        logits = kernels.matmul_nt(flat.astype(mx.float32), self.weight.astype(mx.float32))  # [N, E]
        if self.softcap:
            logits = mx.tanh(logits / self.softcap) * self.softcap
        return self.score(logits)

    def __call__(self, flat: mx.array) -> tuple[mx.array, mx.array]:
        scores = self.scores(flat)  # [N, E]
        return route_grouped(scores, self.top_k, self.get("e_score_correction_bias"), self.n_group, self.topk_group,
                             self.group_score, self.renormalize, self.scaling)


class HashRouter(GroupedRouter):
    """Hash routing (DeepSeek V4's first layers): a fixed token id -> experts table ``tid2eid`` [vocab, K] picks
    the experts; the learned ``weight`` only weighs them (scores of the picked experts, renormalised and scaled).

    The experts are known from the token ids before the layer runs, so the layer's reads can start early
    (``MoE.prefetch``), and exactly: no guess, no wasted read.
    """

    by_token = True  # MoE passes the token ids

    def __init__(self, hidden: int, n_experts: int, top_k: int, vocab: int, *, scaling: float = 1.0,
                 score: str = "sigmoid"):
        super().__init__(hidden, n_experts, top_k, scaling=scaling, correction_bias=False, score=score)
        self.tid2eid = mx.zeros((vocab, top_k), dtype=mx.int32)

    def experts(self, tokens: mx.array) -> mx.array:
        """Token ids [...] -> expert ids [N, K]."""
        return self.tid2eid[tokens.reshape(-1)]

    def __call__(self, flat: mx.array, tokens: mx.array) -> tuple[mx.array, mx.array]:
        inds = self.experts(tokens)
        w = mx.take_along_axis(self.scores(flat), inds, axis=-1)
        return inds, w / (w.sum(axis=-1, keepdims=True) + 1e-20) * self.scaling


# ---- routed experts, streamed ----------------------------------------------------------------


@dataclass
class Batch:
    """Whole experts that fit in the pool at once, and the (token, choice) pairs they serve."""

    experts: np.ndarray  # expert ids, ascending
    rows: np.ndarray  # pairs per expert
    pairs: np.ndarray  # flat pair indices (token * K + choice), grouped by expert in ``experts`` order


def plan_batches(ids: np.ndarray, capacity: int, below: int | None = None) -> list[Batch]:
    """Expert id of every (token, choice) pair [P] -> pool-sized batches of whole experts, in ascending expert order.

    Concatenating the batches' ``pairs`` gives a stable sort of the pairs by expert (``np.argsort(order)`` undoes it).
    ``below``: only ids below it are stored experts; pairs with larger ids (zero experts) are in no batch.
    """
    live = np.arange(len(ids)) if below is None else np.flatnonzero(ids < below)
    order = live[np.argsort(ids[live], kind="stable")]
    experts, rows = np.unique(ids[live], return_counts=True)
    out, p = [], 0
    for a in range(0, len(experts), max(1, capacity)):
        e, r = experts[a : a + capacity], rows[a : a + capacity]
        out.append(Batch(e, r, order[p : p + int(r.sum())]))
        p += int(r.sum())
    return out


# Experts whose weights are dequantized together on the CPU prompt path (their float32 copies are held at once:
# 3 matrices each, e.g. 3 x 6 MiB for a 768 x 2048 expert).
DEQUANT_GROUP = 2


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.silu(gate) * up


def swiglu_numpy(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """``swiglu`` on float32 numpy arrays, in place in ``gate`` (the CPU prompt path: MLX's CPU elementwise ops cost
    more than the conversions they would need)."""
    with np.errstate(over="ignore"):  # exp(-g) overflows to inf for very negative g: silu is then -0, as in MLX
        s = np.exp(-gate)
    s += 1
    np.divide(gate, s, out=gate)
    gate *= up
    return gate


NUMPY_ACTIVATIONS = {swiglu: swiglu_numpy}


def geglu(gate: mx.array, up: mx.array) -> mx.array:
    """GELU-gated (tanh approximation, transformers' ``gelu_pytorch_tanh``): Gemma 4's MLPs and experts."""
    return nn.gelu_approx(gate) * up


def clamped_silu(limit: float) -> Callable[[mx.array, mx.array], mx.array]:
    """SwiGLU with clamped pre-activations (DeepSeek V4): silu(min(gate, limit)) · clip(up, -limit, limit)."""

    def act(gate: mx.array, up: mx.array) -> mx.array:
        return nn.silu(mx.minimum(gate, limit)) * mx.clip(up, -limit, limit)

    return act


class StreamedExperts:
    """Computes the routed experts of one layer from the store's slot pool.

    ``zero_from``: router ids from this one on are zero-computation experts (LongCat-Flash): each returns its input,
    weighted, and costs no weights and no read.
    """

    def __init__(self, store, layer: int, activation: Callable[[mx.array, mx.array], mx.array] = swiglu,
                 zero_from: int | None = None):
        self.store = store
        self.layer = layer
        self.activation = activation
        self.zero_from = zero_from
        # Set by the engine: the next MoE layer and its router, to guess that layer's experts from this layer's
        # input and read them while this layer computes (decode only; a wrong guess costs a read, never a
        # different output, since misses are still read exactly).
        self.next_layer: int | None = None
        self.predict: Callable | None = None

    def _project(self, x: mx.array, name: str, slots: mx.array, grouped: bool = False) -> mx.array:
        # x: [P, 1, D_in]; slots: [P] -> [P, 1, D_out], plus the expert's bias [D_out] where the pack has one (gpt-oss)
        # grouped: slots are sorted, so MLX may run each slot's rows as one matmul (its GPU kernels do)
        rec, parts = self.store.records[name], self.store.pool[name]
        if rec.encoding != "raw":  # affine or mxfp4: MLX quantization modes of the same name
            y = mx.gather_qmm(x, parts["weight"], parts["scales"], parts.get("biases"), rhs_indices=slots,
                              transpose=True, group_size=rec.group_size, bits=rec.bits, mode=rec.encoding,
                              sorted_indices=grouped)
        else:  # a transposed view of the pool: gather_mm indexes slots in place, no per-pair weight copies
            y = mx.gather_mm(x, parts["data"].swapaxes(-1, -2), rhs_indices=slots, sorted_indices=grouped)
        bias = self.store.pool.get(name + "_bias")
        return y if bias is None else y + bias["data"][slots][:, None, :]

    def _pairs(self, xs: mx.array, slots: mx.array, grouped: bool = False) -> mx.array:
        """xs [P, 1, H], slots [P] -> [P, 1, H]: each pair its own 1-row matmul, the pairs split over the CPU
        compute streams (MLX's CPU back end runs each quantized matmul on one thread), so the result is the same
        whatever the split."""
        streams = compute_streams()
        P = xs.shape[0]
        n = min(len(streams), P)
        outs = []
        for i in range(n):
            a, b = i * P // n, (i + 1) * P // n
            with on_stream(streams[i]):
                x, s = xs[a:b], slots[a:b]
                h = self.activation(self._project(x, "gate", s, grouped), self._project(x, "up", s, grouped))
                outs.append(self._project(h, "down", s, grouped))
        return mx.concatenate(outs, axis=0) if n > 1 else outs[0]

    def capacity(self, ids: np.ndarray, decode: bool) -> int:
        """Experts per batch for the (token, choice) pairs' expert ids ``ids``: the whole pool when decoding; for a
        prompt whose experts do not fit at once, half of it (two batches fit: one reads while one computes)."""
        n = self.store.n_slots
        return n if decode or len(np.unique(self._stored(ids))) <= n or n < 2 else n // 2

    def _stored(self, ids: np.ndarray) -> np.ndarray:
        """The ids of stored experts among ``ids`` (zero experts cost no read)."""
        return ids if self.zero_from is None else ids[ids < self.zero_from]

    def first_batch(self, inds: np.ndarray) -> np.ndarray:
        """The experts (ascending) the first batch of a call with expert ids ``inds`` [N, K] will read."""
        ids = inds.reshape(-1)
        return np.unique(self._stored(ids))[: self.capacity(ids, decode=inds.shape[0] == 1)]

    def __call__(self, x: mx.array, inds: mx.array, weights: mx.array, decode: bool | None = None) -> mx.array:
        """x [N, H], inds [N, K] expert ids, weights [N, K] -> [N, H]. ``decode``: every row is one sequence's next
        token (a batch of sequences, runtime/batch.py): each (token, choice) pair computed as a lone token's is;
        default: only when N is 1, else the prompt path."""
        decode = inds.shape[0] == 1 if decode is None else decode
        y = self._decode(x, inds, weights) if decode else self._prompt(x, inds, weights)
        if self.zero_from is None:
            return y
        zero_w = mx.where(inds >= self.zero_from, weights, mx.array(0, weights.dtype)).sum(axis=-1, keepdims=True)
        return y + x * zero_w  # [N, H]: the zero experts' identity outputs, weighted

    def _ids(self, inds: mx.array) -> tuple[np.ndarray, bool]:
        """Host copy of the flat expert ids, and whether any is a stored expert (not a zero expert)."""
        ids = np.array(inds).reshape(-1)  # host sync: the store must know which experts to read
        return ids, len(self._stored(ids)) > 0

    def _decode(self, x: mx.array, inds: mx.array, weights: mx.array) -> mx.array:
        """One token: each (token, choice) pair its own 1-row matmul. The experts already cached compute while the
        missing ones are read; the next layer's experts may be guessed and read early (``predict``)."""
        N, K = inds.shape
        guess = self.predict(x)[0] if self.predict is not None and self.store.prefetching else None
        # x too: the previous layer's experts must be computed before their slots may be reused (a hash router's
        # inds do not depend on x, so evaluating them alone would not force it)
        mx.eval(x, inds) if guess is None else mx.eval(x, inds, guess)
        ids, stored = self._ids(inds)
        if not stored:
            return mx.zeros_like(x)
        batches = plan_batches(ids, self.capacity(ids, decode=True), self.zero_from)
        pairs, outs = [], []
        for b in batches:
            keys = self.store.acquire(self.layer, b.experts)
            if guess is not None:
                g = np.array(guess).reshape(-1)
                self.store.prefetch(self.next_layer, (g[g < self.zero_from] if self.zero_from else g).tolist())
            pend = self.store.pending(keys)
            late = np.repeat([k in pend for k in keys], b.rows)
            slots = np.repeat(self.store.slots(keys), b.rows).astype(np.uint32)
            for part in (~late, late):
                p = b.pairs[part]
                if not len(p):
                    continue
                if part is late:
                    if outs:
                        mx.eval(outs[-1])  # compute the cached experts while the missing ones are read...
                    self.store.wait(keys)  # ...then wait for those
                pairs.append(p)
                outs.append(self._pairs(x[mx.array(p // K)][:, None, :], mx.array(slots[part]))[:, 0, :])
            if b is not batches[-1]:
                mx.eval(outs[-1])  # the next batch may reuse these slots
        y = mx.concatenate(outs, axis=0) if len(outs) > 1 else outs[0]
        order = np.concatenate(pairs)
        if len(order) < N * K:  # zero experts' pairs: zero rows here (__call__ adds their identity outputs)
            y = mx.zeros((N * K, y.shape[-1]), y.dtype).at[mx.array(order)].add(y)
        else:
            y = y[mx.array(np.argsort(order, kind="stable"))]  # back to pair order
        return (y.reshape(N, K, -1) * weights[..., None].astype(y.dtype)).sum(axis=1)

    def _prompt(self, x: mx.array, inds: mx.array, weights: mx.array) -> mx.array:
        """Many tokens, expert by expert: every row routed to an expert in one matmul per projection, each expert read
        at most once. While one batch of experts computes, the next batch is read into the other half of the pool.
        Rows are summed into the output in ascending expert order, whatever the batches: output does not depend on
        the budget."""
        N, K = inds.shape
        mx.eval(x, inds, weights)
        ids, stored = self._ids(inds)
        if not stored:
            return mx.zeros_like(x)
        w = np.array(weights.astype(mx.float32)).reshape(-1)
        n = self.store.n_slots
        batches = plan_batches(ids, self.capacity(ids, decode=False), self.zero_from)
        # The sum over experts: in place in numpy on the CPU (MLX's scatter would copy [N, H] per expert)
        cpu = kernels.on_cpu()
        y = np.zeros(x.shape, np.float32) if cpu else mx.zeros(x.shape, x.dtype)
        x_np = np.asarray(x.astype(mx.float32)) if cpu else None
        cold = self.store.keep_decode_set
        keys = self.store.acquire(self.layer, batches[0].experts, cold=cold)
        for i, b in enumerate(batches):
            groups = list(zip(keys, self.store.slots(keys).tolist(), np.split(b.pairs, np.cumsum(b.rows)[:-1])))
            if i + 1 < len(batches) and n >= 2:
                keys = self.store.acquire(self.layer, batches[i + 1].experts, busy=b.experts, cold=cold)
            # In ascending expert order (the order rows are summed in, whatever the batches), each expert as soon as
            # its own read has landed: on the CPU runs of experts with many rows go through numpy's BLAS, a few at a
            # time, the next run's weights decoding while this one multiplies; the rest through MLX.
            steps = self._steps(groups, cpu)
            ahead = None
            for j, (path, run) in enumerate(steps):
                if path == "blas":
                    mats = ahead or self._dequantize(run)
                    nxt = next((r for p, r in steps[j + 1 :] if p == "blas"), None)
                    ahead = self._dequantize(nxt) if nxt and not self.store.pending([k for k, _, _ in nxt]) else None
                    self._rows_blas(x_np, run, mats, K, w, y)
                    continue
                self.store.wait([k for k, _, _ in run])  # few rows each: every pair a 1-row matmul, as in decode
                rows = np.concatenate([r for _, _, r in run])
                slots = np.repeat([s for _, s, _ in run], [len(r) for _, _, r in run]).astype(np.uint32)
                by_slot = np.argsort(slots, kind="stable")  # sorted: a GPU runs each expert's rows as one matmul
                o = self._pairs(x[mx.array(rows[by_slot] // K)][:, None, :], mx.array(slots[by_slot]), grouped=True)
                o = o[mx.array(np.argsort(by_slot, kind="stable")), 0, :] * mx.array(w[rows])[:, None]
                if cpu:
                    o = np.asarray(o.astype(mx.float32))
                at = 0
                for _, _, r in run:  # summed expert by expert, in order
                    tok, seg = r // K, o[at : at + len(r)]
                    at += len(r)
                    if cpu:
                        y[tok] += seg
                    else:
                        y = y.at[mx.array(tok)].add(seg.astype(y.dtype))
            if not cpu:
                mx.eval(y)  # these slots may be reused from here on
            if i + 1 < len(batches) and n < 2:  # a one-slot pool (top-1 routing) reads the next batch only now
                keys = self.store.acquire(self.layer, batches[i + 1].experts, cold=cold)
        if cpu:
            y = mx.array(y).astype(x.dtype)
        if cold:  # each layer's most used experts of the prompt stay for the decode that follows
            order = np.argsort(-np.bincount(self._stored(ids)), kind="stable")
            self.store.keep(self.layer, order[: max(1, n // max(1, len(self.store.layouts)))])
        return y

    def _steps(self, groups: list[tuple], cpu: bool) -> list[tuple[str, list[tuple]]]:
        """Experts (key, slot, rows) in order -> steps: ("blas", up to DEQUANT_GROUP consecutive experts with enough
        rows for numpy's BLAS, on the CPU) or ("pairs", consecutive experts computed pair by pair in MLX)."""
        encoding, steps = self.store.records["gate"].encoding, []
        for g in groups:
            path = "blas" if cpu and kernels.choose_path(len(g[2]), encoding) == "blas" else "pairs"
            if steps and steps[-1][0] == path and (path == "pairs" or len(steps[-1][1]) < DEQUANT_GROUP):
                steps[-1][1].append(g)
            else:
                steps.append((path, [g]))
        return steps

    def _dequantize(self, experts: list[tuple]) -> list[mx.array]:
        """Wait for the reads of ``experts`` (key, slot, rows), then start decoding their gate, up and down weights to
        float32 (kernels.dequantize_slots)."""
        self.store.wait([k for k, _, _ in experts])
        return kernels.dequantize_slots([(self.store.pool[n], slot, self.store.records[n]) for _, slot, _ in experts
                                         for n in ("gate", "up", "down")])

    def _rows_blas(self, x: np.ndarray, experts: list[tuple], mats: list[mx.array], K: int,
                   w: np.ndarray, y: np.ndarray) -> None:
        """Experts with many rows on the CPU: each expert's rows through numpy's BLAS on its dequantized weights
        ``mats`` (gate, up, down per expert), summed into ``y`` [N, H] in place, weighted."""
        names = ("gate", "up", "down")
        for i, (_, slot, rows) in enumerate(experts):
            tok = rows // K
            wg, wu, wd = (np.asarray(m) for m in mats[3 * i : 3 * i + 3])
            bias = {n: self._bias(n, slot) for n in names}
            xe = x[tok]
            g, u = xe @ wg.T, xe @ wu.T
            if bias["gate"] is not None:
                g, u = g + bias["gate"], u + bias["up"]
            act = NUMPY_ACTIVATIONS.get(self.activation)
            h = act(g, u) if act else np.asarray(self.activation(mx.array(g), mx.array(u)).astype(mx.float32))
            o = h @ wd.T
            if bias["down"] is not None:
                o += bias["down"]
            o *= w[rows, None]
            y[tok] += o

    def _bias(self, name: str, slot: int) -> np.ndarray | None:
        b = self.store.pool.get(name + "_bias")
        return None if b is None else np.asarray(b["data"][slot].astype(mx.float32))


# ---- the block -------------------------------------------------------------------------------


class MoE(nn.Module):
    """Router -> streamed routed experts, plus an optional shared expert (scaled per token by
    sigmoid(shared_expert_gate(x)) where ``shared_gate``: Qwen2-MoE, Qwen3-Next).

    ``scale_inputs``: each chosen expert computes on the token scaled by its routing weight and its output is summed
    unweighted (Llama 4), instead of weighing the outputs. ``expert_norm``: the experts (and a shared expert) compute on
    expert_norm(x) while the router sees x itself (Gemma 4, whose router has a norm of its own).
    """

    def __init__(self, router: nn.Module, experts: StreamedExperts, shared: nn.Module | None = None,
                 shared_gate: bool = False, scale_inputs: bool = False, expert_norm: nn.Module | None = None):
        super().__init__()
        self.router = router
        self.experts = experts
        self.scale_inputs = scale_inputs
        if expert_norm is not None:
            self.expert_norm = expert_norm
        if shared is not None:
            self.shared_expert = shared
            if shared_gate:
                hidden = router.weight.shape[1]
                self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)

    @property
    def by_token(self) -> bool:
        """Whether the router picks experts by token id (then call with the ids)."""
        return getattr(self.router, "by_token", False)

    @property
    def batchable(self) -> bool:
        """Whether the decoding rows of several sequences can share one call of the routed experts (runtime/batch.py
        routes each row by its hidden state and weighs the outputs; zero experts are handled by the plain path)."""
        return not (self.by_token or self.scale_inputs or self.experts.zero_from is not None or "expert_norm" in self)

    def prefetch(self, tokens: mx.array) -> None:
        """A hash-routed layer: start reading the experts ``tokens`` will use now, before the layer runs: those of
        the layer's first batch, as many as the pool has free or evictable slots for (never those in use), so
        every read is used."""
        first = self.experts.first_batch(np.array(self.router.experts(tokens)))  # later batches may evict them
        self.experts.store.prefetch(self.experts.layer, first.tolist(), exact=True)

    def __call__(self, x: mx.array, tokens: mx.array | None = None) -> mx.array:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N, H]
        inds, w = self.router(flat, tokens) if self.by_token else self.router(flat)
        if "expert_norm" in self:
            flat = self.expert_norm(flat)
        if self.scale_inputs:  # one row per (token, choice): [N*K, H] with weight 1 each, summed back per token
            N, K = inds.shape
            rows = (flat[:, None, :] * w[..., None].astype(flat.dtype)).reshape(N * K, -1)
            y = self.experts(rows, inds.reshape(N * K, 1), mx.ones((N * K, 1), flat.dtype))
            y = y.reshape(N, K, -1).sum(axis=1) if K > 1 else y
        else:
            y = self.experts(flat, inds, w.astype(flat.dtype))
        return self.add_shared(flat, y).reshape(shape)

    def add_shared(self, flat: mx.array, y: mx.array) -> mx.array:
        """The routed experts' output ``y`` [N, H] plus the shared expert's (if any) on the block's input [N, H]."""
        if "shared_expert" in self:
            s = self.shared_expert(flat)
            if "shared_expert_gate" in self:
                s = mx.sigmoid(self.shared_expert_gate(flat)) * s
            y = y + s
        return y
