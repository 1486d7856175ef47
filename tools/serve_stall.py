#!/usr/bin/env python
"""How long big or hostile chat requests take, and how long ``GET /health`` waits meanwhile (RELIABILITY.md,
section 5, "Big requests, hostile templates, real clients").

An in-process server (uvicorn on loopback, the tiny test pack's tokenizer, a scripted engine) gets one request at
a time while this script probes ``/health`` every 50 ms until the request is answered:

- 8 MiB of ``{"messages": [{}, {}, ...]}`` (2.8 million messages);
- 8 MiB of valid messages (about 200,000; refused for the context after rendering and tokenizing);
- with ``--templates``: a chat template of nested ``range(100000)`` loops (stopped at the render time limit).

    python tools/serve_stall.py [--templates]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent.parent / "tests")]

from conftest import run_app  # noqa: E402
from tiny_pack import ScriptedEngine, build_pack  # noqa: E402

from moepack.runtime.tokenizer import Tokenizer  # noqa: E402
from moepack.serve.app import create_app  # noqa: E402


def measure(base: str, **post) -> str:
    """Send one chat request; probe /health until it is answered. -> a line of figures."""
    done: dict = {}

    def send():
        t0 = time.perf_counter()
        r = httpx.post(f"{base}/v1/chat/completions", timeout=600, **post)
        done["r"] = (r.status_code, time.perf_counter() - t0)

    request = threading.Thread(target=send)
    request.start()
    waits = []
    while request.is_alive():
        t0 = time.perf_counter()
        httpx.get(f"{base}/health", timeout=600)
        waits.append(time.perf_counter() - t0)
        time.sleep(0.05)
    request.join()
    status, seconds = done["r"]
    return (f"{status} in {seconds:.1f}s; /health: {len(waits)} probes, slowest {max(waits) * 1000:.0f} ms, "
            f"median {sorted(waits)[len(waits) // 2] * 1000:.0f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--templates", action="store_true", help="also a template that loops for hours")
    args = ap.parse_args()
    tok = Tokenizer(build_pack(Path(tempfile.mkdtemp())))
    empty = b'{"messages":[' + b",".join([b"{}"] * ((8 << 20) // 3 - 10)) + b"]}"
    valid = {"messages": [{"role": "user", "content": "hi there"}] * ((8 << 20) // 40), "max_tokens": 2}
    with run_app(create_app(ScriptedEngine(tok, ["Hi"]), tok, model_id="tiny")) as base:
        print("8 MiB of empty messages:", measure(base, content=empty, headers={"Content-Type": "application/json"}))
        print("8 MiB of valid messages:", measure(base, json=valid))
    if args.templates:
        tok.chat_template = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
        with run_app(create_app(ScriptedEngine(tok, ["Hi"]), tok, model_id="tiny")) as base:
            print("nested-loop template:", measure(base, json={"messages": [{"role": "user", "content": "x"}]}))


if __name__ == "__main__":
    main()
