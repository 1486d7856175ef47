"""The expert store: a fixed pool of expert slots in MLX memory, filled on demand from expert files.

Copies: one. A miss is read with direct I/O into an aligned staging buffer owned by the reading thread
(the DMA target; MLX's own allocations are not aligned enough for ``O_DIRECT``), then copied once into
its slot of the pool arrays, which MLX computes on in place (``mx.gather_qmm`` indexes slots directly).
Scales stored as bf16/f16 are widened to float32 during that same copy when the compute dtype is float32.
The pool is allocated once at start-up; nothing is allocated per token.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Hashable, Protocol, Sequence

import mlx.core as mx
import numpy as np

from moepack.errors import PackError
from moepack.formats import dtypes
from moepack.formats.manifest import ExpertLayout, TensorRecord
from moepack.formats.reader import PackReader
from moepack.runtime.io import DirectReader, aligned_buffer
from moepack.runtime.memory import resident_bytes, resident_dtype

log = logging.getLogger(__name__)

Key = tuple[int, int]  # (layer, expert)


class EvictionPolicy(Protocol):
    """Chooses which resident expert gives up its slot. The performance work swaps implementations."""

    def touch(self, key: Key) -> None: ...
    def insert(self, key: Key) -> None: ...
    def remove(self, key: Key) -> None: ...
    def victim(self, pinned: set[Key]) -> Key: ...


class LRUPolicy:
    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def touch(self, key: Key) -> None:
        self._order.move_to_end(key)

    def insert(self, key: Key) -> None:
        self._order[key] = None

    def remove(self, key: Key) -> None:
        self._order.pop(key, None)

    def victim(self, pinned: set[Key]) -> Key:
        for key in self._order:
            if key not in pinned:
                return key
        raise RuntimeError("every slot is pinned")


@dataclass
class Counters:
    bytes_read: int = 0
    reads: int = 0
    hits: int = 0
    misses: int = 0
    io_wait_s: float = 0.0

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "hit_rate": self.hit_rate}


def slot_bytes(layout: ExpertLayout, compute: mx.Dtype) -> int:
    """Bytes one slot of the pool takes for experts of ``layout`` at the compute dtype."""
    return sum(resident_bytes(rec, compute) for rec in layout.tensors.values())


class ExpertStore:
    def __init__(
        self,
        reader: PackReader,
        n_slots: int,
        compute_dtype: mx.Dtype = mx.float32,
        direct: bool = True,
        threads: int = 8,
        policy: EvictionPolicy | None = None,
    ):
        self.reader = reader
        self.n_slots = n_slots
        self.compute_dtype = compute_dtype
        self.io = DirectReader(direct)
        self.policy = policy or LRUPolicy()
        self.counters = Counters()
        layouts = {reader.manifest.experts[i].layer: reader.expert_layout(reader.manifest.experts[i].layer)
                   for i in range(len(reader.manifest.experts))}
        self.layouts = layouts
        first = next(iter(layouts.values()))
        for L, lay in layouts.items():  # one pool serves every layer, so shapes must agree
            if {t: {p: (b.shape, b.dtype) for p, b in r.parts.items()} for t, r in lay.tensors.items()} != \
               {t: {p: (b.shape, b.dtype) for p, b in r.parts.items()} for t, r in first.tensors.items()}:
                raise PackError(f"layer {L}'s experts differ in shape or encoding from the others; this runtime needs one shape")
        self.records: dict[str, TensorRecord] = first.tensors
        self.file_bytes = max(lay.length for lay in layouts.values())
        # The pool: one MLX array per (tensor, part), slot-major, and writable numpy views onto the same memory.
        self.pool: dict[str, dict[str, mx.array]] = {}
        self._views: dict[str, dict[str, np.ndarray]] = {}
        for t, rec in self.records.items():
            self.pool[t], self._views[t] = {}, {}
            for p, b in rec.parts.items():
                a = mx.zeros((n_slots, *b.shape), dtype=resident_dtype(b.dtype, compute_dtype))
                mx.eval(a)
                self.pool[t][p] = a
                v = np.asarray(a.view(mx.uint16)) if a.dtype == mx.bfloat16 else np.asarray(a)
                if not v.flags.writeable or v.ctypes.data != np.asarray(a.view(mx.uint8)).ctypes.data:
                    raise RuntimeError("this MLX build does not expose writable array memory; the expert pool needs it")
                self._views[t][p] = v
        self.slot_bytes = slot_bytes(first, compute_dtype)
        self._slot_of: dict[Key, int] = {}
        self._key_of: list[Key | None] = [None] * n_slots
        self._free = list(range(n_slots - 1, -1, -1))
        self._tls = threading.local()
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="moepack-io")
        self._lock = threading.Lock()

    # ---- reading ----------------------------------------------------------------------------
    def _staging(self) -> np.ndarray:
        buf = getattr(self._tls, "buf", None)
        if buf is None:
            buf = self._tls.buf = aligned_buffer(self.file_bytes, max(self.reader.manifest.alignment, 4096))
        return buf

    def _load(self, key: Key, slot: int) -> int:
        layer, expert = key
        layout = self.layouts[layer]
        path = str(self.reader.expert_file(layer, expert))
        buf = self._staging()[: layout.length]
        n = self.io.read_into(path, buf)
        for t, rec in layout.tensors.items():
            for p, b in rec.parts.items():
                src = buf[b.offset : b.offset + b.length].view(dtypes.get(b.dtype).numpy).reshape(b.shape)
                dst = self._views[t][p][slot]
                if dst.dtype == np.float32 and b.dtype == "bfloat16":
                    np.left_shift(src, 16, out=dst.view(np.uint32), dtype=np.uint32)
                else:
                    np.copyto(dst, src, casting="unsafe")
        return n

    def fetch(self, layer: int, experts: Sequence[int]) -> np.ndarray:
        """Make ``experts`` of ``layer`` resident; returns their slot indices (int32, same order)."""
        keys = [(layer, int(e)) for e in experts]
        if len(set(keys)) > self.n_slots:
            raise ValueError(f"{len(set(keys))} experts requested at once but the pool has {self.n_slots} slots")
        pinned = set(keys)
        misses: list[tuple[Key, int]] = []
        for key in dict.fromkeys(keys):
            slot = self._slot_of.get(key)
            if slot is not None:
                self.counters.hits += 1
                self.policy.touch(key)
                continue
            self.counters.misses += 1
            if self._free:
                slot = self._free.pop()
            else:
                old = self.policy.victim(pinned)
                slot = self._slot_of.pop(old)
                self.policy.remove(old)
            self._slot_of[key] = slot
            self._key_of[slot] = key
            self.policy.insert(key)
            misses.append((key, slot))
        if misses:
            t0 = time.perf_counter()
            try:
                sizes = list(self._pool.map(lambda ks: self._load(*ks), misses))
            except BaseException:
                for key, slot in misses:  # those slots hold garbage now: forget them
                    self._slot_of.pop(key, None)
                    self._key_of[slot] = None
                    self.policy.remove(key)
                    self._free.append(slot)
                raise
            self.counters.io_wait_s += time.perf_counter() - t0
            self.counters.reads += len(sizes)
            self.counters.bytes_read += sum(sizes)
        return np.array([self._slot_of[k] for k in keys], dtype=np.int32)

    def resident(self) -> set[Key]:
        return set(self._slot_of)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
