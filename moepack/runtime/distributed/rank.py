"""A rank's runtime: rank 0's :class:`PipelineEngine` (the engine interface over the whole pipeline) and the loop the
other ranks serve their layers in (:func:`serve_stage`), plus joining a pipeline (:func:`start`)."""

from __future__ import annotations

import logging
import os
import sys
import threading
import weakref
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from moepack.errors import MoepackError
from moepack.formats.reader import PackReader
from moepack.runtime.distributed.launcher import BACKEND_ENV
from moepack.runtime.distributed.split import PipelineError, split_pack
from moepack.runtime.distributed.wire import (DTYPES, FORWARD, FREE, HEADER, STAT_KEYS, STATS, STOP, TRIM, Link,
                                              Watchdog, header)
from moepack.runtime.engine import BaseEngine, Engine, Logits

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 300.0  # seconds rank 0 waits for one step (a long prompt can stream many experts)


class RemoteError(MoepackError):
    """A request failed on another rank (that rank and the pipeline stay up)."""


def _stats_row(engine: Engine) -> list[int]:
    c = engine.store.counters
    vals = {**c.as_dict(), "io_wait_us": int(c.io_wait_s * 1e6), "compute_us": int(engine.compute_s * 1e6),
            "tokens": engine.tokens_processed, "slots": engine.plan.n_slots, "dense_bytes": engine.plan.dense_bytes,
            **{k: v for k, v in engine.stats().items() if k.startswith("table_cache") or k == "table_bytes_read"}}
    return [int(vals[k]) for k in STAT_KEYS]


def serve_stage(engine: Engine, link: Link) -> None:
    """A rank > 0: run its stage for rank 0 until rank 0 stops the pipeline (or a neighbour is lost)."""
    st = engine.stage
    caches: dict[int, list] = {}
    while True:
        op, cid, tokens, all_logits, arg, _ = link.recv((HEADER,), mx.int32).tolist()
        if not st.last:
            link.send(header(op, cid, tokens, all_logits, arg))
        if op == STOP:
            return
        if op == FREE:
            caches.pop(cid, None)
        elif op == TRIM:
            for c in caches.get(cid, ()):
                if c.offset > arg:
                    c.trim(c.offset - arg)
        elif op == STATS:
            rows = link.recv((st.count, len(STAT_KEYS)), mx.int64)
            rows = np.array(rows)
            rows[st.index] = _stats_row(engine)
            link.send(mx.array(rows))
        elif op == FORWARD:
            ids = None
            if engine.needs_tokens:  # hash-routed layers: the token ids travel with the hidden state
                ids = link.recv((1, tokens), mx.int32)
                if not st.last:
                    link.send(ids)
            got = link.recv_result(engine.hidden_shape(tokens), engine.compute_dtype)
            out, error = None, got if isinstance(got, str) else None  # an earlier rank's error is passed on
            if error is None:
                try:
                    cache = caches.setdefault(cid, engine.make_cache()) if cid >= 0 else None
                    out = engine.run(got, cache, "all" if all_logits else "last", tokens=ids)
                    if st.last:
                        out = out[0]  # float32 [T or 1, vocab]
                except Exception as e:  # this request fails; the pipeline stays up
                    log.exception("stage %d failed a forward pass", st.index)
                    error = f"rank {link.rank}: {type(e).__name__}: {e}"
            link.send_result(out, error)


class RemoteCache:
    """Stands for the KV caches the other ranks keep for one sequence: ``offset`` and ``trim`` like a KVCache."""

    def __init__(self, engine: "PipelineEngine", cid: int):
        self.engine, self.cid, self.offset = engine, cid, 0

    def trim(self, n: int) -> None:
        self.offset = max(0, self.offset - n)
        self.engine._command(TRIM, self.cid, arg=self.offset)


class PipelineCache(list):
    """Rank 0's caches for its own layers, then a :class:`RemoteCache` for the rest; the generation loop sees one
    list of per-layer caches (trim_to, PromptCache work unchanged). Dropping it frees the other ranks' caches."""

    def __init__(self, local: list, remote: RemoteCache):
        super().__init__([*local, remote])
        self.local, self.remote = local, remote


class PipelineEngine(BaseEngine):
    """Rank 0's view of the pipeline, with the engine interface (runtime/engine.py) the CLI, the generation loop and
    the server use."""

    def __init__(self, engine: Engine, link: Link, timeout: float | None = DEFAULT_TIMEOUT):
        self.engine, self.link = engine, link
        self.config, self.reader, self.path, self.plan = engine.config, engine.reader, engine.path, engine.plan
        self.vocab = int(self.config["vocab_size"])
        self.watchdog = Watchdog(timeout)
        self._next_id = 0
        self._freed: list[int] = []  # caches dropped since the last message (freed with the next one)
        self._closed = False
        self._lock = threading.Lock()  # one message sequence at a time (the server's /stats runs on another thread)

    @property
    def healthy(self) -> bool:
        return self.watchdog.error is None and not self._closed

    @property
    def error(self) -> str | None:
        return self.watchdog.error or ("the pipeline was closed" if self._closed else None)

    @property
    def store(self):
        return self.engine.store

    def _send_all(self, messages: list[mx.array], what: str) -> None:
        mx.eval(*messages)
        self.watchdog(lambda: [self.link.send(m) for m in messages], what)

    def _command(self, op: int, cid: int = -1, arg: int = 0) -> None:
        if self.link.size > 1 and self.healthy:  # a broken pipeline's caches are never used again: nothing to fix
            with self._lock:
                self._send_all([*self._frees(), header(op, cid, arg=arg)], "updating the other ranks' caches")

    def _frees(self) -> list[mx.array]:
        out = []
        while self._freed:
            out.append(header(FREE, self._freed.pop()))
        return out

    def make_cache(self) -> PipelineCache:
        cid, self._next_id = self._next_id, self._next_id + 1
        cache = PipelineCache(self.engine.make_cache(), RemoteCache(self, cid))
        weakref.finalize(cache, self._freed.append, cid)  # only recorded here: messages go out in order, later
        return cache

    def _pass(self, ids: list[int], cache: PipelineCache | None, logits: Logits) -> np.ndarray:
        if self.error:
            raise PipelineError(self.error)
        all_logits = logits == "all"
        with self._lock:
            x = mx.array([ids], dtype=mx.int32)
            out = self.engine.run(x, cache.local if cache is not None else None, logits)  # hidden state or logits
            if self.link.size == 1:
                got = out[0]
            else:
                cid = cache.remote.cid if cache is not None else -1
                head = header(FORWARD, cid, len(ids), int(all_logits))
                self._send_all([*self._frees(), head, *([x] if self.engine.needs_tokens else [])], "sending a step")
                self.watchdog(lambda: self.link.send_result(out), "sending activations")
                shape = (len(ids) if all_logits else 1, self.vocab)
                got = self.watchdog(lambda: self.link.recv_result(shape, mx.float32, self.link.size - 1),
                                    "waiting for the last rank's logits")
                if isinstance(got, str):
                    raise RemoteError(f"the forward pass failed on {got}")
        if cache is not None:
            cache.remote.offset += len(ids)
        return np.array(got)

    def stats(self) -> dict:
        """Counters summed over the ranks (``per_rank`` lists each one's)."""
        rows = np.zeros((self.link.size, len(STAT_KEYS)), dtype=np.int64)
        rows[0] = _stats_row(self.engine)
        if self.link.size > 1 and self.healthy:
            with self._lock:
                self._send_all([*self._frees(), header(STATS), mx.array(rows)], "collecting statistics")
                rows = np.array(self.watchdog(lambda: self.link.recv(rows.shape, mx.int64, self.link.size - 1),
                                              "collecting statistics"))
        per_rank = [dict(zip(STAT_KEYS, map(int, r))) for r in rows]
        tot = {k: int(rows[:, i].sum()) for i, k in enumerate(STAT_KEYS)}
        n = tot["hits"] + tot["misses"]
        s = self.engine.store
        return {**tot, "hit_rate": tot["hits"] / n if n else 0.0, "io_wait_s": tot["io_wait_us"] / 1e6,
                "compute_s": tot["compute_us"] / 1e6, "tokens": per_rank[0]["tokens"],
                "read_amplification": tot["bytes_read"] / tot["payload_bytes"] if tot["payload_bytes"] else 0.0,
                "slot_bytes": self.engine.plan.slot_bytes, "expert_file_bytes": s.file_bytes, "io_threads": s.threads,
                "io_mode": s.io.mode, "ranks": self.link.size, "per_rank": per_rank}

    def close(self) -> None:
        """Stop the other ranks (they exit) and this rank's store. Without the stop (a step still running after 5 s,
        or a broken pipeline) they exit anyway once this process is gone: their link to it breaks."""
        if self._closed:
            return
        if self.link.size > 1 and self.healthy and self._lock.acquire(timeout=5):
            try:
                self._send_all([*self._frees(), header(STOP)], "stopping the pipeline")
            except PipelineError:
                pass
            finally:
                self._lock.release()
        self._closed = True
        self.engine.close()


def _pack_words(reader: PackReader | None) -> list[int]:
    if reader is None:
        return [0, 0, 0, 0]
    from moepack.runtime.heat import pack_id

    h = pack_id(reader)
    return [int(h[i : i + 7], 16) for i in range(0, 28, 7)]


def _handshake(link: Link, ok: bool, reader: PackReader | None, dtype: mx.Dtype | None) -> None:
    """Every rank reports whether it loaded, which pack and which activation dtype; all must agree."""
    mine = [int(ok), *_pack_words(reader), next((i for i, d in enumerate(DTYPES) if d == dtype), -1) if dtype else -1]
    try:
        rows = np.array(mx.distributed.all_gather(mx.array([mine], dtype=mx.int32), group=link.group)).tolist()
    except RuntimeError as e:
        raise PipelineError(f"rank {link.rank} lost the other ranks while starting (one failed to start? see its "
                            f"messages): {e}") from e
    failed = [r for r, row in enumerate(rows) if not row[0]]
    if failed:
        raise PipelineError(f"rank(s) {', '.join(map(str, failed))} could not load their stage (see their messages)")
    if any(row[1:5] != rows[0][1:5] for row in rows):
        raise PipelineError("the hosts hold different packs at this path (their manifest.json differ); every host "
                            "needs the same pack")
    if any(row[5] != rows[0][5] for row in rows):
        raise PipelineError("the hosts compute in different dtypes (a GPU host and a CPU-only one?); "
                            "activations must match")


def join(pack: str | Path, memory_budget: int | str | None = None, **engine_kwargs) -> tuple[Engine, Link]:
    """Join the pipeline this process was launched into and load this rank's stage."""
    backend = os.environ.get(BACKEND_ENV, "ring")
    try:
        group = mx.distributed.init(strict=True, backend=backend)
    except RuntimeError as e:
        raise PipelineError(f"could not join the pipeline over MLX's {backend} backend: {e}") from e
    link = Link(group)
    engine, error = None, None
    try:
        stage = split_pack(PackReader(pack), link.size).stages[link.rank]
        log.info("rank %d of %d: layers %d-%d", link.rank, link.size, stage.start, stage.stop - 1)
        engine = Engine(pack, memory_budget=memory_budget, stage=stage, **engine_kwargs)
    except Exception as e:  # still take part in the handshake, so the others learn of it instead of hanging
        log.error("rank %d could not load its stage: %s", link.rank, e)
        error = e
    _handshake(link, error is None, engine.reader if engine else None, engine.compute_dtype if engine else None)
    return engine, link


def start(pack: str | Path, memory_budget: int | str | None = None, timeout: float | None = DEFAULT_TIMEOUT,
          **engine_kwargs) -> PipelineEngine | None:
    """Be this process's rank. Rank 0 gets the :class:`PipelineEngine` (its ``close()`` stops the others); any other
    rank serves its layers until rank 0 stops the pipeline, then gets None."""
    engine, link = join(pack, memory_budget, **engine_kwargs)
    if link.rank == 0:
        return PipelineEngine(engine, link, timeout)
    try:
        serve_stage(engine, link)
    finally:
        engine.close()
    return None


def exit_hard_if_broken(engine: Any, code: int = 1) -> None:
    """For atexit: once the pipeline broke, a thread may be blocked inside MLX's ring backend, whose teardown can
    hang or abort the interpreter's exit; leave at once instead, with ``code``."""
    if isinstance(engine, PipelineEngine) and engine.watchdog.error:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
