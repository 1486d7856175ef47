"""``moepack bench``: measure the read path and decode against the device's own limit, in one run.

Protocol. *Cold*: a fresh engine (empty expert pool) after the pack's pages were dropped from the page cache
(``posix_fadvise(DONTNEED)`` on Linux; macOS cannot drop them without ``sudo purge``, which the report says).
*Warm*: the same engine runs the same prompt again with its pool as the cold run left it. The device's
sequential read bandwidth is measured in the same run with direct reads of the pack's own files, and
``io_only`` replays the expert fetches recorded during the cold decode on a fresh pool without computing,
so the read path can be judged against the device on any machine, however slow its compute.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from moepack.errors import MoepackError
from moepack.formats.files import open_regular
from moepack.formats.reader import PackReader
from moepack.runtime.engine import Engine
from moepack.runtime.io import DirectReader, aligned_buffer
from moepack.runtime.generation import decode, prefill
from moepack.runtime.memory import peak_rss, reset_peak_rss
from moepack.runtime.policy import DEFAULT_POLICY
from moepack.runtime.store import ExpertStore
from moepack.units import human_bytes

log = logging.getLogger(__name__)


def drop_page_cache(reader: PackReader) -> str:
    """Evict the pack's files from the page cache where the platform allows it; returns how (or why not)."""
    if not hasattr(os, "posix_fadvise"):
        return "not dropped: this platform has no posix_fadvise (on macOS run `sudo purge` first)"
    for rel in reader.manifest.files:
        fd = open_regular(reader.file_path(rel))  # a FIFO in the pack fails here instead of blocking
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "posix_fadvise(DONTNEED) on every pack file"


def _timed_reads(io: DirectReader, jobs: list[tuple[Path, int, int]], threads: int) -> float:
    """Read every (path, offset, length) with ``threads`` threads (one aligned buffer each); returns GB/s."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    size = max((n for _, _, n in jobs), default=0)
    bufs: dict[int, np.ndarray] = {}

    def read(job):
        b = bufs.get(threading.get_ident())
        if b is None:  # one buffer per thread, allocated once
            b = bufs[threading.get_ident()] = aligned_buffer(size)
        path, off, n = job
        return io.read_into(str(path), b[:n], off)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        got = sum(pool.map(read, jobs))
    s = time.perf_counter() - t0
    return got / s / 1e9 if s else 0.0


def device_bandwidth(reader: PackReader, max_bytes: int = 512 << 20, chunk: int = 8 << 20, threads: int = 8) -> dict:
    """The pack device's direct read bandwidth, three ways, each over different bytes of the pack and after
    dropping the page cache: one stream of ``chunk``-sized sequential reads (queue depth 1); the same with
    ``threads`` reads in flight; and whole expert files at random with ``threads`` threads, as the runtime reads.
    The best of the three is the device's limit the read path is compared with."""
    io = DirectReader()
    files = sorted(reader.file_path(r) for r in reader.manifest.files if r.endswith(".bin"))

    def chunks(paths) -> list[tuple[Path, int, int]]:
        out, total = [], 0
        for path in paths:
            size = path.stat().st_size
            for off in range(0, size, chunk):
                n = min(chunk, size - off)
                if total + n > max_bytes:
                    return out
                out.append((path, off, n))
                total += n
        return out

    experts = [reader.expert_file(el.layer, e) for el in reader.manifest.experts for e in range(len(el.files))]
    experts = [experts[i] for i in np.random.default_rng(0).permutation(len(experts))]
    length = reader.expert_layout(reader.moe_layers[0]).length if reader.moe_layers else 0
    whole = [(p, 0, length) for p in experts[: max(1, max_bytes // max(length, 1))]]
    result = {"mode": io.mode, "threads": threads, "bytes_each": max_bytes}
    for name, jobs, n in (("sequential_gbps", chunks(files), 1), ("sequential_qd_gbps", chunks(files[::-1]), threads),
                          ("expert_files_gbps", whole, threads)):
        drop_page_cache(reader)
        result[name] = _timed_reads(io, jobs, n) if jobs else 0.0
    result["device_gbps"] = max(result["sequential_gbps"], result["sequential_qd_gbps"], result["expert_files_gbps"])
    return result


@dataclass
class TokenRecord:
    ms: float
    io_ms: float
    compute_ms: float
    bytes_read: int
    hits: int
    misses: int
    table_bytes: int = 0  # bytes read from streamed tables (SPEC 3.6) for this token, apart from expert bytes
    table_lookups: int = 0  # table rows this token's pass needed (its distinct tokens, per table)
    table_hits: int = 0  # ...of which the row cache held

    @property
    def other_ms(self) -> float:
        return max(0.0, self.ms - self.io_ms - self.compute_ms)


@dataclass
class RunReport:
    label: str
    prompt_tokens: int
    prompt_s: float
    tokens: list[TokenRecord] = field(default_factory=list)
    counters: dict = field(default_factory=dict)
    table_counters: dict = field(default_factory=dict)  # the streamed tables', over the run (prompt included)

    def summary(self, expert_payload: int) -> dict:
        dec = self.tokens[1:] or self.tokens  # the first token's time belongs to the prompt
        n = len(dec)
        c = self.counters
        needed = (c.get("misses", 0) + c.get("prefetch_used", 0)) * expert_payload
        io_s = c.get("io_wait_s", 0.0)
        return {
            "label": self.label,
            "prompt_tok_s": self.prompt_tokens / self.prompt_s if self.prompt_s else 0.0,
            "decode_tok_s": n / (sum(t.ms for t in dec) / 1e3) if n else 0.0,
            "ms_per_token": {k: sum(getattr(t, k) for t in dec) / n if n else 0.0
                             for k in ("ms", "compute_ms", "io_ms", "other_ms")},
            "bytes_read_per_token": sum(t.bytes_read for t in dec) / n if n else 0.0,
            "hit_rate": c.get("hit_rate", 0.0),
            # streamed tables apart: expert figures above count expert files only
            "table_bytes_per_token": sum(t.table_bytes for t in dec) / n if n else 0.0,
            "table_rows_per_token": sum(t.table_lookups for t in dec) / n if n else 0.0,
            "table_hit_rate": self.table_counters.get("hit_rate", 0.0),
            "table_bytes_read": self.table_counters.get("bytes_read", 0),
            "table_reads": self.table_counters.get("reads", 0),
            "read_amplification": c.get("bytes_read", 0) / needed if needed else 0.0,
            "fetch_gbps": c.get("bytes_read", 0) / io_s / 1e9 if io_s else 0.0,
            "prefetch": {k: c.get(k, 0) for k in ("prefetch_issued", "prefetch_used")},
        }


def _run(engine: Engine, prompt: list[int], n: int, label: str) -> RunReport:
    engine.reset_counters()
    engine.compute_s = 0.0
    rep = RunReport(label, len(prompt), 0.0)
    t_prev = time.perf_counter()
    snap = (0.0, 0.0, 0, 0, 0, 0, 0, 0)
    first = True
    for _ in engine.generate(prompt, n):
        now = time.perf_counter()
        cc, tc = engine.store.counters, engine.table_counters()
        cur = (engine.io_wait_s(), engine.compute_s, cc.bytes_read, cc.hits, cc.misses, tc.bytes_read, tc.lookups,
               tc.hits)
        d = [a - b for a, b in zip(cur, snap)]
        if first:
            rep.prompt_s, first = now - t_prev, False
        else:
            rep.tokens.append(TokenRecord((now - t_prev) * 1e3, d[0] * 1e3, d[1] * 1e3, *map(int, d[2:])))
        snap, t_prev = cur, now
    rep.counters = engine.store.counters.as_dict()
    rep.table_counters = engine.table_counters().as_dict()
    return rep


def io_only(engine: Engine, trace: list[tuple[str, int, list[int]]]) -> dict:
    """Replay recorded fetches (and prefetches) on a fresh pool of the same size, without computing."""
    store = ExpertStore(engine.reader, engine.plan.n_slots, engine.compute_dtype, direct=engine.store.io.direct,
                        threads=engine.store.threads, prefetch=True)
    drop_page_cache(engine.reader)
    t0 = time.perf_counter()
    for kind, layer, experts in trace:
        (store.fetch if kind == "fetch" else store.prefetch)(layer, experts)
    store.close()
    wall = time.perf_counter() - t0
    c = store.counters
    return {"fetches": len(trace), "bytes_read": c.bytes_read, "wall_s": wall,
            "gbps": c.bytes_read / wall / 1e9 if wall else 0.0, "read_amplification": c.read_amplification}


def record_trace(engine: Engine) -> list:
    """Wrap the store so every request for experts (``acquire``) and prefetch is logged as (kind, layer, experts)."""
    trace: list = []
    store = engine.store
    acquire, prefetch = store.acquire, store.prefetch

    def f(layer, experts, *args, **kwargs):
        trace.append(("fetch", layer, [int(e) for e in experts]))
        return acquire(layer, experts, *args, **kwargs)

    def p(layer, experts):
        trace.append(("prefetch", layer, [int(e) for e in experts]))
        return prefetch(layer, experts)

    store.acquire, store.prefetch = f, p
    return trace


def prompt_run(pack: str | Path, prompt: list[int], memory_budget=None, policy: str = DEFAULT_POLICY, io_threads: int = 8,
               keep_decode_set: bool = True, decode_tokens: int = 32) -> dict:
    """One long prompt on a fresh engine with a cold pool and page cache: prefill tok/s, time to first token, bytes
    read against the bytes of the distinct experts the prompt touched, peak RSS, then the hit rate of the first
    ``decode_tokens`` greedy tokens after it (how much of the decode working set the prompt left cached)."""
    reset_peak_rss()
    before = peak_rss()  # Python, MLX and the BLAS library, before the engine (after an earlier run: its peak)
    engine = Engine(pack, memory_budget=memory_budget, policy=policy, io_threads=io_threads, heat=False,
                    keep_decode_set=keep_decode_set)
    drop_page_cache(engine.reader)
    cache = engine.make_cache()
    t0 = time.perf_counter()
    logits = prefill(engine, prompt, cache)
    tok = int(np.argmax(logits))
    ttft = time.perf_counter() - t0
    c = engine.store.counters
    pre = {"bytes_read": c.bytes_read, "reads": c.reads, "io_wait_s": c.io_wait_s, "compute_s": engine.compute_s,
           "table_bytes_read": engine.table_counters().bytes_read}
    touched = len(engine.store.heat)  # (layer, expert) keys the prompt asked for: a fresh engine, nothing before
    peak = peak_rss()
    h0, m0 = c.hits, c.misses
    t1 = time.perf_counter()
    for _ in range(decode_tokens):
        tok = int(np.argmax(decode(engine, tok, cache)))
    dt = time.perf_counter() - t1
    hits, misses = c.hits - h0, c.misses - m0
    out = {"prompt_tokens": len(prompt), "ttft_s": ttft, "prefill_tok_s": len(prompt) / ttft, **pre,
           "distinct_experts": touched, "distinct_expert_bytes": touched * engine.store.file_bytes,
           "read_ratio": pre["bytes_read"] / (touched * engine.store.file_bytes) if touched else 0.0,
           "peak_rss": peak, "rss_before_load": before, "budget": engine.plan.budget, "slots": engine.plan.n_slots,
           "working_memory": engine.working_memory(len(prompt) + decode_tokens),
           "keep_decode_set": keep_decode_set, "decode_tokens": decode_tokens,
           "decode_hit_rate": hits / (hits + misses) if hits + misses else 0.0,
           "decode_tok_s": decode_tokens / dt if dt else 0.0}
    engine.close()
    return out


def bench(pack: str | Path, prompt_tokens: int = 64, gen_tokens: int = 32, memory_budget=None, policy: str = DEFAULT_POLICY,
          prefetch: bool = False, io_threads: int = 8, seed: int = 0, io_only_mode: bool = False,
          prompt_only: bool = False) -> dict:
    """``prompt_only``: just the long-prompt runs (:func:`prompt_run`, decode set kept and not), no decode runs."""
    reader = PackReader(pack)
    vocab = reader.manifest.architecture.get("vocab_size") or 1000
    prompt = np.random.default_rng(seed).integers(0, vocab, size=prompt_tokens).tolist()
    if prompt_only:
        return {"pack": str(pack), "platform": sys.platform,
                "prompt": [prompt_run(pack, prompt, memory_budget, policy, io_threads, keep) for keep in (True, False)]}
    how = drop_page_cache(reader)
    dev = device_bandwidth(reader, threads=io_threads)
    engine = Engine(pack, memory_budget=memory_budget, policy=policy, prefetch=prefetch, io_threads=io_threads,
                    heat=False)  # cold means cold: no warm start
    payload = engine.store.payload[engine.reader.moe_layers[0]] if engine.reader.moe_layers else 0
    drop_page_cache(reader)
    trace = record_trace(engine)
    cold = _run(engine, prompt, gen_tokens if not io_only_mode else min(gen_tokens, 8), "cold")
    out: dict = {"pack": str(pack), "platform": sys.platform, "page_cache": how, "device": dev,
                 "plan": asdict(engine.plan), "policy": getattr(engine.store.policy, "name", "custom"),
                 "prefetch": prefetch, "peak_rss": 0,
                 "expert": {"file_bytes": engine.store.file_bytes, "payload_bytes": payload,
                            "padding_overhead": engine.store.file_bytes / payload - 1 if payload else 0.0}}
    replay = io_only(engine, trace)
    replay["ratio_to_device"] = replay["gbps"] / dev["device_gbps"] if dev["device_gbps"] else 0.0
    out["io_only"] = replay
    if not io_only_mode:
        warm = _run(engine, prompt, gen_tokens, "warm")
        out["runs"] = [cold.summary(payload), warm.summary(payload)]
        out["per_token"] = {r.label: [asdict(t) | {"hit_rate": t.hits / max(t.hits + t.misses, 1)} for t in r.tokens]
                            for r in (cold, warm)}
        for r in out["runs"]:
            r["fetch_ratio_to_device"] = r["fetch_gbps"] / dev["device_gbps"] if dev["device_gbps"] else 0.0
    out["peak_rss"] = peak_rss()
    engine.close()
    if not io_only_mode:
        out["prompt"] = [prompt_run(pack, prompt, memory_budget, policy, io_threads, keep) for keep in (True, False)]
    return out


def tables(run: dict) -> str:
    """`` + N/token from tables (hit rate)`` where the pack streams tables."""
    if not run.get("table_rows_per_token"):  # no streamed table
        return ""
    return (f" + {human_bytes(run['table_bytes_per_token'])}/token from tables (row hit rate "
            f"{run['table_hit_rate']:.1%})")


def describe(r: dict) -> str:
    """``moepack bench``'s text report."""
    out = []
    for p in r.get("prompt", []):
        out.append(f"prompt {p['prompt_tokens']} tokens: {p['prefill_tok_s']:.1f} tok/s, first token after "
                   f"{p['ttft_s']:.2f}s, read {human_bytes(p['bytes_read'])} = {p['read_ratio']:.3f}x the "
                   f"{p['distinct_experts']} distinct experts it touched"
                   + (f" (+ {human_bytes(p['table_bytes_read'])} of table rows)" if p["table_bytes_read"] else "")
                   + f", peak memory {human_bytes(p['peak_rss'])} "
                   f"(before loading {human_bytes(p['rss_before_load'])} + budget {human_bytes(p['budget'])} + "
                   f"working memory {human_bytes(p['working_memory'])}); next {p['decode_tokens']} tokens hit "
                   f"{p['decode_hit_rate']:.1%} with the decode set {'kept' if p['keep_decode_set'] else 'not kept'}")
    if "device" not in r:  # prompt runs only
        return "\n".join(out)
    d, io = r["device"], r["io_only"]
    out.append(f"device ({d['mode']}): {d['sequential_gbps']:.2f} GB/s one stream, {d['sequential_qd_gbps']:.2f} GB/s "
               f"with {d['threads']} reads in flight, {d['expert_files_gbps']:.2f} GB/s whole expert files "
               f"x{d['threads']} threads; page cache: {r['page_cache']}")
    out.append(f"read path (io-only replay): {io['gbps']:.2f} GB/s = {io['ratio_to_device']:.0%} of the device, "
               f"read amplification {io['read_amplification']:.3f}")
    for run in r.get("runs", []):
        ms = run["ms_per_token"]
        out.append(f"{run['label']:>5}: prompt {run['prompt_tok_s']:.1f} tok/s, decode {run['decode_tok_s']:.2f} tok/s, "
                   f"{ms['ms']:.1f} ms/token (compute {ms['compute_ms']:.1f}, I/O wait {ms['io_ms']:.1f}, "
                   f"other {ms['other_ms']:.1f}), {human_bytes(run['bytes_read_per_token'])}/token from experts"
                   f"{tables(run)}, "
                   f"expert hit rate {run['hit_rate']:.1%}, amplification {run['read_amplification']:.3f}, "
                   f"fetch {run['fetch_gbps']:.2f} GB/s ({run['fetch_ratio_to_device']:.0%} of device)")
    pl = r["plan"]
    rows = f", table cache {pl['table_rows']} rows ({human_bytes(pl['table_rows'] * pl['row_bytes'])})" if pl["row_bytes"] else ""
    out.append(f"slots {pl['n_slots']} x {human_bytes(pl['slot_bytes'])}{rows}, policy {r['policy']}, "
               f"peak memory {human_bytes(r['peak_rss'])}")
    return "\n".join(out)


def plot(report: dict, path: str | Path) -> Path:
    """Latency per token (compute / I/O wait / other) and hit rate over the cold and warm runs."""
    try:
        import matplotlib
    except ImportError:
        raise MoepackError("plotting needs matplotlib: pip install 'moepack[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for ax, (label, toks) in zip(axes, report["per_token"].items()):
        x = np.arange(1, len(toks) + 1)
        comp = np.array([t["compute_ms"] for t in toks])
        io = np.array([t["io_ms"] for t in toks])
        other = np.array([max(0.0, t["ms"] - t["compute_ms"] - t["io_ms"]) for t in toks])
        ax.bar(x, comp, label="compute")
        ax.bar(x, io, bottom=comp, label="I/O wait")
        ax.bar(x, other, bottom=comp + io, label="other")
        ax.set_title(f"{label} decode")
        ax.set_xlabel("token")
        ax.set_ylabel("ms")
        ax2 = ax.twinx()
        ax2.plot(x, [t["hit_rate"] for t in toks], color="black", marker=".", label="hit rate")
        ax2.set_ylim(0, 1.05)
        ax2.set_ylabel("expert cache hit rate")
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)
