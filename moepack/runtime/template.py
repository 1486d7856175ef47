"""Chat templates are code from the pack: rendered in a bounded sandbox, and by the server in a child process.

:func:`render` runs a template in jinja2's immutable sandbox set up as transformers sets it up (trim_blocks,
lstrip_blocks, ``raise_exception``, ``tojson`` without ASCII escaping, ``strftime_now``), so a pack's template
gives the prompt it gives under transformers. On top of the sandbox (which already caps ``range`` at 100,000
items) it refuses a ``*`` or ``**`` whose result would be huge (``"x" * 3000000000`` would allocate 3 GB in one C
call) and output beyond ``max_chars``.

A template can still loop for hours (nested loops over a long list call nothing the sandbox sees) or fill
memory inside a ``{% set %}`` block, and a thread cannot be stopped from outside. :class:`Renderer` therefore
renders in a child process with a time limit and, on Linux, a memory limit; a render past its time is killed with
its process, and the next render starts a fresh one. The server renders there, off its event loop; the CLI's
chat renders in-process (a hung template there is one Ctrl-C away).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import threading
from datetime import datetime
from functools import lru_cache
from typing import Any

from jinja2 import Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

log = logging.getLogger(__name__)

MAX_CHARS = 32 << 20  # characters a rendered prompt may have (far beyond any context; an 8 MiB body renders to less)
TIME_LIMIT = 10.0  # seconds a render may take in the server (real templates take milliseconds)
MEMORY_LIMIT = 1 << 30  # bytes of address space a render may add to its process (Linux)
_MAX_INT_BITS = 1 << 16  # an ``**`` result larger than this is refused (9**9**9 would compute for minutes)


class TemplateLimitError(TemplateError):
    """A template went past a limit (time, memory, output or value size): the pack's template, not the request."""


def _raise(message: str):
    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with ``*`` and ``**`` checked before Python computes them."""

    intercepted_binops = frozenset({"*", "**"})

    def __init__(self, max_chars: int):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        self.max_chars = max_chars
        self.filters["tojson"] = _tojson
        self.globals["raise_exception"] = _raise
        self.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > self.max_chars:
                raise TemplateLimitError(f"the chat template repeats a value {n} times "
                                         f"(over {self.max_chars} items)")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            if right * abs(left).bit_length() > _MAX_INT_BITS:
                raise TemplateLimitError(f"the chat template computes a number with over {_MAX_INT_BITS} bits")
        return super().call_binop(context, operator, left, right)


@lru_cache(maxsize=4)
def compile_template(template: str, max_chars: int = MAX_CHARS) -> Template:
    """``template`` compiled in the bounded sandbox (cached); a syntax error raises jinja2's TemplateSyntaxError."""
    return _Sandbox(max_chars).from_string(template)


def render(template: str, variables: dict[str, Any], max_chars: int = MAX_CHARS) -> str:
    """``template`` rendered with ``variables``; TemplateLimitError past ``max_chars`` of output."""
    parts, size = [], 0
    for piece in compile_template(template, max_chars).generate(**variables):
        size += len(piece)
        if size > max_chars:
            raise TemplateLimitError(f"the chat template's output is over {max_chars} characters")
        parts.append(piece)
    return "".join(parts)


# ---- rendering in a child process ----------------------------------------------------------------


def _limit_memory(extra: int) -> None:
    """Cap this process's address space at its current size plus ``extra`` (Linux; elsewhere the time limit and
    the checks in :func:`render` still hold)."""
    try:
        import resource

        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        want = size + extra
        resource.setrlimit(resource.RLIMIT_AS, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))
    except (ImportError, OSError, ValueError):
        pass


def _child(conn, memory_limit: int) -> None:
    """The render process: one (template, variables, max_chars) in, ("ok", text) or ("error", message) out."""
    _limit_memory(memory_limit)
    while True:
        try:
            template, variables, max_chars = conn.recv()
        except (EOFError, OSError):  # the server has gone
            return
        try:
            reply = ("ok", render(template, variables, max_chars))
        except MemoryError:
            reply = ("limit", f"the chat template needed more than {memory_limit >> 20} MiB of memory")
        except TemplateLimitError as e:
            reply = ("limit", str(e))
        except Exception as e:  # the template's own error (raise_exception, a bad attribute...): the request's 400
            reply = ("error", f"{type(e).__name__}: {e}" if not isinstance(e, TemplateError) else str(e))
        conn.send(reply)


class Renderer:
    """Renders templates in a child process, one at a time, each within ``time_limit`` seconds (the process is
    killed past it, and started again for the next render). Thread-safe; ``close()`` ends the process."""

    def __init__(self, time_limit: float = TIME_LIMIT, memory_limit: int = MEMORY_LIMIT, max_chars: int = MAX_CHARS):
        self.time_limit, self.memory_limit, self.max_chars = time_limit, memory_limit, max_chars
        self._lock = threading.Lock()
        self._proc = None
        self._conn = None

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # no fork: the server process runs threads (MLX, the worker)
        ours, theirs = ctx.Pipe()
        self._proc = ctx.Process(target=_child, args=(theirs, self.memory_limit), name="moepack-template",
                                 daemon=True)
        self._proc.start()
        theirs.close()
        self._conn = ours

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(5)
            self._conn.close()
        self._proc = self._conn = None

    def __call__(self, template: str, variables: dict[str, Any]) -> str:
        with self._lock:
            if self._proc is None or not self._proc.is_alive():
                self._stop()
                self._start()
            try:
                self._conn.send((template, variables, self.max_chars))
                if not self._conn.poll(self.time_limit):
                    self._stop()
                    raise TemplateLimitError(f"the chat template did not finish within {self.time_limit:g}s")
                kind, value = self._conn.recv()
            except (EOFError, OSError):  # killed from outside, or by the memory limit
                self._stop()
                raise TemplateLimitError("the chat template's render process died (out of memory?)") from None
        if kind == "ok":
            return value
        raise (TemplateLimitError if kind == "limit" else TemplateError)(value)

    def close(self) -> None:
        with self._lock:
            self._stop()
