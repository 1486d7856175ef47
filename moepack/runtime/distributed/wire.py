"""The messages between ranks: a fixed-size header each rank passes on before its payload, the payloads, and rank
0's watchdog (MLX cannot interrupt a blocked receive, so rank 0 waits on another thread, with a time limit)."""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable, Sequence, TypeVar

import mlx.core as mx
import numpy as np

from moepack.runtime.distributed.split import PipelineError

log = logging.getLogger(__name__)

T = TypeVar("T")

HEADER = 6  # int32: op, cache id, tokens, want all positions' logits, argument, spare
FORWARD, TRIM, FREE, STATS, STOP = range(5)
MAX_ERROR = 2048  # bytes of an error message passed down the chain
STAT_KEYS = ("bytes_read", "reads", "hits", "misses", "io_wait_us", "prefetch_issued", "prefetch_used",
             "prefetch_bytes", "payload_bytes", "compute_us", "tokens", "slots", "dense_bytes",
             "table_bytes_read", "table_cache_rows", "table_cache_bytes")  # tables: the first rank's (it embeds)
DTYPES = [mx.float32, mx.bfloat16, mx.float16]


def header(op: int, cid: int = -1, tokens: int = 0, all_logits: int = 0, arg: int = 0) -> mx.array:
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
