"""The one thread that runs the model for the server.

Requests (:class:`Job`) wait in a FIFO queue. The worker admits up to ``parallel`` of them and advances the
admitted ones together: each step is one forward pass of the batch (runtime/batch.py), every layer run once for
all of them, so the experts they share are read once per layer per step. Each keeps its own KV cache; a new
request's prompt joins between steps, in chunks of ``prefill_chunk`` tokens when several requests may run at once.
A job whose client went away is dropped at the next step. Finished sequences leave their KV cache in a
:class:`PromptCache`, so the next turn of a conversation only prefills the new messages.

Results go back through ``Job.emit`` (called on this thread; the server hands them to its event loop).
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from moepack.runtime.batch import Stepper, forward_rows
from moepack.runtime.generation import Generation, PromptCache, TextStream, Usage
from moepack.runtime.sampling import Sampled, SamplingParams
from moepack.runtime.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class Delta:
    text: str
    sampled: Sampled


@dataclass
class Done:
    finish_reason: str  # "stop" | "length" | "cancelled"
    usage: Usage


@dataclass
class Failed:
    message: str


Event = Delta | Done | Failed


@dataclass
class Job:
    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    emit: Callable[[Event], None]
    stop: list[str] = field(default_factory=list)
    skip_special_tokens: bool = True
    constraint: Any = None  # a grammar the reply follows (serve/constrain.py)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class RequestCounters:
    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    completion_tokens: int = 0


def _nbytes(cache: list) -> int:
    """Bytes of the arrays a model's per-layer caches hold (any cache class: attributes with ``nbytes``)."""
    return sum(getattr(v, "nbytes", 0) for c in cache for v in list(getattr(c, "__dict__", {}).values())
               if hasattr(v, "shape"))


class _Running:
    """An admitted job: its generation, stepped a forward pass at a time, and its text stream."""

    def __init__(self, job: Job, gen: Generation, text: TextStream, chunk: int | None):
        self.job, self.gen, self.text = job, gen, text
        self.stepper = Stepper(gen, chunk)


# Prompt tokens a request feeds per step while others may decode beside it (--parallel above 1).
PREFILL_CHUNK = 512


class Worker:
    def __init__(self, engine: Any, tokenizer: Tokenizer, parallel: int = 1, prompt_cache: int = 2,
                 prefill_chunk: int | None = PREFILL_CHUNK):
        self.engine = engine
        self.tokenizer = tokenizer
        self.parallel = max(1, parallel)
        # chunked only when requests may share steps, the same for every request (its output never depends on
        # what runs beside it); alone, a prompt goes through in one pass (each expert read once per layer)
        self.chunk = prefill_chunk if self.parallel > 1 else None
        self.steps = 0  # batched forward passes
        self.rows = 0  # requests in them, summed (rows / steps: the mean batch)
        self.stop_tokens = set(tokenizer.eos_token_ids)
        self.cache = PromptCache(prompt_cache)
        self.counters = RequestCounters()
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.active: list[_Running] = []
        self._thread = threading.Thread(target=self._run, name="moepack-generate", daemon=True)
        self._closed = False

    def start(self) -> "Worker":
        self._thread.start()
        return self

    def submit(self, job: Job) -> None:
        if self._closed:
            raise RuntimeError("the generation worker has stopped")
        self.counters.requests += 1
        self.queue.put(job)

    def close(self, timeout: float = 10.0) -> None:
        self._closed = True
        self.queue.put(None)
        self._thread.join(timeout)

    def stats(self) -> dict:
        """Counters and what is held now: ``kv_caches`` (the running requests' plus the prefix cache's) and their
        ``kv_bytes``, which a leak would grow without bound."""
        caches = [r.gen.cache for r in list(self.active)] + [c for _, c in list(self.cache.entries)]
        return {**self.counters.__dict__, "active": len(self.active), "queued": self.queue.qsize(),
                "batch_steps": self.steps, "batch_rows": self.rows,
                "prompt_cache_entries": len(self.cache.entries), "kv_caches": len(caches),
                "kv_bytes": sum(_nbytes(c) for c in caches)}

    # ---- the thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            if self._closed:  # shutting down: end what runs, answer what waits
                for r in list(self.active):
                    self._finish(r, "cancelled")
                while not self.queue.empty():
                    if (job := self.queue.get_nowait()) is not None:
                        self._send(job, Failed("the server is shutting down"))
                return
            while len(self.active) < self.parallel:
                try:
                    job = self.queue.get(block=not self.active)
                except queue.Empty:
                    break
                if job is None:
                    break
                if job.cancelled.is_set():
                    self.counters.cancelled += 1
                    continue
                self._admit(job)
            for r in list(self.active):
                if r.job.cancelled.is_set():
                    self._finish(r, "cancelled")
            if self.active:
                self._step(list(self.active))

    def _admit(self, job: Job) -> None:
        try:
            cache, reused = self.cache.take(job.prompt, self.engine.make_cache)
            gen = Generation(self.engine, job.prompt, job.max_tokens, job.params, self.stop_tokens, cache, reused,
                             job.constraint)
            r = _Running(job, gen, TextStream(self.tokenizer, job.stop, job.skip_special_tokens), self.chunk)
        except Exception as e:
            log.exception("could not start a generation")
            self.counters.failed += 1
            self._send(job, Failed(f"could not start generation: {e}"))
            return
        self.active.append(r)

    def _step(self, batch: list[_Running]) -> None:
        """One forward pass of every running request, then each one's draw and text."""
        for r in batch:
            if r.stepper.samples_next():
                r.gen.begin()  # its grammar mask computes while the pass runs
        try:
            logits = forward_rows(self.engine, [(r.stepper.ids(), r.gen.cache) for r in batch])
        except Exception as e:  # one bad request (an unreadable expert file, say) must not stop the server...
            if len(batch) > 1:  # ...nor fail the others: rewind the step, then run each request alone
                log.warning("a batched step failed (%s: %s); running its requests one by one", type(e).__name__, e)
                for r in batch:
                    r.gen.settle()
                    if any(c.offset != len(r.gen.tokens) for c in r.gen.cache):  # a recurrent state: cannot rewind
                        self._fail(r, f"generation failed: {type(e).__name__}: {e}")
                    else:
                        self._step([r])
                return
            log.exception("generation failed")
            self._fail(batch[0], f"generation failed: {type(e).__name__}: {e}")
            return
        self.steps += 1
        self.rows += len(batch)
        for r, lg in zip(batch, logits):
            try:
                s = r.stepper.absorb(lg)
                if s is not None:
                    self._emit(r, s)
            except Exception as e:
                log.exception("generation failed")
                self._fail(r, f"generation failed: {type(e).__name__}: {e}")

    def _emit(self, r: _Running, s: Sampled) -> None:
        piece = "" if s.token in self.stop_tokens else r.text.push(s.token)
        if r.gen.finish_reason and not r.text.stopped:
            piece += r.text.flush()
        if not self._send(r.job, Delta(piece, s)):
            self._finish(r, "cancelled")
        elif r.text.stopped:
            self._finish(r, "stop")
        elif r.gen.finish_reason:
            self._finish(r, r.gen.finish_reason)

    def _release(self, r: _Running, keep_cache: bool = True) -> None:
        self.active.remove(r)
        if r.gen.constraint is not None:
            r.gen.constraint.close()
        if keep_cache:  # after a failure the cache's state is unknown: drop it
            r.gen.settle()
            self.cache.put(r.gen.tokens, r.gen.cache)

    def _finish(self, r: _Running, reason: str) -> None:
        self._release(r)
        usage = Usage(len(r.gen.prompt), len(r.gen.generated), r.gen.reused)
        c = self.counters
        c.prompt_tokens += usage.prompt_tokens
        c.cached_tokens += usage.cached_tokens
        c.completion_tokens += usage.completion_tokens
        if reason == "cancelled":
            c.cancelled += 1
        else:
            c.completed += 1
        self._send(r.job, Done(reason, usage))

    def _fail(self, r: _Running, message: str) -> None:
        if r in self.active:
            self._release(r, keep_cache=False)
        self.counters.failed += 1
        self._send(r.job, Failed(message))

    @staticmethod
    def _send(job: Job, event: Event) -> bool:
        """Deliver an event; False when the receiver is gone (its event loop closed)."""
        try:
            job.emit(event)
            return True
        except Exception:
            job.cancel()
            return False
