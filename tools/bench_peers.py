#!/usr/bin/env python
"""Decode and prompt speed of moepack beside mlx-lm and llama.cpp on one synthetic Qwen3-MoE, under the same memory cap.

One bf16 checkpoint of a real architecture (Qwen3-MoE tensor names and hub config, random weights, written
shard by shard by ``moepack.demo.write_checkpoint``) is converted once per engine:

- moepack: ``moepack convert CKPT OUT --dense-bits 4`` (4-bit affine groups of 64 everywhere, like mlx-lm);
- mlx-lm: ``mlx_lm.convert --hf-path CKPT -q --q-bits 4 --q-group-size 64`` (its own 4-bit conversion);
- llama.cpp: ``convert_hf_to_gguf.py --outtype bf16`` then ``llama_model_quantize`` to Q4_0 (4.5 bits/weight,
  as mlx's 4-bit with bf16 scales and biases). The converter comes from a llama.cpp checkout or the
  llama-cpp-python source distribution: ``--gguf-converter PATH`` or ``$LLAMA_CPP_CONVERT``. It is run with
  its BPE pre-tokenizer check bypassed (the synthetic tokenizer matches no known hash; the benchmark feeds
  token ids, so llama.cpp's text tokenizer is never used).

Each engine then decodes the same prompt token ids, greedily, in its own process inside a fresh cgroup (v1)
whose memory limit is the cap; that limit counts the page cache, so an mmap-based engine cannot keep more
of the model in RAM than the cap. The page cache is dropped before every run. The engines:

- moepack: ``moepack.load(pack, memory_budget=cap - overhead)`` and ``Engine.generate``;
- mlx-lm: ``mlx_lm.load`` and ``mlx_lm.generate.generate_step`` (the loop under ``mlx_lm.generate``), as
  converted (bf16 activations, the checkpoint's dtype); ``mlx_lm_f32`` is the same conversion with its
  float parameters cast to float32 after loading (MLX's CPU back end runs float32 much faster);
- llama.cpp: ``llama_cpp.Llama(gguf)`` and ``Llama.generate``. With its defaults (``llama_cpp``) llama.cpp
  repacks Q4_0 weights into an interleaved layout for AVX2/AVX-512 kernels, and the repacked copies live in
  anonymous memory, not in the mmap; ``llama_cpp_mmap`` turns that off (``use_extra_bufts=False``, as
  ``--no-repack``) so every weight stays in the file mapping and the kernel can page it in and out.

Every generated token is timestamped in the engine's process together with its ``/proc/self/io``
``read_bytes`` (bytes that reached the block device, including mmap faults and direct I/O); decode figures
are taken from the first generated token to the last, so they leave out loading and prefill. Peak memory is
the cgroup's ``memory.max_usage_in_bytes`` (RSS plus page cache). A run counts as finished when it produced
all tokens within the time limit; otherwise it is reported as not finished, with the rate of the tokens it
did produce.

    python tools/bench_peers.py --work /tmp/moepack-peers --caps none,2.75GiB,0.9GiB --tokens 16 --repeat 3 \\
        --gguf-converter /tmp/llama.cpp-py/convert_hf_to_gguf.py --plot docs/bench_peers.png

Prompt rows (``--prompt-tokens 1500,8000``): the prompt is English text repeated to that many tokens, each engine
generates ``--tokens`` tokens after it (2 is enough), and the table gives prefill tok/s (loaded to first token),
the bytes read from the device meanwhile, and peak memory. llama.cpp runs with its default ``n_batch`` 512 and a
context just long enough; mlx-lm with its default prefill step.

Needs root (cgroup, drop_caches), mlx-lm, llama-cpp-python and matplotlib; figures in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ENGINES = ("moepack", "mlx_lm", "mlx_lm_f32", "llama_cpp", "llama_cpp_mmap")
# Short, because prefill is not what is measured and MLX's CPU back end prefills MoE layers slowly.
PROMPT = "Once upon a time there was a small laptop that wanted to run a very large model."
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
GiB = 1 << 30


# ---------------------------------------------------------------------------------------------
# the engines' side: run inside the capped cgroup, one JSON line per event on stdout


def _read_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def _emit(event: str, **kw) -> None:
    print(json.dumps({"event": event, "t": time.perf_counter(), "io": _read_bytes(), **kw}), flush=True)


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_moepack(path: str, ids: list[int], n: int, budget: int | None) -> None:
    import moepack

    # For a long prompt the budget covers the context's working memory too (KV cache, a pass's activations), taken
    # from the expert slots; a short one fits in --moepack-overhead, as before prompt rows existed.
    reserve = {"reserve_tokens": len(ids) + n} if budget is not None and len(ids) > 256 else {}
    engine = moepack.load(path, memory_budget=budget, **reserve)
    _emit("loaded", plan=asdict(engine.plan))
    first = last = None
    for i, tok in enumerate(engine.generate(ids, n)):
        if i == 0:
            first = engine.stats()
        _emit("token", i=i, tok=int(tok))
        if i + 1 == n:  # stop before the generator runs the forward pass of a token nobody asked for
            last = engine.stats()
            break
    _emit("done", rss_peak=_vm_hwm(), stats_first=first, stats=last or engine.stats())


def run_mlx_lm(path: str, ids: list[int], n: int, f32: bool) -> None:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, _ = load(path)
    if f32:
        model.set_dtype(mx.float32)  # floating parameters only: packed 4-bit weights stay as they are
        mx.eval(model.parameters())
    _emit("loaded")
    for i, (tok, _) in enumerate(generate_step(mx.array(ids), model, max_tokens=n)):
        _emit("token", i=i, tok=int(tok))
    _emit("done", rss_peak=_vm_hwm())


def run_llama_cpp(path: str, ids: list[int], n: int, repack: bool) -> None:
    import llama_cpp.llama_cpp as low  # the bindings module Llama reads its default model params from
    from llama_cpp import Llama

    if not repack:  # keep every weight in the mmap (llama.cpp's --no-repack): pages can be dropped and re-read
        defaults = low.llama_model_default_params

        def no_repack():
            p = defaults()
            p.use_extra_bufts = False
            return p

        low.llama_model_default_params = no_repack
    threads = os.cpu_count() or 1
    llm = Llama(model_path=path, n_ctx=max(256, len(ids) + n + 64), n_batch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    _emit("loaded")
    for i, tok in enumerate(llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True)):
        _emit("token", i=i, tok=int(tok))
        if i + 1 >= n:
            break
    _emit("done", rss_peak=_vm_hwm())


def runner(argv: list[str]) -> None:
    engine, path, ids, n, budget = argv[0], argv[1], json.loads(argv[2]), int(argv[3]), argv[4]
    budget = None if budget == "none" else int(budget)
    if engine == "moepack":
        run_moepack(path, ids, n, budget)
    elif engine in ("mlx_lm", "mlx_lm_f32"):
        run_mlx_lm(path, ids, n, engine == "mlx_lm_f32")
    elif engine in ("llama_cpp", "llama_cpp_mmap"):
        run_llama_cpp(path, ids, n, repack=engine == "llama_cpp")
    else:
        raise SystemExit(f"unknown engine {engine}")


# ---------------------------------------------------------------------------------------------
# preparing the model for every engine


def parse_size(s: str) -> int | None:
    if s.lower() in ("none", "ram", "0"):
        return None
    from moepack.runtime.memory import parse_bytes

    return parse_bytes(s)


def dir_bytes(p: Path) -> int:
    p = Path(p)
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def _stamped(out: Path, want: dict) -> bool:
    stamp = out.with_name(out.name + ".done.json")
    return stamp.is_file() and out.exists() and json.loads(stamp.read_text()) == want


def _stamp(out: Path, want: dict) -> None:
    out.with_name(out.name + ".done.json").write_text(json.dumps(want))


def _call(cmd: list[str], what: str, log: Path) -> None:
    t0 = time.perf_counter()
    print(f"[bench] {what}: {' '.join(cmd)} (log: {log})", file=sys.stderr, flush=True)
    with open(log, "w") as f:
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"{what} failed; see {log}")
    print(f"[bench] {what}: {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)


GGUF_SNIPPET = r"""
import importlib.util, os, sys
conv, src, out = sys.argv[1:4]
root = os.path.dirname(os.path.abspath(conv))
sys.path[:0] = [root, os.path.join(root, "gguf-py")]
spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", conv)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
text_model = getattr(mod, "TextModel", None)
if text_model is None:
    from conversion.base import TextModel as text_model
text_model.get_vocab_base_pre = lambda self, tokenizer: "qwen2"  # the synthetic tokenizer's hash is unknown
sys.argv = [conv, src, "--outtype", "bf16", "--outfile", out]
mod.main()
"""

QUANTIZE_SNIPPET = r"""
import ctypes, os, sys
import llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
params.nthread = os.cpu_count() or 1
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params))
sys.exit(rc)
"""


def prepare(args, work: Path) -> dict[str, Path]:
    """Build the checkpoint and each engine's conversion (all reused when the dimensions match)."""
    from moepack.demo import SyntheticSpec, write_checkpoint

    spec = SyntheticSpec(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, head_dim=args.head_dim, num_experts=args.experts,
                         num_experts_per_tok=args.top_k, moe_intermediate_size=args.width, vocab_size=args.vocab)
    want = asdict(spec)
    ckpt = work / "checkpoint"
    if not _stamped(ckpt, want):
        shutil.rmtree(ckpt, ignore_errors=True)
        t0 = time.perf_counter()
        write_checkpoint(ckpt, spec, shard_bytes=1 << 30)
        print(f"[bench] checkpoint: {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
        _stamp(ckpt, want)
    paths = {"checkpoint": ckpt}
    engines = set(args.engines)
    if "moepack" in engines:
        out = paths["moepack"] = work / "moepack"
        if not _stamped(out, want):
            _call([sys.executable, "-m", "moepack.cli", "convert", str(ckpt), str(out), "--dense-bits", "4", "--force"],
                  "moepack convert", work / "convert-moepack.log")
            _stamp(out, want)
    if engines & {"mlx_lm", "mlx_lm_f32"}:
        out = paths["mlx_lm"] = paths["mlx_lm_f32"] = work / "mlx_lm"
        if not _stamped(out, want):
            shutil.rmtree(out, ignore_errors=True)
            _call([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(ckpt), "--mlx-path", str(out), "-q",
                   "--q-bits", "4", "--q-group-size", "64"], "mlx_lm convert", work / "convert-mlx_lm.log")
            _stamp(out, want)
    if engines & {"llama_cpp", "llama_cpp_mmap"}:
        out = paths["llama_cpp"] = paths["llama_cpp_mmap"] = work / "model-q4_0.gguf"
        if not _stamped(out, want):
            conv = args.gguf_converter or os.environ.get("LLAMA_CPP_CONVERT")
            if not conv or not Path(conv).is_file():
                raise SystemExit("llama.cpp needs convert_hf_to_gguf.py: pass --gguf-converter or set LLAMA_CPP_CONVERT")
            bf16 = work / "model-bf16.gguf"
            _call([sys.executable, "-c", GGUF_SNIPPET, conv, str(ckpt), str(bf16)], "convert_hf_to_gguf",
                  work / "convert-gguf.log")
            _call([sys.executable, "-c", QUANTIZE_SNIPPET, str(bf16), str(out)], "llama_model_quantize Q4_0",
                  work / "quantize-gguf.log")
            bf16.unlink()
            _stamp(out, want)
    return paths


def prompt_ids(ckpt: Path, n: int | None = None) -> list[int]:
    """PROMPT's token ids; with ``n``, English text (PROMPT and the demo's paragraph) repeated to exactly n tokens."""
    from tokenizers import Tokenizer

    from moepack.demo import CORPUS

    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    if n is None:
        return tok.encode(PROMPT).ids
    text = tok.encode(PROMPT + " " + CORPUS).ids
    return (text * (n // len(text) + 1))[:n]


# ---------------------------------------------------------------------------------------------
# one capped run


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


class Cgroup:
    """A cgroup v1 memory group with a limit (page cache included); ``wrap`` puts a command inside it."""

    def __init__(self, name: str, limit: int | None):
        self.dir = CGROUP_ROOT / name
        self.dir.mkdir()
        if limit is not None:
            (self.dir / "memory.limit_in_bytes").write_text(str(limit))

    def wrap(self, cmd: list[str]) -> list[str]:
        return ["sh", "-c", f'echo $$ > {self.dir / "cgroup.procs"} && exec "$@"', "sh", *cmd]

    def read(self, name: str) -> str:
        return (self.dir / name).read_text()

    @property
    def peak(self) -> int:
        return int(self.read("memory.max_usage_in_bytes"))

    @property
    def oom_kills(self) -> int:
        for line in self.read("memory.oom_control").splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def remove(self) -> None:
        for _ in range(50):
            try:
                (self.dir / "memory.force_empty").write_text("0")
            except OSError:
                pass
            try:
                self.dir.rmdir()
                return
            except OSError:
                time.sleep(0.1)


@dataclass
class Run:
    engine: str
    cap: int | None
    model_bytes: int
    tokens_wanted: int
    finished: bool = False
    status: str = ""
    tokens: int = 0
    load_s: float = 0.0
    prefill_s: float = 0.0
    decode_tok_s: float = 0.0
    ms_per_token: float = 0.0
    read_per_token: float = 0.0
    peak_bytes: int = 0
    rss_peak: int = 0
    wall_s: float = 0.0
    budget: int | None = None
    prompt_tokens: int = 0
    prefill_read: int = 0  # bytes read from the device between loaded and the first token
    token_ids: list[int] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def measure(engine: str, path: Path, ids: list[int], cap: int | None, args) -> Run:
    budget = None if cap is None else cap - parse_size(args.moepack_overhead)
    run = Run(engine, cap, dir_bytes(path), args.tokens, budget=budget if engine == "moepack" else None,
              prompt_tokens=len(ids))
    cmd = [sys.executable, os.path.abspath(__file__), "--runner", engine, str(path), json.dumps(ids), str(args.tokens),
           "none" if budget is None else str(budget)]
    drop_caches()
    cg = Cgroup(f"moepack-bench-{os.getpid()}-{engine}", cap)
    events: list[dict] = []
    err = open(args.work / f"{engine}-{cap or 'none'}.log", "w")
    t_launch = time.perf_counter()
    proc = subprocess.Popen(cg.wrap(cmd), stdout=subprocess.PIPE, stderr=err, text=True)

    def pump():
        for line in proc.stdout:
            if line.startswith("{"):
                events.append(json.loads(line))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
        run.status = f"time limit {args.timeout}s"
    reader.join(5)
    run.wall_s = time.perf_counter() - t_launch
    run.peak_bytes, oom = cg.peak, cg.oom_kills
    cg.remove()
    err.close()
    if not run.status:
        run.status = "OOM-killed" if oom else (f"exit {rc}" if rc else "ok")
    toks = [e for e in events if e["event"] == "token"]
    loaded = next((e for e in events if e["event"] == "loaded"), None)
    done = next((e for e in events if e["event"] == "done"), None)
    run.tokens, run.token_ids = len(toks), [e["tok"] for e in toks]
    run.finished = run.status == "ok" and len(toks) >= args.tokens
    if loaded and toks:
        run.prefill_s = toks[0]["t"] - loaded["t"]
        run.prefill_read = toks[0]["io"] - loaded["io"]
    if len(toks) >= 2:
        span = toks[-1]["t"] - toks[0]["t"]
        run.decode_tok_s = (len(toks) - 1) / span
        run.ms_per_token = 1000 * span / (len(toks) - 1)
        run.read_per_token = (toks[-1]["io"] - toks[0]["io"]) / (len(toks) - 1)
    if done:
        run.rss_peak = done.get("rss_peak", 0)
        if "stats" in done and done.get("stats_first"):
            a, b = done["stats_first"], done["stats"]
            n = max(len(toks) - 1, 1)
            lookups = b["hits"] + b["misses"] - a["hits"] - a["misses"]
            run.extra = {"io_wait_ms_per_token": 1000 * (b["io_wait_s"] - a["io_wait_s"]) / n,
                         "compute_ms_per_token": 1000 * (b["compute_s"] - a["compute_s"]) / n,
                         "store_read_per_token": (b["bytes_read"] - a["bytes_read"]) / n,
                         "hit_rate_decode": (b["hits"] - a["hits"]) / max(1, lookups),
                         "slots": b["slots"], "io_mode": b["io_mode"], "plan": loaded.get("plan") if loaded else None}
    if loaded:  # timestamps are the child's clock: loading is the wall time before its "loaded" event
        run.load_s = run.wall_s - ((events[-1]["t"] - loaded["t"]) if events else 0.0)
    return run


# ---------------------------------------------------------------------------------------------
# report


def _gb(n: float) -> str:
    return f"{n / GiB:.2f}"


def median_runs(runs: list[Run]) -> list[tuple[Run, list[Run]]]:
    """One row per (engine, cap): the run with the median decode rate among those that produced tokens (the
    first run when none did), with all runs of that cell, in first-seen order."""
    cells: dict[tuple[str, int | None], list[Run]] = {}
    for r in runs:
        cells.setdefault((r.engine, r.cap), []).append(r)
    out = []
    for cell in cells.values():
        ok = sorted((r for r in cell if r.tokens >= 2), key=lambda r: r.decode_tok_s)
        out.append((ok[(len(ok) - 1) // 2] if ok else cell[0], cell))
    return sorted(out, key=lambda rc: (rc[0].cap is not None, -(rc[0].cap or 0)))


def table(runs: list[Run]) -> str:
    head = ("| engine | model on disk GiB | cap GiB | model/cap | finished | tokens | decode tok/s | ms/token | "
            "read MB/token | peak GiB (cgroup) | load+prefill s |")
    rows = [head, "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r, cell in median_runs(runs):
        cap = "none" if r.cap is None else _gb(r.cap)
        ratio = "-" if r.cap is None else f"{r.model_bytes / r.cap:.1f}x"
        fin = "yes" if r.finished else f"no ({r.status})"
        rate = f"{r.decode_tok_s:.2f}" if r.tokens >= 2 else "-"
        rates = [x.decode_tok_s for x in cell if x.tokens >= 2]
        if len(cell) > 1:  # median of the repeats, with their range
            failed = ", ".join(dict.fromkeys(x.status for x in cell if not x.finished))
            fin = f"{sum(x.finished for x in cell)}/{len(cell)}" + (f" ({failed})" if failed else "")
            rate += f" ({min(rates):.2f}-{max(rates):.2f})" if len(rates) > 1 else ""
        ms = f"{r.ms_per_token:.0f}" if r.tokens >= 2 else "-"
        rd = f"{r.read_per_token / 1e6:.0f}" if r.tokens >= 2 else "-"
        lp = f"{r.load_s + r.prefill_s:.0f}" if r.tokens else "-"
        rows.append(f"| {r.engine} | {_gb(r.model_bytes)} | {cap} | {ratio} | {fin} | {r.tokens}/{r.tokens_wanted} | "
                    f"{rate} | {ms} | {rd} | {_gb(r.peak_bytes)} | {lp} |")
    return "\n".join(rows)


def prompt_table(runs: list[Run]) -> str:
    head = ("| engine | prompt tokens | cap GiB | model/cap | finished | prefill tok/s | first token s | "
            "read GB during prompt | peak GiB (cgroup) |")
    rows = [head, "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    cells: dict[tuple, list[Run]] = {}
    for r in runs:
        cells.setdefault((r.prompt_tokens, r.cap is not None, -(r.cap or 0), r.engine), []).append(r)
    for (n, _, _, _), cell in sorted(cells.items(), key=lambda kv: kv[0][:3]):
        ok = sorted((r for r in cell if r.tokens), key=lambda r: r.prefill_s)
        r = ok[(len(ok) - 1) // 2] if ok else cell[0]
        cap = "none" if r.cap is None else _gb(r.cap)
        ratio = "-" if r.cap is None else f"{r.model_bytes / r.cap:.1f}x"
        fin = f"{sum(x.tokens > 0 and x.status == 'ok' for x in cell)}/{len(cell)}" + (
            "" if all(x.status == "ok" for x in cell) else f" ({', '.join(dict.fromkeys(x.status for x in cell))})")
        rate = f"{n / r.prefill_s:.1f}" if r.tokens and r.prefill_s else "-"
        if len(ok) > 1:
            rate += f" ({n / ok[-1].prefill_s:.1f}-{n / ok[0].prefill_s:.1f})"
        first = f"{r.load_s + r.prefill_s:.0f}" if r.tokens else "-"
        read = f"{r.prefill_read / 1e9:.2f}" if r.tokens else "-"
        rows.append(f"| {r.engine} | {n} | {cap} | {ratio} | {fin} | {rate} | {first} | {read} | {_gb(r.peak_bytes)} |")
    return "\n".join(rows)


def plot(runs: list[Run], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r, _ in median_runs(runs)]
    caps = list(dict.fromkeys(r.cap for r in runs))
    engines = list(dict.fromkeys(r.engine for r in runs))
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / len(engines)
    for j, eng in enumerate(engines):
        for i, cap in enumerate(caps):
            r = next((r for r in runs if r.engine == eng and r.cap == cap), None)
            if r is None:
                continue
            x = i + (j - (len(engines) - 1) / 2) * width
            if r.tokens >= 2:
                ax.bar(x, r.ms_per_token, width, color=f"C{j}", hatch=None if r.finished else "//",
                       label=eng if i == 0 else None)
                ax.text(x, r.ms_per_token, f"{r.ms_per_token:.0f}", ha="center", va="bottom", fontsize=7)
            else:
                ax.bar(x, 0, width, color=f"C{j}", label=eng if i == 0 else None)
                ax.text(x, 0.02, "OOM-killed" if "OOM" in r.status else "no tokens", ha="center", va="bottom",
                        fontsize=7, rotation=90, color=f"C{j}", transform=ax.get_xaxis_transform())
    model = max(r.model_bytes for r in runs)
    ax.set_xticks(range(len(caps)), [("no cap" if c is None else f"cap {_gb(c)} GiB\n(model {model / c:.1f}x cap)")
                                     for c in caps])
    ax.set_yscale("log")
    ax.set_ylabel("decode ms/token (log; lower is better)")
    ax.set_title("Synthetic Qwen3-MoE, 4-bit, greedy decode: median of runs (hatched: did not finish)", fontsize=10)
    ax.legend(fontsize=8, ncol=len(engines), loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    fig.savefig(out, dpi=110, bbox_inches="tight")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--runner":
        return runner(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/moepack-peers"),
                    help="holds the checkpoint, the conversions (reused when dimensions match), logs and results")
    ap.add_argument("--caps", default="none,2.75GiB,0.9GiB", help="comma-separated memory caps; 'none' = no limit")
    ap.add_argument("--engines", default=",".join(ENGINES), type=lambda s: s.split(","),
                    help=f"comma-separated subset of {','.join(ENGINES)}, in run order")
    ap.add_argument("--tokens", type=int, default=16, help="tokens to generate per run")
    ap.add_argument("--timeout", type=int, default=420, help="seconds per run (load + prefill + decode)")
    ap.add_argument("--moepack-overhead", default="320MiB",
                    help="cap minus this is moepack's memory_budget (Python, MLX and BLAS themselves); the budget "
                    "reserves the context's KV cache, activations and I/O staging inside it (reserve_tokens)")
    ap.add_argument("--gguf-converter", help="llama.cpp's convert_hf_to_gguf.py (or $LLAMA_CPP_CONVERT)")
    for k, v in dict(hidden=2048, layers=16, heads=16, kv_heads=4, head_dim=128, experts=64, top_k=8, width=768,
                     vocab=32768).items():
        ap.add_argument(f"--{k.replace('_', '-')}", dest=k, type=int, default=v)
    ap.add_argument("--prepare-only", action="store_true", help="build and convert, run nothing")
    ap.add_argument("--repeat", type=int, default=1, help="run every (cap, engine) this many times, interleaved; "
                    "the table shows the median and range of the decode rate")
    ap.add_argument("--report", type=Path, nargs="+", help="only print the table (and plot) of earlier results JSONs")
    ap.add_argument("--plot", type=Path, help="write a bar chart of ms/token here (PNG)")
    ap.add_argument("--out", type=Path, help="results JSON (default: WORK/results.json)")
    ap.add_argument("--prompt-tokens", type=lambda s: [int(x) for x in s.split(",")],
                    help="comma-separated prompt lengths: measure prompt processing instead of decode")
    args = ap.parse_args(argv)

    if args.report:
        runs = [Run(**r) for f in args.report for r in json.loads(f.read_text())["runs"]]
    else:
        args.work.mkdir(parents=True, exist_ok=True)
        paths = prepare(args, args.work)
        if args.prepare_only:
            return
        prompts = {n: prompt_ids(paths["checkpoint"], n) for n in args.prompt_tokens or [None]}
        runs = []
        cells = [(n, parse_size(c), e) for n in prompts for c in args.caps.split(",") for e in args.engines]
        for n, cap, eng in cells * args.repeat:
            ids = prompts[n]
            print(f"[bench] {eng} cap={cap} prompt={len(ids)}", file=sys.stderr, flush=True)
            r = measure(eng, paths[eng], ids, cap, args)
            print(f"[bench]   {r.status}: {r.tokens} tokens, prefill {r.prefill_s:.1f}s, {r.decode_tok_s:.2f} tok/s, "
                  f"{r.read_per_token / 1e6:.0f} MB/token, peak {_gb(r.peak_bytes)} GiB {r.extra or ''}",
                  file=sys.stderr, flush=True)
            runs.append(r)
            (args.out or args.work / "results.json").write_text(json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()},
                 "runs": [asdict(x) for x in runs]}, indent=1))
    print(prompt_table(runs) if any(r.prompt_tokens > 100 for r in runs) else table(runs))
    if args.plot:
        plot(runs, args.plot)


if __name__ == "__main__":
    main()
