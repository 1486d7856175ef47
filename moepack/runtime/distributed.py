"""Pipeline-parallel inference over MLX distributed: each host runs a contiguous range of layers.

When one machine cannot hold even the dense part of a model (or serve it fast enough), ``moepack generate|serve
PACK --hosts hosts.json`` starts one process per host (``mlx.launch``, ring backend over TCP; MPI where the
hostfile asks for it). Every rank opens the same pack, computes the same :func:`plan`, and loads only its
:class:`Stage`: its layers' dense weights and an expert pool sized for its own MoE layers, so ``--memory-budget``
applies to each host's share. Rank 0 also holds the embeddings, the last rank the final norm and LM head.

One forward pass (a prefill chunk or a decoded token), ranks in a ring::

    rank 0: embed, its layers --h--> rank 1: its layers --h--> ... last rank: its layers, head --logits--> rank 0

Rank 0 drives (it is the process that prints tokens or serves HTTP); the others loop in :func:`serve_stage`,
holding a KV cache per sequence rank 0 has open. Messages go to ring neighbours only (all the ring backend
allows): a fixed-size header that each rank passes on before its payload, then the payload itself.

Failure: a rank that raises (a bad expert file, say) passes its error down the chain and rank 0 raises it for
that request only. A rank that dies closes its sockets and rank 0's wait fails at once; a rank that hangs, or a
machine that drops off the network, is caught by rank 0's watchdog (``timeout`` seconds per step). Either way the
engine turns unhealthy and every later call fails fast with the same :class:`PipelineError`.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from moepack import arch
from moepack.errors import MoepackError
from moepack.formats.manifest import Manifest
from moepack.formats.reader import PackReader
from moepack.runtime.engine import PREFILL_CHUNK, Engine

log = logging.getLogger(__name__)

T = TypeVar("T")
PIPELINE_ENV = "MOEPACK_PIPELINE"  # set by the launchers: this process is one rank of a pipeline
BACKEND_ENV = "MOEPACK_BACKEND"
DEFAULT_TIMEOUT = 300.0  # seconds rank 0 waits for one step (a prefill chunk can stream many experts)


class PipelineError(MoepackError):
    """A pipeline rank died, hung or could not start; the pipeline must be restarted."""


class RemoteError(MoepackError):
    """A request failed on another rank (that rank and the pipeline stay up)."""


# ---- the plan -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """Layers ``start .. stop-1`` of a ``count``-stage pipeline, plus embeddings (first) or norm and head (last)."""

    index: int
    count: int
    start: int
    stop: int
    tied: bool = False  # tie_word_embeddings: the last stage needs the embedding matrix as its head

    @property
    def layers(self) -> range:
        return range(self.start, self.stop)

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.count - 1

    def owns(self, name: str) -> bool:
        """Whether this stage loads the dense tensor ``name`` (a pack name)."""
        layer = arch.layer_of(name)
        if layer is not None:
            return self.start <= layer < self.stop
        if "embed_tokens" in name:
            return self.first or (self.last and self.tied)
        return self.last  # final norm, lm_head

    def trim(self, model: nn.Module) -> None:
        """Drop what other stages run from a freshly built (not yet loaded) CausalLM, so it is never allocated.

        Other stages' layers become empty modules in place, so the kept ones keep their index and their pack names.
        """
        layers = model.model.layers
        for i in range(len(layers)):
            if i not in self.layers:
                layers[i] = nn.Module()
        if not self.first and not (self.last and self.tied):
            model.model.pop("embed_tokens")
        if not self.last:
            model.model.pop("norm")
            model.pop("lm_head", None)


@dataclass
class StageShare:
    """What one host holds and reads (bytes as stored, which is what they take resident on Apple silicon's GPU)."""

    stage: Stage
    moe_layers: list[int]
    dense_bytes: int  # resident: the stage's dense weights
    expert_bytes: int  # on this host's SSD: the stage's expert files
    slot_bytes: int  # one expert slot
    read_per_token: int  # expert bytes a token reads when none is cached (top-k per MoE layer)
    minimum: int  # smallest budget: dense + top-k slots
    cost: int  # what the split balances: dense bytes + expected expert bytes per token

    def slots(self, budget: int, num_experts: int) -> int:
        if not self.slot_bytes:
            return 0
        return min(len(self.moe_layers) * num_experts, max(0, budget - self.dense_bytes) // self.slot_bytes)


@dataclass
class PipelinePlan:
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


def plan(reader: PackReader, hosts: int) -> PipelinePlan:
    """Split ``reader``'s pack over ``hosts`` stages. Needs only manifest.json and config.json, so it also plans
    packs that are not here (a manifest-only "virtual pack", see tools/virtual_pack.py)."""
    m, config = reader.manifest, arch.text_config(reader.config)
    a = m.architecture
    costs, first, last = layer_costs(m, config)
    try:
        ranges = split_layers(costs, hosts, first, last)
    except ValueError as e:
        raise PipelineError(str(e)) from e
    tied = bool(config.get("tie_word_embeddings"))
    layers_of = {el.layer: m.expert_layouts[el.layout] for el in m.experts}
    shares = []
    for i, r in enumerate(ranges):
        st = Stage(i, hosts, r.start, r.stop, tied)
        moe = [L for L in sorted(layers_of) if L in st.layers]
        dense = sum(rec.nbytes for name, rec in m.dense.items() if st.owns(name))
        slot = max((sum(t.nbytes for t in layers_of[L].tensors.values()) for L in moe), default=0)
        files = sum(layers_of[L].length for L in moe)
        shares.append(StageShare(st, moe, dense, files * a["num_experts"], slot, files * a["top_k"],
                                 dense + (a["top_k"] * slot if moe else 0),
                                 sum(costs[r.start : r.stop]) + (first if st.first else 0) + (last if st.last else 0)))
    return PipelinePlan(shares, a["num_experts"], a["top_k"], len(costs))


# ---- hosts and launching -------------------------------------------------------------------------


def read_hosts(hosts: str | int) -> tuple[int, list[str], str]:
    """``hosts``: a count (local processes on this machine) or mlx.launch's hostfile. -> (count, names, backend)."""
    if isinstance(hosts, int) or str(hosts).isdigit():
        n = int(hosts)
        if n < 1:
            raise PipelineError("--hosts needs at least 1 host")
        return n, ["local"] * n, "ring"
    path = Path(hosts)
    if not path.is_file():
        raise PipelineError(f"--hosts {hosts}: no such hostfile; give a number of local processes or mlx.launch's "
                            'hostfile, e.g. [{"ssh": "mac1.local", "ips": ["10.0.0.1"]}, {"ssh": "mac2.local", "ips": ["10.0.0.2"]}]')
    try:
        data = json.loads(path.read_text())
        entries = data["hosts"] if isinstance(data, dict) else data
        names = [h["ssh"] for h in entries]
    except (ValueError, KeyError, TypeError) as e:
        raise PipelineError(f"{hosts} is not an mlx.launch hostfile ({type(e).__name__}: {e}); expected a list of "
                            '{"ssh": host, "ips": [ip]} objects (or {"backend": ..., "hosts": [...]})') from e
    backend = (data.get("backend") if isinstance(data, dict) else None) or "ring"
    return len(names), names, backend


def in_pipeline() -> bool:
    """True in a process a launcher started as one rank of a pipeline."""
    return os.environ.get(PIPELINE_ENV) == "1"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def spawn_local(n: int, argv: Sequence[str], env: dict | None = None, **popen) -> list[subprocess.Popen]:
    """Start ``argv`` as ``n`` ranks on this machine, ring backend over loopback. Returns the processes unwaited."""
    hostfile = tempfile.NamedTemporaryFile("w", prefix="moepack-ring-", suffix=".json", delete=False)
    json.dump([[f"127.0.0.1:{p}"] for p in _free_ports(n)], hostfile)
    hostfile.close()
    atexit.register(Path(hostfile.name).unlink, missing_ok=True)  # the ranks read it once, at start-up
    base = {**os.environ, **(env or {}), PIPELINE_ENV: "1", BACKEND_ENV: "ring", "MLX_HOSTFILE": hostfile.name}
    return [subprocess.Popen(list(argv), env={**base, "MLX_RANK": str(r)}, **popen) for r in range(n)]


def wait_all(procs: Sequence[subprocess.Popen], timeout: float | None = None, grace: float = 10.0) -> list[int]:
    """Wait for every rank. Once one fails or rank 0 is done, the rest get ``grace`` seconds (to notice the lost
    peer, or rank 0's stop), then are killed, as mlx.launch does."""
    deadline = time.monotonic() + timeout if timeout else None
    failed_at = None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if failed_at is None and (procs[0].returncode is not None or any(p.returncode for p in procs)):
            failed_at = now
        if (deadline and now > deadline) or (failed_at and now > failed_at + grace):
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.05)
    return [p.wait() for p in procs]


def launch(hosts: str | int, args: Sequence[str]) -> int:
    """Run ``moepack ARGS`` once per host as a pipeline; returns the exit status.

    A count starts local processes (loopback ring: for trying the set-up on one machine); a hostfile goes to
    ``mlx.launch``, which starts rank i on host i over ssh (rank 0 first in the file) and relays their output.
    """
    n, _, backend = read_hosts(hosts)
    cmd = [sys.executable, "-m", "moepack.cli", *args]
    if isinstance(hosts, int) or str(hosts).isdigit():
        procs = spawn_local(n, cmd)
        try:
            codes = wait_all(procs)
        except KeyboardInterrupt:
            for p in procs:
                p.send_signal(signal.SIGINT)
            codes = wait_all(procs, timeout=10)
        return next((c for c in codes if c), 0)
    exe = shutil.which("mlx.launch") or shutil.which("mlx.launch", path=str(Path(sys.executable).parent))
    launcher = [exe] if exe else [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()"]
    full = [*launcher, "--hostfile", str(hosts), "--backend", backend, "--env", f"{PIPELINE_ENV}=1",
            "--env", f"{BACKEND_ENV}={backend}", "--", *cmd]
    log.info("launching: %s", " ".join(full))
    return subprocess.run(full).returncode


# ---- messages ------------------------------------------------------------------------------------

HEADER = 6  # int32: op, cache id, tokens, want all positions' logits, argument, spare
FORWARD, TRIM, FREE, STATS, STOP = range(5)
MAX_ERROR = 2048  # bytes of an error message passed down the chain
STAT_KEYS = ("bytes_read", "reads", "hits", "misses", "io_wait_us", "prefetch_issued", "prefetch_used",
             "prefetch_bytes", "payload_bytes", "compute_us", "tokens", "slots", "dense_bytes")
DTYPES = [mx.float32, mx.bfloat16, mx.float16]


def _header(op: int, cid: int = -1, tokens: int = 0, all_logits: int = 0, arg: int = 0) -> mx.array:
    return mx.array([op, cid, tokens, all_logits, arg, 0], dtype=mx.int32)


class Link:
    """This rank's two ring neighbours: receive from the previous rank, send to the next (rank 0 after the last)."""

    def __init__(self, group: mx.distributed.Group):
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.prev, self.next = (self.rank - 1) % self.size, (self.rank + 1) % self.size

    def send(self, x: mx.array, dst: int | None = None) -> None:
        dst = self.next if dst is None else dst
        try:
            mx.eval(mx.distributed.send(x, dst, group=self.group))
        except RuntimeError as e:  # MLX's ring: "connection to a peer was lost"
            raise PipelineError(f"rank {self.rank} lost its link to rank {dst}: {e}") from e

    def recv(self, shape: Sequence[int], dtype: mx.Dtype, src: int | None = None) -> mx.array:
        src = self.prev if src is None else src
        try:
            y = mx.distributed.recv(tuple(shape), dtype, src, group=self.group)
            mx.eval(y)
        except RuntimeError as e:
            raise PipelineError(f"rank {self.rank} lost its link to rank {src}: {e}") from e
        return y

    def send_result(self, payload: mx.array | None, error: str | None = None, dst: int | None = None) -> None:
        """A step's result: status [failed, error length], then the payload or the error text."""
        if error is None:
            self.send(mx.array([0, 0], dtype=mx.int32), dst)
            self.send(payload, dst)
        else:
            msg = np.frombuffer(error.encode()[:MAX_ERROR], dtype=np.uint8)
            self.send(mx.array([1, msg.size], dtype=mx.int32), dst)
            self.send(mx.array(msg), dst)

    def recv_result(self, shape: Sequence[int], dtype: mx.Dtype, src: int | None = None) -> mx.array | str:
        status = self.recv((2,), mx.int32, src).tolist()
        if status[0] == 0:
            return self.recv(shape, dtype, src)
        return bytes(np.array(self.recv((status[1],), mx.uint8, src))).decode(errors="replace")


class Watchdog:
    """Runs rank 0's communication on one thread and waits for it at most ``timeout`` seconds per call.

    MLX cannot interrupt a blocked receive, so a call that times out leaves that thread stuck; the pipeline is then
    broken for good (as it is when a peer's connection is lost) and every later call fails at once.
    Arrays handed to it must already be evaluated: MLX streams belong to the thread that made them.
    """

    def __init__(self, timeout: float | None):
        self.timeout = timeout
        self.error: str | None = None
        self._jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, name="moepack-pipeline", daemon=True).start()

    def _run(self) -> None:
        while True:
            fn, box, done = self._jobs.get()
            try:
                box["value"] = fn()
            except BaseException as e:  # noqa: BLE001 - reported on the caller's thread
                box["error"] = e
            done.set()

    def __call__(self, fn: Callable[[], T], what: str) -> T:
        if self.error:
            raise PipelineError(self.error)
        box: dict[str, Any] = {}
        done = threading.Event()
        self._jobs.put((fn, box, done))
        if not done.wait(self.timeout):
            self.error = (f"the pipeline did not answer within {self.timeout:g}s while {what}: a rank is stuck or its "
                          "host is unreachable; restart the pipeline (`--rank-timeout` sets this limit)")
        elif "error" in box:
            self.error = (f"lost a pipeline rank while {what} ({box['error']}); its own output says why it stopped; "
                          "restart the pipeline")
        if self.error:
            log.error(self.error)
            raise PipelineError(self.error)
        return box["value"]


# ---- the stage runtime ----------------------------------------------------------------------------


def forward_stage(engine: Engine, x: mx.array, cache: list | None) -> mx.array:
    """Tokens [1, T] (first stage) or hidden states [1, T, H] through this stage's layers; the last stage returns
    logits [1, T, vocab]. The same ops as a single process, so results are bitwise the same."""
    st, model = engine.stage, engine.model
    h = model.model.embed_tokens(x) if st.first else x
    h = model.run_layers(h, cache, st.layers)
    return model.head(h) if st.last else h


def stage_cache(engine: Engine) -> list:
    """Caches for this stage's layers only (the family's own make_cache, sliced)."""
    full = engine.model.make_cache()
    return [full[i] for i in engine.stage.layers]


def _stats_row(engine: Engine) -> list[int]:
    c = engine.store.counters
    vals = {**c.as_dict(), "io_wait_us": int(c.io_wait_s * 1e6), "compute_us": int(engine.compute_s * 1e6),
            "tokens": engine.tokens_processed, "slots": engine.plan.n_slots, "dense_bytes": engine.plan.dense_bytes}
    return [int(vals[k]) for k in STAT_KEYS]


def _timed_forward(engine: Engine, x: mx.array, cache: list | None) -> mx.array:
    t0, io0 = time.perf_counter(), engine.store.counters.io_wait_s
    out = forward_stage(engine, x, cache)
    mx.eval(out)
    engine.compute_s += time.perf_counter() - t0 - (engine.store.counters.io_wait_s - io0)
    engine.tokens_processed += x.shape[1]
    return out


def serve_stage(engine: Engine, link: Link) -> None:
    """A rank > 0: run its stage for rank 0 until rank 0 stops the pipeline (or a neighbour is lost)."""
    st = engine.stage
    hidden = int(engine.config["hidden_size"])
    caches: dict[int, list] = {}
    while True:
        op, cid, tokens, all_logits, arg, _ = link.recv((HEADER,), mx.int32).tolist()
        if not st.last:
            link.send(_header(op, cid, tokens, all_logits, arg))
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
            got = link.recv_result((1, tokens, hidden), engine.compute_dtype)
            out, error = None, got if isinstance(got, str) else None  # an earlier rank's error is passed on
            if error is None:
                try:
                    cache = caches.setdefault(cid, stage_cache(engine)) if cid >= 0 else None
                    out = _timed_forward(engine, got, cache)
                    if st.last:
                        out = (out[0] if all_logits else out[0, -1:]).astype(mx.float32)  # [T or 1, vocab]
                        mx.eval(out)
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


class PipelineEngine:
    """Rank 0's view of the pipeline, with the Engine interface the CLI, the generation loop and the server use:
    ``make_cache``, ``prefill``, ``logits``, ``generate``, ``stats``, ``close``, ``config``."""

    generate = Engine.generate

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
                self._send_all([*self._frees(), _header(op, cid, arg=arg)], "updating the other ranks' caches")

    def _frees(self) -> list[mx.array]:
        out = []
        while self._freed:
            out.append(_header(FREE, self._freed.pop()))
        return out

    def make_cache(self) -> PipelineCache:
        cid, self._next_id = self._next_id, self._next_id + 1
        cache = PipelineCache(stage_cache(self.engine), RemoteCache(self, cid))
        weakref.finalize(cache, self._freed.append, cid)  # only recorded here: messages go out in order, later
        return cache

    def _forward(self, ids: Sequence[int], cache: PipelineCache | None, all_logits: bool) -> np.ndarray:
        if self.error:
            raise PipelineError(self.error)
        with self._lock:
            x = mx.array([list(ids)], dtype=mx.int32)
            out = _timed_forward(self.engine, x, cache.local if cache is not None else None)  # [1, T, H] or logits
            if self.link.size == 1:
                got = (out[0] if all_logits else out[0, -1:]).astype(mx.float32)
            else:
                cid = cache.remote.cid if cache is not None else -1
                head = _header(FORWARD, cid, len(ids), int(all_logits))
                self._send_all([*self._frees(), head], "sending a step")
                self.watchdog(lambda: self.link.send_result(out), "sending activations")
                shape = (len(ids) if all_logits else 1, self.vocab)
                got = self.watchdog(lambda: self.link.recv_result(shape, mx.float32, self.link.size - 1),
                                    "waiting for the last rank's logits")
                if isinstance(got, str):
                    raise RemoteError(f"the forward pass failed on {got}")
        if cache is not None:
            cache.remote.offset += len(ids)
        return np.array(got)

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Full forward pass without a cache: float32 [len(token_ids), vocab]."""
        return self._forward(token_ids, None, True)

    def prefill(self, token_ids: Sequence[int], cache: PipelineCache) -> np.ndarray:
        """Append ``token_ids`` to ``cache`` in chunks of PREFILL_CHUNK, as Engine.prefill; float32 logits [vocab]."""
        ids = list(token_ids)
        for s in range(0, len(ids), PREFILL_CHUNK):
            last = self._forward(ids[s : s + PREFILL_CHUNK], cache, False)
        return last[0]

    def stats(self) -> dict:
        """Counters summed over the ranks (``per_rank`` lists each one's)."""
        rows = np.zeros((self.link.size, len(STAT_KEYS)), dtype=np.int64)
        rows[0] = _stats_row(self.engine)
        if self.link.size > 1 and self.healthy:
            with self._lock:
                self._send_all([*self._frees(), _header(STATS), mx.array(rows)], "collecting statistics")
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
                self._send_all([*self._frees(), _header(STOP)], "stopping the pipeline")
            except PipelineError:
                pass
            finally:
                self._lock.release()
        self._closed = True
        self.engine.close()


# ---- joining a pipeline ---------------------------------------------------------------------------


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
        stage = plan(PackReader(pack), link.size).stages[link.rank]
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


def run_rank(pack: str | Path, main: Callable[[PipelineEngine], T], memory_budget: int | str | None = None,
             timeout: float | None = DEFAULT_TIMEOUT, **engine_kwargs) -> T | None:
    """:func:`start`, then ``main(engine)`` on rank 0; returns its result there, None on the other ranks."""
    pipe = start(pack, memory_budget, timeout, **engine_kwargs)
    if pipe is None:
        return None
    try:
        return main(pipe)
    finally:
        pipe.close()


def exit_hard_if_broken(engine: Any, code: int = 1) -> None:
    """For atexit: once the pipeline broke, a thread may be blocked inside MLX's ring backend, whose teardown can
    hang or abort the interpreter's exit; leave at once instead, with ``code``."""
    if isinstance(engine, PipelineEngine) and engine.watchdog.error:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
