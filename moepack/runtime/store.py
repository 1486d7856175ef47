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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Sequence

import blake3
import mlx.core as mx
import numpy as np

from moepack.errors import ExpertReadError, PackError
from moepack.formats import dtypes
from moepack.formats.manifest import ExpertLayout, TensorRecord
from moepack.formats.reader import PackReader
from moepack.runtime.io import DirectReader, aligned_buffer
from moepack.runtime.memory import resident_dtype, slot_bytes
from moepack.runtime.policy import EvictionPolicy, Key, LRUPolicy

log = logging.getLogger(__name__)

@dataclass
class IOCounters:
    bytes_read: int = 0
    reads: int = 0
    hits: int = 0
    misses: int = 0
    io_wait_s: float = 0.0
    prefetch_issued: int = 0  # reads started early on a guess of the next layer's experts
    prefetch_used: int = 0  # ...of which the layer then asked for
    prefetch_bytes: int = 0
    payload_bytes: int = 0  # bytes of expert data (unpadded) behind the misses, for read amplification

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    @property
    def read_amplification(self) -> float:
        return self.bytes_read / self.payload_bytes if self.payload_bytes else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "hit_rate": self.hit_rate, "read_amplification": self.read_amplification}


class ExpertStore:
    def __init__(
        self,
        reader: PackReader,
        n_slots: int,
        compute_dtype: mx.Dtype = mx.float32,
        direct: bool = True,
        threads: int = 8,
        policy: EvictionPolicy | None = None,
        prefetch: bool = False,
        verify: bool = False,
        keep_decode_set: bool = True,
        layers: Sequence[int] | None = None,
    ):
        """``verify``: check each expert file's blake3 against the manifest the first time it is read.
        ``layers``: serve only these MoE layers (a pipeline stage's, runtime/distributed/); default all."""
        self.reader = reader
        self.verify = verify
        # A prompt's reads enter the pool as first victims and each layer's most used experts are kept afterwards,
        # so a long prompt does not flush the decode working set (False: prompt reads are ordinary, as in decode).
        self.keep_decode_set = keep_decode_set
        self._verified: set[Key] = set()
        self.n_slots = n_slots
        self.compute_dtype = compute_dtype
        self.io = DirectReader(direct)
        self.policy = policy or LRUPolicy()
        self.counters = IOCounters()
        layouts = {reader.manifest.experts[i].layer: reader.expert_layout(reader.manifest.experts[i].layer)
                   for i in range(len(reader.manifest.experts))
                   if layers is None or reader.manifest.experts[i].layer in layers}
        self.layouts = layouts
        first = next(iter(layouts.values()), ExpertLayout(0, {}))  # a stage may hold no MoE layer: an empty pool
        for L, lay in layouts.items():  # one pool serves every layer, so shapes must agree
            if {t: {p: (b.shape, b.dtype) for p, b in r.parts.items()} for t, r in lay.tensors.items()} != \
               {t: {p: (b.shape, b.dtype) for p, b in r.parts.items()} for t, r in first.tensors.items()}:
                raise PackError(f"layer {L}'s experts differ in shape or encoding from the others; this runtime needs one shape")
        self.records: dict[str, TensorRecord] = first.tensors
        self.file_bytes = max((lay.length for lay in layouts.values()), default=0)
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
        self._io = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="moepack-io")
        self._inflight: dict[Key, Future] = {}
        self._in_use: set[Key] = set()
        self._guessed: set[Key] = set()  # prefetched and not yet asked for
        self.prefetching = prefetch
        # Prefetch pays only when guesses are mostly right (a wrong one is a whole extra expert read), so it
        # pauses while the running accuracy is below min_accuracy and probes every 16th call to notice recovery.
        self.accuracy = 1.0
        self.min_accuracy = 0.75
        self._prefetch_calls = 0
        self.heat: dict[Key, int] = {}  # accesses per expert over this run (for `moepack profile`)
        self.payload = {L: sum(r.nbytes for r in lay.tensors.values()) for L, lay in layouts.items()}

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The I/O threads, which the streamed tables' reads share (runtime/tables.py)."""
        return self._io

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
        try:
            n = self.io.read_into(path, buf)
        except (OSError, PackError) as e:  # missing, truncated, EIO, a FIFO: this call fails, the store stays usable
            raise ExpertReadError(f"{path}: cannot read expert {expert} of layer {layer} "
                                  f"({getattr(e, 'strerror', None) or e}); "
                                  f"`moepack verify {self.reader.root}` checks the whole pack", path) from e
        if self.verify and key not in self._verified:
            if blake3.blake3(buf).hexdigest() != self.reader.expert_digest(layer, expert):
                raise ExpertReadError(f"{path}: blake3 mismatch, expert {expert} of layer {layer} is corrupt "
                                      f"(`moepack verify {self.reader.root}` checks the whole pack)", path)
            self._verified.add(key)  # checked once: later reads of it are not hashed again
        for t, rec in layout.tensors.items():
            for p, b in rec.parts.items():
                src = buf[b.offset : b.offset + b.length].view(dtypes.get(b.dtype).numpy).reshape(b.shape)
                dst = self._views[t][p][slot]
                if dst.dtype == np.float32 and b.dtype == "bfloat16":
                    np.left_shift(src, 16, out=dst.view(np.uint32), dtype=np.uint32)
                else:
                    np.copyto(dst, src, casting="unsafe")
        return n

    def _assign(self, key: Key, pinned: set[Key], cold: bool = False) -> int:
        """Give ``key`` a slot: a free one, or the policy's victim among unpinned, settled experts. ``cold``: enter
        it as the policy's next victim."""
        if self._free:
            slot = self._free.pop()
        else:
            try:
                old = self.policy.victim(pinned | set(self._inflight))
            except RuntimeError:  # the rest of the pool is being prefetched: let those reads land first
                for k in list(self._inflight):
                    try:
                        self._settle(k)
                    except Exception:
                        pass
                old = self.policy.victim(pinned)
            slot = self._slot_of.pop(old)
            self.policy.remove(old)
            self._guessed.discard(old)
        self._slot_of[key] = slot
        self._key_of[slot] = key
        self.policy.insert(key, cold)
        return slot

    def _forget(self, key: Key) -> None:
        """Drop a key whose read failed: its slot holds garbage."""
        slot = self._slot_of.pop(key, None)
        self.policy.remove(key)
        self._guessed.discard(key)
        if slot is not None:
            self._key_of[slot] = None
            self._free.append(slot)

    def _settle(self, key: Key) -> None:
        """Wait for an in-flight read of ``key``; a failed one is forgotten and its error raised."""
        fut = self._inflight.pop(key)
        try:
            n = fut.result()
        except BaseException:
            self._forget(key)
            raise
        self.counters.reads += 1
        self.counters.bytes_read += n
        self.counters.payload_bytes += self.payload[key[0]]

    def _reap(self) -> None:
        """Settle finished reads nobody waits for yet (guesses); acquired ones are left to :meth:`wait`, which reports
        their errors to the call that needs them."""
        for key in [k for k, f in self._inflight.items() if f.done() and k not in self._in_use]:
            try:
                self._settle(key)
            except Exception as e:  # a failed guess costs nothing; a real fetch re-reads and reports it
                log.debug("prefetch of %s failed: %s", key, e)

    def acquire(self, layer: int, experts: Sequence[int], busy: Sequence[int] = (), cold: bool = False) -> list[Key]:
        """Pin ``experts`` of ``layer`` and start reading the missing ones; returns at once (then :meth:`wait`).

        They stay pinned until the next ``acquire``, with ``busy`` (experts of ``layer`` a batch is still computing
        on while this one loads). ``cold``: read for a prompt, which visits every expert it needs once, so they go
        in as the policy's first victims rather than pushing the decode working set out (:meth:`keep`).
        """
        keys = [(layer, int(e)) for e in experts]
        uniq = list(dict.fromkeys(keys))
        pinned = set(uniq) | {(layer, int(e)) for e in busy}
        if len(pinned) > self.n_slots:
            raise ValueError(f"{len(pinned)} experts requested at once but the pool has {self.n_slots} slots")
        self._reap()
        self._in_use = pinned
        guessed = {k for k in self._guessed if k[0] == layer}
        if guessed:  # score the guesses made for this layer
            used = len(guessed & self._in_use)
            self.counters.prefetch_used += used
            self.accuracy = 0.8 * self.accuracy + 0.2 * used / len(guessed)
            self._guessed -= guessed
        for key in uniq:
            self.heat[key] = self.heat.get(key, 0) + 1
            if key in self._inflight or key in self._slot_of:
                self.counters.hits += 1
                if key in self._slot_of and key not in self._inflight:
                    self.policy.touch(key)
            else:
                self.counters.misses += 1
                slot = self._assign(key, self._in_use, cold)
                self._inflight[key] = self._io.submit(self._load, key, slot)
        return keys

    def slots(self, keys: Sequence[Key]) -> np.ndarray:
        """Slot indices of acquired ``keys`` (int32), whether or not their reads have landed."""
        return np.array([self._slot_of[k] for k in keys], dtype=np.int32)

    def pending(self, keys: Sequence[Key]) -> set[Key]:
        """Which of ``keys`` are still being read."""
        return {k for k in keys if k in self._inflight}

    def wait(self, keys: Sequence[Key]) -> np.ndarray:
        """Wait for the reads of acquired ``keys``; returns their slot indices (int32, same order). A failed read
        raises (this call fails; the store stays usable)."""
        waiting = [k for k in dict.fromkeys(keys) if k in self._inflight]
        if waiting:
            t0 = time.perf_counter()
            error = None
            for key in waiting:
                try:
                    self._settle(key)
                except BaseException as e:
                    error = error or e
            self.counters.io_wait_s += time.perf_counter() - t0
            if error is not None:
                raise error
        return self.slots(keys)

    def fetch(self, layer: int, experts: Sequence[int]) -> np.ndarray:
        """Make ``experts`` of ``layer`` resident; returns their slot indices (int32, same order).

        They stay pinned until the next ``fetch``: the caller computes on their slots in between.
        """
        return self.wait(self.acquire(layer, experts))

    def keep(self, layer: int, experts: Sequence[int]) -> None:
        """After a prompt's pass through ``layer``: mark its most used ``experts`` recently used, so the decode that
        follows finds each layer's likely experts still cached (the rest of the prompt's reads go first)."""
        for e in experts:
            key = (layer, int(e))
            if key in self._slot_of and key not in self._inflight:
                self.policy.touch(key)

    def prefetch(self, layer: int | None, experts: Sequence[int], exact: bool = False) -> None:
        """Start reading experts a later layer will probably need; returns at once.

        Slots of the experts in use (the last ``fetch``) and of reads in flight are never taken. ``exact``: the
        experts are known, not guessed (a hash-routed layer's), so poor accuracy of past guesses does not hold them
        back.
        """
        if layer is None or layer not in self.layouts:
            return
        self._prefetch_calls += 1
        if not exact and self.accuracy < self.min_accuracy and self._prefetch_calls % 16:
            return  # guesses have been poor: a wasted read costs bandwidth; probe again now and then
        for e in dict.fromkeys(int(e) for e in experts):
            key = (layer, e)
            if key in self._slot_of or key in self._inflight:
                continue
            if len(self._in_use | self._inflight.keys()) + 1 > self.n_slots:
                return  # no slot may be taken without stalling the current layer
            slot = self._assign(key, self._in_use)
            self._inflight[key] = self._io.submit(self._load, key, slot)
            self._guessed.add(key)
            self.counters.prefetch_issued += 1

    def preload(self, keys: Sequence[Key]) -> int:
        """Warm start: read ``keys`` (hottest first) into free slots; returns how many were loaded."""
        keys = [k for k in dict.fromkeys(keys) if k[0] in self.layouts and k not in self._slot_of][: len(self._free)]
        for key in keys:
            self._inflight[key] = self._io.submit(self._load, key, self._assign(key, set()))
        loaded = 0
        for key in keys:
            try:
                self._settle(key)
                loaded += 1
            except ExpertReadError as e:  # a damaged expert fails the requests that need it, not the start-up
                log.warning("warm start skipped an expert: %s", e)
        return loaded

    def resident(self) -> set[Key]:
        return set(self._slot_of)

    def close(self) -> None:
        """Stop: reads not started are cancelled, reads under way finish (each is one bounded read of a regular
        file), then the I/O threads end."""
        for fut in self._inflight.values():
            fut.cancel()
        for key in list(self._inflight):
            try:
                self._settle(key)
            except Exception:
                pass
        self._io.shutdown(wait=True, cancel_futures=True)
