#!/usr/bin/env python
"""Bounded load test of `moepack serve` on loopback: many concurrent clients, some leaving mid-stream.

It starts the server (a subprocess bound to 127.0.0.1, with an API key) on the tiny test pack, or on --pack,
and runs ``--clients`` clients for ``--seconds``. Each client loops over a seeded mix: chat or completions,
streamed or not, ~20% streams it abandons after a few chunks, ~5% invalid bodies. Every request carries a
unique id (``user``) for the log. Oracles:

- correctness: each finished reply equals the greedy answer computed once per prompt in-process (own KV cache,
  no server) before the server starts: text, finish_reason and token counts;
- nothing lost or duplicated: every request ends in exactly one complete reply, a deliberate disconnect or
  the expected 400; response ids are unique; a stream has one finish_reason and ends with one ``[DONE]``; and the
  server's own counters agree: requests == completed + cancelled, completed + cancelled == replies +
  disconnects, failed == 0, and invalid bodies never became requests;
- no leak: once idle, no request is active or queued, the KV caches held are only the prefix cache's (at most
  its size), and the server's RSS is back within ``max(--rss-slack MiB, 10%)`` of the baseline taken after a
  warm-up pass (allocator caches and the prefix cache make the RSS move a little, a leak makes it grow with
  the number of requests).

    python tools/load_test.py                       # 50 clients, 120 s, tiny pack
    python tools/load_test.py --clients 10 --seconds 10 --json report.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-load-test"
PROMPTS = ["Hello", "Tell me about the fox", "How many experts are there?", "Once upon a time",
           "What is the capital of France?", "Count to ten", "Write a haiku about SSDs", "Why is the sky blue?"]
MAX_TOKENS = 12
MiB = 1 << 20


@dataclass
class Reference:
    text: str
    finish: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Tally:
    sent: Counter = field(default_factory=Counter)  # by kind
    ok: int = 0  # complete, correct replies
    disconnected: int = 0  # streams this tool abandoned on purpose
    rejected: int = 0  # invalid bodies answered with the expected 400
    lost: list = field(default_factory=list)  # (uid, why): no complete reply
    wrong: list = field(default_factory=list)  # (uid, why): a reply that differs from the reference
    duplicated: list = field(default_factory=list)  # (uid, why)
    ids: set = field(default_factory=set)
    latencies: list = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_pack(root: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_pack import build_pack

    return build_pack(root)


def references(pack: Path) -> dict[tuple[str, int], Reference]:
    """Greedy answers for every (endpoint, prompt), from a fresh in-process generation each (as the server's)."""
    import moepack
    from moepack.runtime.generation import Generation, TextStream
    from moepack.runtime.sampling import SamplingParams
    from moepack.runtime.tokenizer import Tokenizer
    from moepack.serve.toolcalls import format_for

    tok = Tokenizer(pack)
    engine = moepack.load(pack)
    keep_special = format_for(tok.chat_template) is not None  # as the server renders chat replies
    out = {}
    try:
        for i, p in enumerate(PROMPTS):
            chat = tok.encode(tok.apply_chat_template([{"role": "user", "content": p}], True), add_special_tokens=False)
            for kind, ids, skip in (("chat", chat, not keep_special), ("completions", tok.encode(p), True)):
                gen = Generation(engine, ids, MAX_TOKENS, SamplingParams(), tok.eos_token_ids)
                text = TextStream(tok, (), skip)
                toks = []
                for s in gen:
                    toks.append(s.token)
                    if s.token not in tok.eos_token_ids:
                        text.push(s.token)
                text.flush()
                out[kind, i] = Reference(text.text, gen.finish_reason, len(ids), len(toks))
    finally:
        engine.close()
    return out


def body(kind: str, i: int, uid: str, stream: bool) -> dict:
    b = {"model": "tiny", "max_tokens": MAX_TOKENS, "temperature": 0, "user": uid, "stream": stream}
    if stream:
        b["stream_options"] = {"include_usage": True}
    if kind == "chat":
        return {**b, "messages": [{"role": "user", "content": PROMPTS[i]}]}
    return {**b, "prompt": PROMPTS[i]}


URL = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
INVALID = [{"messages": []}, {"messages": [{"role": "user", "content": "x"}], "temperature": 3},
           {"prompt": "x", "logit_bias": {"1": 5}}, {"messages": [{"role": "user", "content": "x"}], "top_k": -5}]


def check_reply(t: Tally, uid: str, kind: str, ref: Reference, text: str, finish: str | None, usage: dict | None,
                rid: str) -> None:
    if rid in t.ids:
        t.duplicated.append((uid, f"response id {rid} seen twice"))
        return
    t.ids.add(rid)
    got = (text, finish, usage and usage["prompt_tokens"], usage and usage["completion_tokens"])
    want = (ref.text, ref.finish, ref.prompt_tokens, ref.completion_tokens)
    if got != want:
        t.wrong.append((uid, f"{kind}: got {got!r}, want {want!r}"))
    else:
        t.ok += 1


async def one_request(c: httpx.AsyncClient, t: Tally, refs: dict, rng: random.Random, uid: str) -> None:
    kind = rng.choice(["chat", "completions"])
    i = rng.randrange(len(PROMPTS))
    ref = refs[kind, i]
    roll = rng.random()
    if roll < 0.05:  # a careless client: must be a 400 and never reach the model
        t.sent["invalid"] += 1
        bad = rng.choice(INVALID)
        r = await c.post(URL["chat" if "messages" in bad else "completions"], json={**bad, "user": uid})
        if r.status_code == 400 and "error" in r.json():
            t.rejected += 1
        else:
            t.wrong.append((uid, f"invalid body answered {r.status_code}: {r.text[:200]}"))
        return
    stream, leave = roll < 0.55, roll < 0.25  # 50% streamed, of all requests 20% abandoned mid-stream
    t.sent[f"{kind}{'-stream' if stream else ''}{'-disconnect' if leave else ''}"] += 1
    t0 = time.perf_counter()
    if not stream:
        r = await c.post(URL[kind], json=body(kind, i, uid, False))
        if r.status_code != 200:
            t.lost.append((uid, f"{r.status_code}: {r.text[:200]}"))
            return
        j = r.json()
        ch = j["choices"][0]
        text = (ch["message"]["content"] or "") if kind == "chat" else ch["text"]
        check_reply(t, uid, kind, ref, text, ch["finish_reason"], j["usage"], j["id"])
        t.latencies.append(time.perf_counter() - t0)
        return
    async with c.stream("POST", URL[kind], json=body(kind, i, uid, True)) as r:
        if r.status_code != 200:
            t.lost.append((uid, f"{r.status_code}: {(await r.aread())[:200]!r}"))
            return
        events, done, stop_after = [], 0, rng.randint(1, 3)
        async for line in r.aiter_lines():
            if not line:
                continue
            if leave and len(events) >= stop_after:
                t.disconnected += 1
                return  # leaving the block closes the connection mid-stream
            if line == "data: [DONE]":
                done += 1
                continue
            if done:
                t.duplicated.append((uid, f"data after [DONE]: {line[:100]}"))
            events.append(json.loads(line.removeprefix("data: ")))
    if leave:  # the reply was shorter than the chunks this client meant to wait for
        t.disconnected += 1
        return
    if done != 1:
        (t.lost if done == 0 else t.duplicated).append((uid, f"{done} [DONE] events"))
        return
    if any("error" in e for e in events):
        t.lost.append((uid, f"error event: {events[-1]}"))
        return
    ids = {e["id"] for e in events}
    finishes = [e["choices"][0]["finish_reason"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    if len(ids) != 1 or len(finishes) != 1:
        t.duplicated.append((uid, f"{len(ids)} response ids, finish reasons {finishes}"))
        return
    key = "delta" if kind == "chat" else None
    text = "".join((e["choices"][0][key].get("content") or "") if key else e["choices"][0]["text"]
                   for e in events if e["choices"])
    usage = events[-1].get("usage")
    check_reply(t, uid, kind, ref, text, finishes[0], usage, ids.pop())
    t.latencies.append(time.perf_counter() - t0)


async def client_loop(n: int, base: str, t: Tally, refs: dict, deadline: float, seed: int) -> None:
    rng = random.Random(seed * 1000 + n)
    seq = 0
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {KEY}"},
                                 timeout=httpx.Timeout(300.0)) as c:
        while time.monotonic() < deadline:
            uid = f"c{n}-r{seq}"
            seq += 1
            try:
                await one_request(c, t, refs, rng, uid)
            except (httpx.HTTPError, ValueError, KeyError) as e:
                t.lost.append((uid, f"{type(e).__name__}: {e}"))


def stats(base: str) -> dict:
    return httpx.get(f"{base}/stats", headers={"Authorization": f"Bearer {KEY}"}, timeout=60).json()


def rss(base: str, pid: int) -> int:
    got = stats(base)["memory"]["rss_bytes"]
    if got is None:  # neither /proc nor psutil in the server: ask ps
        got = int(subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True).stdout) * 1024
    return got


def wait_idle(base: str, timeout: float = 60.0) -> dict:
    end = time.monotonic() + timeout
    while True:
        s = stats(base)
        if (s["server"]["active"] == 0 and s["server"]["queued"] == 0) or time.monotonic() > end:
            return s
        time.sleep(0.2)


def run(clients: int = 50, seconds: float = 120.0, pack: Path | None = None, parallel: int = 4, seed: int = 0,
        rss_slack: int = 32, log=print) -> dict:
    """Run the load test; returns the report (``report["failures"]`` is empty when every check passed)."""
    with tempfile.TemporaryDirectory(prefix="moepack-load-") as tmp:
        pack = Path(pack) if pack else tiny_pack(Path(tmp))
        t0 = time.perf_counter()
        refs = references(pack)
        log(f"references for {len(refs)} (endpoint, prompt) pairs in {time.perf_counter() - t0:.1f}s")
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([sys.executable, "-m", "moepack.cli", "serve", str(pack), "--port", str(port),
                                 "--api-key", KEY, "--parallel", str(parallel), "--model-id", "tiny"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "MOEPACK_API_KEY": ""})
        try:
            end = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the server exited: {proc.stderr.read()}")
                try:
                    if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > end:
                    raise TimeoutError("the server did not become healthy")
                time.sleep(0.2)
            return _load(base, proc.pid, refs, clients, seconds, seed, rss_slack, log)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _load(base: str, pid: int, refs: dict, clients: int, seconds: float, seed: int, rss_slack: int, log) -> dict:
    warm = Tally()

    async def warm_up():  # every prompt once per endpoint and mode, one at a time: also a correctness check
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=300) as c:
            for rng_seed in range(4 * len(PROMPTS)):
                await one_request(c, warm, refs, random.Random(rng_seed), f"warm-{rng_seed}")

    asyncio.run(warm_up())
    before = wait_idle(base)
    rss0 = rss(base, pid)
    log(f"baseline: RSS {rss0 / MiB:.1f} MiB, {before['server']['kv_caches']} KV caches; "
        f"{clients} clients for {seconds:.0f}s")
    t = Tally()
    deadline = time.monotonic() + seconds
    t0 = time.perf_counter()

    async def load():
        await asyncio.gather(*(client_loop(n, base, t, refs, deadline, seed) for n in range(clients)))

    asyncio.run(load())
    wall = time.perf_counter() - t0
    after = wait_idle(base)
    time.sleep(1.0)  # let the worker finish cancelling abandoned streams
    after = wait_idle(base)
    rss1 = rss(base, pid)
    d = {k: after["server"][k] - before["server"][k] for k in ("requests", "completed", "cancelled", "failed",
                                                              "completion_tokens")}
    valid = sum(n for k, n in t.sent.items() if k != "invalid")
    lat = sorted(t.latencies) or [0.0]
    s1 = after["server"]
    report = {
        "clients": clients, "seconds": round(wall, 1), "sent": dict(t.sent), "requests": sum(t.sent.values()),
        "ok": t.ok, "disconnected": t.disconnected, "rejected": t.rejected, "lost": len(t.lost),
        "wrong": len(t.wrong), "duplicated": len(t.duplicated), "server_delta": d,
        "throughput_req_s": round(valid / wall, 1), "tokens_s": round(d["completion_tokens"] / wall, 1),
        "latency_s": {"p50": round(lat[len(lat) // 2], 3), "p99": round(lat[int(len(lat) * 0.99)], 3),
                      "max": round(lat[-1], 3)},
        "idle_after": {k: s1[k] for k in ("active", "queued", "kv_caches", "prompt_cache_entries", "kv_bytes")},
        "rss_mib": {"baseline": round(rss0 / MiB, 1), "after": round(rss1 / MiB, 1),
                    "tolerance": round(max(rss_slack * MiB, 0.1 * rss0) / MiB, 1)},
        "mlx_active_mib": {"baseline": round(before["memory"]["mlx_active_bytes"] / MiB, 2),
                           "after": round(after["memory"]["mlx_active_bytes"] / MiB, 2)},
        "examples": {"lost": t.lost[:5], "wrong": t.wrong[:5], "duplicated": t.duplicated[:5],
                     "warm_up": warm.lost[:3] + warm.wrong[:3] + warm.duplicated[:3]},
    }
    failures = []
    if warm.lost or warm.wrong or warm.duplicated:
        failures.append("the warm-up pass (one request at a time) already failed")
    if t.lost or t.wrong or t.duplicated:
        failures.append(f"{len(t.lost)} lost, {len(t.wrong)} wrong, {len(t.duplicated)} duplicated replies")
    if t.ok + t.disconnected + t.rejected + len(t.lost) + len(t.wrong) + len(t.duplicated) != sum(t.sent.values()):
        failures.append("a request ended in no outcome at all")
    if d["requests"] != valid:
        failures.append(f"the server counted {d['requests']} requests, the clients sent {valid} valid ones")
    if d["failed"] or d["completed"] + d["cancelled"] != d["requests"]:
        failures.append(f"server outcomes {d} do not add up to its requests")
    if d["completed"] + d["cancelled"] != t.ok + t.disconnected + len(t.wrong):
        failures.append(f"server completed+cancelled {d['completed'] + d['cancelled']} != replies "
                        f"{t.ok + len(t.wrong)} + disconnects {t.disconnected}")
    if s1["active"] or s1["queued"] or s1["kv_caches"] != s1["prompt_cache_entries"] or s1["kv_caches"] > 2:
        failures.append(f"leaked requests or KV caches once idle: {report['idle_after']}")
    if rss1 - rss0 > max(rss_slack * MiB, 0.1 * rss0):
        failures.append(f"RSS grew from {rss0 / MiB:.1f} to {rss1 / MiB:.1f} MiB")
    report["failures"] = failures
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--pack", type=Path, help="a pack to serve (default: build the tiny test pack)")
    ap.add_argument("--parallel", type=int, default=4, help="the server's --parallel")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rss-slack", type=int, default=32, help="MiB the RSS may grow (or 10%% if more)")
    ap.add_argument("--json", type=Path, help="also write the report here")
    a = ap.parse_args()
    report = run(a.clients, a.seconds, a.pack, a.parallel, a.seed, a.rss_slack,
                 log=lambda m: print(m, file=sys.stderr))
    text = json.dumps(report, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")
    sys.exit(1 if report["failures"] else 0)


if __name__ == "__main__":
    main()
