"""Memory budgets: parsing "8GB", the machine's available memory, what a pack costs when resident, and how a budget
is split into dense weights and expert slots (:func:`plan_memory`, used by the engine and the pipeline planner alike)."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from moepack import arch
from moepack.errors import BudgetError
from moepack.formats import dtypes
from moepack.formats.manifest import ExpertLayout, Table, TensorRecord
from moepack.formats.reader import PackReader
from moepack.units import human_bytes, parse_bytes, suggest_bytes  # noqa: F401 - re-exported: budgets are parsed here

def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if not text or text == "max" else int(text)


CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def cgroup_memory(root: Path | None = None, proc: Path | None = None) -> tuple[int, int] | None:
    """(limit, usage) in bytes of this process's memory cgroup, v2 ``memory.max``/``memory.current`` or v1
    ``memory.limit_in_bytes``/``memory.usage_in_bytes``; None without a limit. Containers and benchmark caps set
    these, not /proc/meminfo. ``root``/``proc`` default to CGROUP_ROOT and PROC_CGROUP (tests point them at fakes)."""
    root, proc = root or CGROUP_ROOT, proc or PROC_CGROUP
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            _, controllers, path = line.split(":", 2)
        except ValueError:
            continue
        if controllers == "":  # v2: one unified hierarchy
            files, base = ("memory.max", "memory.current"), root / path.lstrip("/")
        elif "memory" in controllers.split(","):  # v1: the memory controller's own hierarchy
            files, base = ("memory.limit_in_bytes", "memory.usage_in_bytes"), root / "memory" / path.lstrip("/")
        else:
            continue
        try:
            limit, used = _read_int(base / files[0]), _read_int(base / files[1])
        except ValueError:
            continue
        if limit is not None and limit < (1 << 60):  # v1 writes a huge number for "no limit"
            return limit, used or 0
    return None


def cgroup_available(root: Path | None = None, proc: Path | None = None) -> int | None:
    """Bytes this process's memory cgroup still allows (limit minus usage); None without a limit."""
    m = cgroup_memory(root, proc)
    return None if m is None else max(0, m[0] - m[1])


def available_memory() -> int:
    """Bytes that could be given to a new process without swapping: MemAvailable on Linux, lowered to what the
    process's cgroup still allows where one limits it; physical memory elsewhere."""
    avail = None
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        avail = int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    avail = avail if avail is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    group = cgroup_available() if sys.platform.startswith("linux") else None
    return avail if group is None else min(avail, group)


DEFAULT_FRACTION = 0.6


def default_budget() -> int:
    """60% of available memory: leaves room for the OS, the KV cache, activations and other programs."""
    return int(available_memory() * DEFAULT_FRACTION)


def parse_budget(value: int | float | str | None) -> int | None:
    """A memory budget as given (``12GB``, ``12e9``, ``60%`` of available memory, bytes; None: the default), refused
    in one line when it cannot be read or cannot fit under this process's cgroup memory limit."""
    from moepack.errors import UsageError

    pct = isinstance(value, str) and value.strip().endswith("%")
    budget = parse_bytes(value, of=available_memory() if pct else None)
    if budget is None or not sys.platform.startswith("linux"):
        return budget
    group = cgroup_memory()
    if group is not None and budget > group[0] - group[1]:
        limit, used = group
        room = max(0, limit - used)
        raise UsageError(
            f"memory budget {human_bytes(budget)} cannot fit in this container: its memory limit is "
            f"{human_bytes(limit)} with {human_bytes(used)} in use, leaving {human_bytes(room)} (and the budget "
            f"is for weights only); try --memory-budget {suggest_bytes(int(room * DEFAULT_FRACTION))} or leave it "
            "out for 60% of what is left")
    return budget


def resident_dtype(stored: str, compute: mx.Dtype) -> mx.Dtype:
    """The dtype a stored float takes in memory: widened to float32 when computing in float32 (MLX's CPU
    back end runs float32 several times faster than bf16); other dtypes stay as stored."""
    d = dtypes.get(stored).mlx
    if compute == mx.float32 and d in (mx.float16, mx.bfloat16):
        return mx.float32
    return d


def resident_bytes(rec: TensorRecord, compute: mx.Dtype) -> int:
    return sum(int(np.prod(b.shape)) * resident_dtype(b.dtype, compute).size for b in rec.parts.values())


def default_compute_dtype(pack_dtype: str) -> mx.Dtype:
    """float32 on the CPU back end; on a GPU the pack's own float dtype (bf16/f16 halve memory traffic)."""
    if mx.default_device() == mx.cpu:
        return mx.float32
    return dtypes.get(pack_dtype).mlx


def _proc_status(field: str) -> int | None:
    """A byte figure of this process from Linux's /proc/self/status (``VmHWM``, ``VmRSS``); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s*(\d+)\s*kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(m[1]) * 1024 if m else None


def compute_dtype_for(reader: PackReader) -> mx.Dtype:
    """The dtype ``moepack.load`` computes a pack in on this machine (see :func:`default_compute_dtype`)."""
    return default_compute_dtype(reader.manifest.recipe.get("dtype", "float32"))


def peak_rss() -> int:
    """Peak resident set size of this process in bytes.

    Linux: VmHWM, since ru_maxrss carries the parent's peak across fork+exec. macOS: ru_maxrss (bytes there).
    """
    peak = _proc_status("VmHWM")
    if peak is not None:
        return peak
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


@dataclass(frozen=True)
class MemoryNeed:
    """What a pack (or one pipeline stage of it) takes resident at a compute dtype: the one place budgets are sized."""

    dense_bytes: int  # dense weights, resident (streamed tables not included)
    slot_bytes: int  # one expert slot of the pool
    experts: int  # routed experts in all (MoE layers x experts per layer)
    top_k: int
    row_bytes: int = 0  # one token's rows of the streamed tables (SPEC 3.6), as cached
    table_rows: int = 0  # tokens' worth of rows that fill the largest streamed table: caching more buys nothing
    table_bytes: int = 0  # the streamed tables' files, all rows
    table_read_bytes: int = 0  # what one token reads from the tables when no row is cached (a row's pages per row)

    @property
    def minimum(self) -> int:
        """The smallest budget: the dense weights plus one token's experts of one layer and one step's table rows."""
        return self.dense_bytes + (self.top_k * self.slot_bytes if self.slot_bytes else 0) + self.row_bytes

    def slots(self, budget: int) -> int:
        """Expert slots a budget buys (at least top-k, never more than there are experts)."""
        if not self.slot_bytes:
            return 0
        return max(self.top_k, min(self.experts, (budget - self.dense_bytes) // self.slot_bytes))

    def split(self, budget: int) -> tuple[int, int]:
        """(expert slots, cached table rows) for a budget of at least the minimum. The tables get what is left once
        every expert has a slot, and at least TABLE_SHARE of the budget beyond the minimum: a missing row costs one
        block per token, a missing expert a whole file per layer, so most of a tight budget goes to experts."""
        if not self.row_bytes:
            return self.slots(budget), 0
        spare = budget - self.minimum
        all_experts = (self.experts - self.top_k) * self.slot_bytes
        extra = max(int(spare * TABLE_SHARE), spare - all_experts) // self.row_bytes
        rows = 1 + min(self.table_rows - 1, extra)
        return self.slots(budget - rows * self.row_bytes), rows


TABLE_SHARE = 1 / 16


# Working memory beyond the budget (README "Memory"): MLX's buffer cache is held to MLX_CACHE_BYTES; a pass's
# attention scores and dequantized weight slices to fixed scratch (attention.SCORE_BYTES twice: the scores and the
# block's K/V copies; kernels.DENSE_SLICE_BYTES); activations grow with the tokens of one pass, the KV cache with
# the context.
MLX_CACHE_BYTES = 64 << 20
SCRATCH_BYTES = (2 * 64 << 20) + (64 << 20)
ACTIVATION_WIDTHS = 6  # live [T, hidden] float32 tensors in a pass (residual, norm, attention out, MoE sum, ...)
TABLE_STAGING_BYTES = 1 << 20  # a streamed table's staging buffer: a step's missing rows are read in batches of it


def table_staging(t: Table) -> int:
    """Bytes of ``t``'s staging buffer: whole blocks (any one row's pages fit), about TABLE_STAGING_BYTES."""
    return max(1, TABLE_STAGING_BYTES // t.block_bytes) * t.block_bytes


@dataclass(frozen=True)
class WorkingMemory:
    """What a sequence costs beyond the budget, from the manifest alone (measured against RSS in the tests)."""

    fixed: int  # I/O staging buffers + MLX's buffer cache + attention and dequantization scratch
    kv_per_token: int  # KV cache bytes per position of the context (K and V, or MLA's latent, over all layers)
    act_per_token: int  # activation bytes per token of one pass

    def bytes(self, context: int, pass_tokens: int) -> int:
        return self.fixed + context * self.kv_per_token + min(context, pass_tokens) * self.act_per_token


def working_memory(reader: PackReader, compute: mx.Dtype, io_threads: int = 8) -> WorkingMemory:
    """KV width per layer from the K/V projections' output dims (``k_proj``+``v_proj``, or MLA's
    ``kv_a_proj_with_mqa``: latent + roped key, and a DSA indexer's ``wk``: its keys); activations from the hidden
    size and the widest dense projection (the LM head excluded: it runs on the last position only)."""
    dense = reader.manifest.dense
    cfg = arch.text_config(reader.config)
    hidden = int(cfg["hidden_size"])
    streams = int(cfg.get("hc_mult") or 1)  # hyper-connections keep that many residual streams per token (DeepSeek V4)
    # (DeepSeek V4: kv_proj / the release's wkv, its compressors' too; an upper bound, as its window and compressed
    # entries keep less than a key per position)
    kv = sum(r.shape[0] for n, r in dense.items()
             if n.endswith(("k_proj.weight", "v_proj.weight", "kv_a_proj_with_mqa.weight", ".wkv.weight", "indexer.wk.weight")))
    # keys that serve as values (Gemma 4's global layers): the cache holds values of the keys' width all the same
    kv += sum(r.shape[0] for n, r in dense.items()
              if n.endswith("self_attn.k_proj.weight") and n.replace("k_proj", "v_proj") not in dense)
    widest = max((r.shape[0] for n, r in dense.items() if len(r.shape) == 2 and not arch.is_embedding(n)
                  and "lm_head" not in n), default=hidden)
    size = 4 if compute == mx.float32 else compute.size
    staging = io_threads * max((lay.length for lay in reader.manifest.expert_layouts.values()), default=0)
    staging += sum(table_staging(t) for t in reader.tables.values())
    return WorkingMemory(staging + MLX_CACHE_BYTES + SCRATCH_BYTES, kv * size,
                         4 * ((ACTIVATION_WIDTHS + 2 * (streams - 1)) * hidden + 2 * widest))


@dataclass
class MemoryPlan:
    """How a budget is spent: dense weights resident, the rest as expert slots."""

    budget: int
    dense_bytes: int
    slot_bytes: int
    n_slots: int
    minimum: int
    table_rows: int = 0  # tokens' worth of rows the table cache holds (a table caches this times its rows per token)
    row_bytes: int = 0  # one token's rows of all streamed tables

    @property
    def table_cache_bytes(self) -> int:
        return self.table_rows * self.row_bytes


def slot_bytes(layout: ExpertLayout, compute: mx.Dtype) -> int:
    """Bytes one slot of the expert pool takes for experts of ``layout`` at the compute dtype."""
    return sum(resident_bytes(rec, compute) for rec in layout.tensors.values())


def memory_need(reader: PackReader, compute: mx.Dtype, stage: Any = None) -> MemoryNeed:
    """``stage``: only a pipeline stage's share (its ``owns(name)`` dense tensors and its MoE ``layers``).
    ``compute``: the dtype weights are held in; the pack's own dtype gives the bytes as stored."""
    a = reader.manifest.architecture
    dense = sum(resident_bytes(r, compute) for n, r in reader.manifest.dense.items() if stage is None or stage.owns(n))
    moe = [L for L in reader.moe_layers if stage is None or L in stage.layers]
    per_slot = slot_bytes(reader.expert_layout(moe[0]), compute) if moe else 0
    cfg = arch.text_config(reader.config)  # a token reads one row of an embedding, one per head of a PLE table
    tables = [(t, arch.table_rows_per_token(cfg, n)) for n, t in reader.tables.items()
              if stage is None or stage.owns(n)]  # cached as stored
    return MemoryNeed(dense, per_slot, len(moe) * a["num_experts"], a["top_k"], sum(t.row_bytes * k for t, k in tables),
                      max((-(-t.rows // k) for t, k in tables), default=0), sum(t.length for t, _ in tables),
                      sum(t.read_bytes() * k for t, k in tables))


def plan_memory(reader: PackReader, budget: int | None, compute: mx.Dtype, stage: Any = None,
                reserve: int = 0) -> MemoryPlan:
    """Split ``budget`` (default: :func:`default_budget`) into dense weights and expert slots; BudgetError below the
    minimum. ``reserve``: bytes of the budget kept for working memory (a long context), taken from the slots."""
    need = memory_need(reader, compute, stage)
    minimum = need.minimum + reserve
    if budget is None:
        budget = max(minimum, default_budget())
    if budget < minimum:
        held = f" + {human_bytes(reserve)} reserved for the context" if reserve else ""
        rows = f" + one token's table rows, {human_bytes(need.row_bytes)}" if need.row_bytes else ""
        raise BudgetError(
            f"memory budget {human_bytes(budget)} is too small for this pack: it needs at least {human_bytes(minimum)} "
            f"(dense weights {human_bytes(need.dense_bytes)} + {need.top_k} expert slots of "
            f"{human_bytes(need.slot_bytes)}{rows}{held}): try --memory-budget {suggest_bytes(minimum)} "
            f"(minimum budget: {minimum} bytes)", minimum)
    slots, rows = need.split(budget - reserve)
    return MemoryPlan(budget, need.dense_bytes, need.slot_bytes, slots, minimum, rows, need.row_bytes)


def reset_peak_rss() -> bool:
    """Start a new peak for :func:`peak_rss` (Linux: ``5`` to /proc/self/clear_refs); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss() -> int:
    """Resident set size of this process now, in bytes: VmRSS on Linux. Elsewhere the peak (``peak_rss``), an
    upper bound, since the current figure needs an OS-specific API (psutil is not a dependency)."""
    rss = _proc_status("VmRSS")
    return rss if rss is not None else peak_rss()


def memory_stats() -> dict[str, int]:
    """This process's resident memory and MLX's allocator figures (the server's /stats reports them)."""
    return {"rss_bytes": current_rss(), "mlx_active_bytes": mx.get_active_memory(),
            "mlx_cache_bytes": mx.get_cache_memory()}
