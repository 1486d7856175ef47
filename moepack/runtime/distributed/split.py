"""How a pack's layers split over the hosts of a pipeline (pure: needs only manifest.json and config.json, so it also
plans packs that are not here, e.g. tools/virtual_pack.py's manifest-only "virtual packs")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Sequence

import numpy as np

from moepack import arch
from moepack.errors import MoepackError
from moepack.formats import dtypes
from moepack.formats.manifest import Manifest
from moepack.formats.reader import PackReader
from moepack.runtime.engine import Stage
from moepack.runtime.memory import MemoryNeed, memory_need
from moepack.units import human_bytes


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

    table_read_per_token: int = 0  # bytes a token reads from streamed tables when no row is cached (the first stage)


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
    for name, t in manifest.tables.items():  # a streamed table: a row's pages for each row a token reads
        read = t.read_bytes() * arch.table_rows_per_token(arch.text_config(config), name)
        if (layer := arch.layer_of(name)) is not None:
            dense[layer] += read
        else:
            first += read
    for el in manifest.experts:
        dense[el.layer] += a["top_k"] * manifest.expert_layouts[el.layout].length
    return dense, first, last


def split_layers(costs: Sequence[int], n: int, first_extra: int = 0, last_extra: int = 0,
                 starts: Collection[int] | None = None) -> list[range]:
    """Contiguous ranges of layers for ``n`` stages that minimise the costliest stage (dynamic programming).

    ``starts``: the layers a stage other than the first may begin at (None: any), where a later layer reuses what
    an earlier one computed in the same pass (``arch.stage_starts``)."""
    L = len(costs)
    if not 1 <= n <= L:
        raise ValueError(f"cannot split {L} layers over {n} hosts: each host needs at least one layer")
    if starts is not None and len({b for b in starts if 0 < b < L}) < n - 1:
        raise ValueError(f"cannot split {L} layers over {n} hosts: a stage can only begin at layer "
                         f"{', '.join(map(str, sorted(b for b in starts if 0 < b < L))) or 'none but 0'}")
    pre = np.concatenate([[0], np.cumsum(np.asarray(costs, dtype=np.int64))]).tolist()
    inf = float("inf")
    best = [[inf] * (L + 1) for _ in range(n + 1)]
    cut = [[0] * (L + 1) for _ in range(n + 1)]
    best[0][0] = 0
    for k in range(1, n + 1):
        extra = (first_extra if k == 1 else 0) + (last_extra if k == n else 0)
        for i in range(k, L - (n - k) + 1):  # stage k-1 ends before layer i
            for j in range(k - 1, i):
                if k > 1 and starts is not None and j not in starts:
                    continue
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
        ranges = split_layers(costs, hosts, first, last, arch.stage_starts(config))
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
        shares.append(StageShare(st, moe, need, files * a["num_experts"], files * a["top_k"], cost,
                                 need.table_read_bytes))
    return PipelineSplit(shares, a["num_experts"], a["top_k"], len(costs))


def split_rows(split: PipelineSplit, names: Sequence[str], budget: int | None) -> list[dict]:
    """One row per host for ``moepack plan`` (also its --json): layers, bytes, and with ``budget`` the slots it buys."""
    rows = []
    for s, name in zip(split.shares, names):
        row = {"host": name, "rank": s.stage.index, "layers": [s.stage.start, s.stage.stop - 1],
               "moe_layers": len(s.moe_layers), "embeddings": s.stage.first or (s.stage.last and s.stage.tied),
               "lm_head": s.stage.last, "dense_bytes": s.dense_bytes, "expert_bytes": s.expert_bytes,
               "read_per_token_uncached": s.read_per_token, "table_read_per_token_uncached": s.table_read_per_token,
               "minimum_budget": s.minimum}
        if budget is not None:
            slots, table_rows = s.need.split(budget) if budget >= s.minimum else (0, 0)
            row.update(budget=budget, fits=budget >= s.minimum, slots=slots, table_cache_rows=table_rows,
                       experts_cached=slots / (len(s.moe_layers) * split.num_experts) if s.moe_layers else 1.0)
        rows.append(row)
    return rows


def describe(reader: PackReader, split: PipelineSplit, rows: list[dict], budget: int | None) -> str:
    """``moepack plan``'s table."""
    a = reader.manifest.architecture
    out = [f"{reader.root}: {a['family']} ({a['model_type']}), {split.num_layers} layers, {len(a['moe_layers'])} MoE "
           f"layers x {a['num_experts']} experts, top-{a['top_k']}; {len(rows)} hosts",
           "sizes as stored, i.e. resident on Apple silicon's GPU (the CPU back end widens bf16 to float32)"]
    head = f"{'rank':<5}{'host':<18}{'layers':<9}{'MoE':>4}{'dense':>12}{'experts (SSD)':>15}{'read/token':>12}{'minimum':>12}"
    if budget is not None:
        head += f"{'slots at ' + human_bytes(budget):>22}{'cached':>8}"
    out.append(head)
    for r in rows:
        extra = ("+embed" if r["rank"] == 0 else "") + ("+head" if r["lm_head"] else "")
        if r["table_read_per_token_uncached"]:
            extra += f"+tables {human_bytes(r['table_read_per_token_uncached'])}/token"
            if budget is not None and r["fits"]:
                extra += f", {r['table_cache_rows']:,} rows cached"
        line = (f"{r['rank']:<5}{r['host'][:17]:<18}{'%d-%d' % tuple(r['layers']):<9}{r['moe_layers']:>4}"
                f"{human_bytes(r['dense_bytes']):>12}{human_bytes(r['expert_bytes']):>15}"
                f"{human_bytes(r['read_per_token_uncached']):>12}{human_bytes(r['minimum_budget']):>12}")
        if budget is not None:
            line += f"{r['slots']:>22,}{r['experts_cached']:>8.1%}" if r["fits"] else "   does not fit: raise the budget"
        out.append(line + (f"  ({extra[1:]})" if extra else ""))
    out.append("read/token: expert bytes a token reads on that host when none is cached (top-k per MoE layer); "
               "minimum: dense + top-k expert slots (+ one token's table rows where the embedding is streamed)")
    return "\n".join(out)
