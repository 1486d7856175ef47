"""Streamed tables (SPEC 3.6): rows of a token-indexed table (the input embedding) read on demand into a bounded
row cache, so the table need not be resident.

A step needs the rows of its tokens only. A missing row costs one aligned ``pread`` of the block that holds it,
through the expert store's reader (runtime/io.py: a regular file only, ``O_DIRECT`` where the file system allows);
its stored bytes go into a slot of the cache (preallocated ``[rows, row_bytes]`` bytes, least recently used out
first). Rows are decoded the same way from the cache or from the disk, so the output does not depend on the budget.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

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
from moepack.runtime.io import DirectReader, aligned_buffer
from moepack.runtime.memory import resident_dtype


@dataclass
class TableCounters:
    lookups: int = 0  # rows looked up (the distinct rows of each step)
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0  # whole aligned blocks, what the disk delivered
    io_wait_s: float = 0.0


class TableStore:
    """One streamed table and its row cache of ``cached_rows`` rows (at least one step's: one row)."""

    def __init__(self, reader: PackReader, name: str, cached_rows: int, compute_dtype: mx.Dtype, io: DirectReader,
                 verify: bool = False):
        self.name, self.table = name, reader.tables[name]
        t: Table = self.table
        self.path = str(reader.table_path(name))
        inside(reader.root, t.file)  # no symlink out of the pack (check_tree did so too, at load)
        if verify and hash_file(self.path) != reader.manifest.files[t.file]["blake3"]:
            raise PackError(f"{self.path}: blake3 mismatch, the file is corrupt (run `moepack verify {reader.root}`)")
        self.io, self.compute_dtype = io, compute_dtype
        self.alignment = reader.manifest.alignment
        self.cached_rows = max(1, min(cached_rows, t.rows))
        self._cache = np.zeros((self.cached_rows, t.row_bytes), np.uint8)
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # row -> slot, least recently used first
        self._free = list(range(self.cached_rows - 1, -1, -1))
        self._block = aligned_buffer(t.block_bytes, self.alignment)
        self._lock = threading.Lock()
        self.counters = TableCounters()

    @property
    def cache_bytes(self) -> int:
        return self._cache.nbytes

    def _read_row(self, r: int) -> np.ndarray:
        """Row ``r``'s stored bytes, from the disk: the aligned block that holds it."""
        t = self.table
        t0 = time.perf_counter()
        try:
            self.io.read_into(self.path, self._block, t.block_offset(r))
        except OSError as e:
            raise PackError(f"{self.path}: cannot read row {r} ({e.strerror or e}); the pack is damaged "
                            "(run `moepack verify`)") from e
        self.counters.io_wait_s += time.perf_counter() - t0
        self.counters.bytes_read += t.block_bytes
        start = t.row_offset(r) - t.block_offset(r)
        return self._block[start : start + t.row_bytes]

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """The stored bytes of rows ``ids`` (distinct), [len(ids), row_bytes], through the cache."""
        t, out = self.table, np.empty((len(ids), self.table.row_bytes), np.uint8)
        with self._lock:
            for i, r in enumerate(ids.tolist()):
                slot = self._slot_of.get(r)
                if slot is not None:
                    self._slot_of.move_to_end(r)
                    out[i] = self._cache[slot]
                    self.counters.hits += 1
                    continue
                out[i] = self._read_row(r)
                self.counters.misses += 1
                if not self._free:
                    self._free.append(self._slot_of.popitem(last=False)[1])
                slot = self._slot_of[r] = self._free.pop()
                self._cache[slot] = out[i]
            self.counters.lookups += len(ids)
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
