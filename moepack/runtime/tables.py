"""Streamed tables (SPEC 3.6): rows of a token-indexed table (the input embedding) read on demand into a bounded
row cache, so the table need not be resident.

A step needs the rows of its tokens only. Its missing rows are read together: each row's 4 KiB pages (io.PAGE, what
direct I/O can address), rows sharing or touching a page in one read, the reads of a batch in parallel on the
expert store's I/O threads, through the same reader (runtime/io.py: a regular file only, ``O_DIRECT`` where the
file system allows) into a staging buffer of about ``memory.TABLE_STAGING_BYTES`` (a larger step goes in several
batches). A row's stored bytes then go into a slot of the cache (preallocated ``[rows, row_bytes]`` bytes, least
recently used out first). Rows are decoded the same way from the cache or from the disk, so the output does not
depend on the budget.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Executor
from dataclasses import asdict, dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from moepack.errors import PackError
from moepack.formats import dtypes
from moepack.formats.files import inside
from moepack.formats.manifest import Table
from moepack.formats.quant import decode
from moepack.formats.reader import PackReader
from moepack.formats.writer import hash_file
from moepack.runtime.io import PAGE, DirectReader, aligned_buffer, cover
from moepack.runtime.memory import resident_dtype, table_staging


@dataclass
class TableCounters:
    lookups: int = 0  # rows looked up (the distinct rows of each step)
    hits: int = 0
    misses: int = 0
    reads: int = 0  # preads issued (a read holds the pages of one or more adjacent missing rows)
    bytes_read: int = 0  # whole pages, what the disk delivered
    io_wait_s: float = 0.0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "hit_rate": self.hit_rate}


class TableStore:
    """One streamed table and its row cache of ``cached_rows`` rows (at least one step's: one row). ``pool``: the
    threads a batch's reads run on (the expert store's); None reads them one after another."""

    def __init__(self, reader: PackReader, name: str, cached_rows: int, compute_dtype: mx.Dtype, io: DirectReader,
                 verify: bool = False, pool: Executor | None = None):
        self.name, self.table = name, reader.tables[name]
        t: Table = self.table
        self.path = str(reader.table_path(name))
        inside(reader.root, t.file)  # no symlink out of the pack (check_tree did so too, at load)
        if verify and hash_file(self.path) != reader.manifest.files[t.file]["blake3"]:
            raise PackError(f"{self.path}: blake3 mismatch, the file is corrupt (run `moepack verify {reader.root}`)")
        self.io, self.pool, self.compute_dtype = io, pool, compute_dtype
        self.cached_rows = max(1, min(cached_rows, t.rows))
        self._cache = np.zeros((self.cached_rows, t.row_bytes), np.uint8)
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # row -> slot, least recently used first
        self._free = list(range(self.cached_rows - 1, -1, -1))
        self._staging = aligned_buffer(table_staging(t), reader.manifest.alignment)
        self._lock = threading.Lock()
        self.counters = TableCounters()

    @property
    def cache_bytes(self) -> int:
        return self._cache.nbytes

    def _read(self, missing: list[tuple[int, int]], out: np.ndarray) -> None:
        """Read rows ``missing`` ((index in ``out``, row), sorted by row) from the disk into ``out`` and the cache."""
        t, staging = self.table, self._staging
        missing = sorted(missing, key=lambda m: m[1])
        ranges = [(t.row_offset(r), t.row_offset(r) + t.row_bytes) for _, r in missing]
        extents, owner = cover(ranges, staging.nbytes, PAGE)
        first = j = 0
        while first < len(extents):  # a batch: as many extents as the staging buffer holds
            at, size, last = [], 0, first
            while last < len(extents) and size + extents[last][1] <= staging.nbytes:
                at.append(size)
                size += extents[last][1]
                last += 1
            t0 = time.perf_counter()
            try:
                n = self.io.read_extents(self.path, staging, [(*extents[e], at[e - first]) for e in range(first, last)],
                                         self.pool)
            except OSError as e:
                raise PackError(f"{self.path}: cannot read rows of {self.name} ({e.strerror or e}); the pack is "
                                "damaged (run `moepack verify`)") from e
            self.counters.io_wait_s += time.perf_counter() - t0
            self.counters.reads += last - first
            self.counters.bytes_read += n
            while j < len(missing) and owner[j] < last:  # owners ascend with the rows
                (i, r), e = missing[j], owner[j]
                pos = at[e - first] + ranges[j][0] - extents[e][0]
                out[i] = staging[pos : pos + t.row_bytes]
                self._insert(r, out[i])
                j += 1
            first = last

    def _insert(self, r: int, data: np.ndarray) -> None:
        if not self._free:
            self._free.append(self._slot_of.popitem(last=False)[1])
        slot = self._slot_of[r] = self._free.pop()
        self._cache[slot] = data

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """The stored bytes of rows ``ids`` (distinct), [len(ids), row_bytes], through the cache: the hits
        copied first, then the misses read in one batch (they may push this step's hits out of a small cache)."""
        out = np.empty((len(ids), self.table.row_bytes), np.uint8)
        with self._lock:
            missing = []
            for i, r in enumerate(ids.tolist()):
                slot = self._slot_of.get(r)
                if slot is None:
                    missing.append((i, r))
                    continue
                self._slot_of.move_to_end(r)
                out[i] = self._cache[slot]
            if missing:
                self._read(missing, out)
            self.counters.lookups += len(ids)
            self.counters.hits += len(ids) - len(missing)
            self.counters.misses += len(missing)
        return out

    def __call__(self, tokens: mx.array) -> mx.array:
        """Token ids [...] -> their rows [..., cols], decoded as the resident tensor would be at the compute dtype."""
        t = self.table
        ids = np.array(tokens).reshape(-1)
        uniq, inverse = np.unique(ids, return_inverse=True)
        if len(uniq) and (uniq[0] < 0 or uniq[-1] >= t.rows):
            bad = uniq[0] if uniq[0] < 0 else uniq[-1]
            raise ValueError(f"token id {bad} is outside {self.name}'s {t.rows} rows")
        data = self.rows(uniq)
        parts = {}
        for k, b in t.row.parts.items():
            raw = np.ascontiguousarray(data[:, b.offset : b.offset + b.length])
            a = dtypes.from_numpy_bytes(raw, b.dtype).reshape(len(uniq), *b.shape)
            parts[k] = a.astype(resident_dtype(b.dtype, self.compute_dtype))  # as set_dtype widens resident ones
        rows = decode(parts, t.row.encoding, t.row.bits, t.row.group_size).astype(
            resident_dtype(t.row.dtype, self.compute_dtype))
        return rows[mx.array(inverse.reshape(tokens.shape))]


class StreamedEmbedding(nn.Module):
    """Stands in for ``nn.Embedding`` where the pack streams the table: it holds no weights, rows come from ``store``."""

    def __init__(self, store: TableStore):
        super().__init__()
        self.store = store  # a plain attribute, not a parameter

    def __call__(self, tokens: mx.array) -> mx.array:
        return self.store(tokens)
