"""How a pack's layers split over the hosts of a pipeline (pure: needs only manifest.json and config.json, so it also
plans packs that are not here, e.g. tools/virtual_pack.py's manifest-only "virtual packs")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from moepack import arch
from moepack.errors import MoepackError
from moepack.formats import dtypes
from moepack.formats.manifest import Manifest
from moepack.formats.reader import PackReader
from moepack.runtime.engine import Stage
from moepack.runtime.memory import MemoryNeed, memory_need


class PipelineError(MoepackError):
    """A pipeline rank died, hung or could not start; the pipeline must be restarted."""


@dataclass
class StageShare:
    """What one host holds and reads (bytes as stored, which is what they take resident on Apple silicon's GPU)."""

    stage: Stage
    moe_layers: list[int]
    need: MemoryNeed  # dense bytes, slot bytes, minimum budget and slots per budget (runtime/memory.py)
    expert_bytes: int  # on this host's SSD: the stage's expert files
    read_per_token: int  # expert bytes a token reads when none is cached (top-k per MoE layer)
    cost: int  # what the split balances: dense bytes + expected expert bytes per token

    @property
    def dense_bytes(self) -> int:
        return self.need.dense_bytes

    @property
    def slot_bytes(self) -> int:
        return self.need.slot_bytes

    @property
    def minimum(self) -> int:
        return self.need.minimum


@dataclass
class PipelineSplit:
    shares: list[StageShare]
    num_experts: int
    top_k: int
    num_layers: int

    @property
    def stages(self) -> list[Stage]:
        return [s.stage for s in self.shares]


def layer_costs(manifest: Manifest, config: dict) -> tuple[list[int], int, int]:
    """Per layer: dense bytes + expected expert bytes per token (top-k experts' files); and the extra cost of
    the first stage (embeddings) and of the last (final norm + LM head)."""
    a = manifest.architecture
    n = arch.num_layers(config)
    dense = [0] * n
    first = last = 0
    stage0, stage_n = Stage(0, 2, 0, 0), Stage(1, 2, 0, 0)
    for name, rec in manifest.dense.items():
        layer = arch.layer_of(name)
        if layer is not None:
            dense[layer] += rec.nbytes
        elif stage0.owns(name):
            first += rec.nbytes
        elif stage_n.owns(name):
            last += rec.nbytes
    if config.get("tie_word_embeddings"):
        last += first
    for el in manifest.experts:
        dense[el.layer] += a["top_k"] * manifest.expert_layouts[el.layout].length
    return dense, first, last


def split_layers(costs: Sequence[int], n: int, first_extra: int = 0, last_extra: int = 0) -> list[range]:
    """Contiguous ranges of layers for ``n`` stages that minimise the costliest stage (dynamic programming)."""
    L = len(costs)
    if not 1 <= n <= L:
        raise ValueError(f"cannot split {L} layers over {n} hosts: each host needs at least one layer")
    pre = np.concatenate([[0], np.cumsum(np.asarray(costs, dtype=np.int64))]).tolist()
    inf = float("inf")
    best = [[inf] * (L + 1) for _ in range(n + 1)]
    cut = [[0] * (L + 1) for _ in range(n + 1)]
    best[0][0] = 0
    for k in range(1, n + 1):
        extra = (first_extra if k == 1 else 0) + (last_extra if k == n else 0)
        for i in range(k, L - (n - k) + 1):  # stage k-1 ends before layer i
            for j in range(k - 1, i):
                v = max(best[k - 1][j], pre[i] - pre[j] + extra)
                if v < best[k][i]:
                    best[k][i], cut[k][i] = v, j
    bounds, i = [], L
    for k in range(n, 0, -1):
        bounds.append(range(cut[k][i], i))
        i = cut[k][i]
    return bounds[::-1]


def split_pack(reader: PackReader, hosts: int) -> PipelineSplit:
    """Split ``reader``'s pack over ``hosts`` stages: contiguous layer ranges that balance each host's dense bytes
    plus the expert bytes a token reads there."""
    m, config = reader.manifest, arch.text_config(reader.config)
    a = m.architecture
    costs, first, last = layer_costs(m, config)
    try:
        ranges = split_layers(costs, hosts, first, last)
    except ValueError as e:
        raise PipelineError(str(e)) from e
    tied = bool(config.get("tie_word_embeddings"))
    stored = dtypes.get(m.recipe.get("dtype", "float32")).mlx  # the pack's dtype: sizes as stored
    length = {el.layer: m.expert_layouts[el.layout].length for el in m.experts}
    shares = []
    for i, r in enumerate(ranges):
        st = Stage(i, hosts, r.start, r.stop, tied)
        moe = [L for L in sorted(length) if L in st.layers]
        files = sum(length[L] for L in moe)
        need = memory_need(reader, stored, st)
        cost = sum(costs[r.start : r.stop]) + (first if st.first else 0) + (last if st.last else 0)
        shares.append(StageShare(st, moe, need, files * a["num_experts"], files * a["top_k"], cost))
    return PipelineSplit(shares, a["num_experts"], a["top_k"], len(costs))
