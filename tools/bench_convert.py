#!/usr/bin/env python
"""Time ``moepack convert`` beside ``mlx_lm.convert`` on one synthetic multi-GB Qwen3-MoE checkpoint.

The checkpoint is ``moepack.demo.write_checkpoint``'s: real Qwen3-MoE tensor names, a hub-spelling
config.json (``num_experts``, ``rope_theta``), hub-like shards with ``model.safetensors.index.json`` and a
small tokenizer (mlx_lm loads one), written tensor by tensor so building it never holds more than one
tensor; it is reused from the cache directory when the dimensions match.

Each converter runs in its own subprocess after the page cache is dropped (so both read cold); wall
time includes a final ``sync`` (moepack fsyncs its files, mlx_lm does not). Peak memory is sampled
from /proc over the whole process tree (moepack runs a pool of worker processes): summed RSS and
summed PSS (PSS splits shared pages, e.g. libraries, between the processes that map them).

Both quantize with 4-bit affine groups of 64. mlx_lm quantizes every Linear/Embedding at that setting
except the router (8 bit); moepack is run with ``dense_bits=4`` to match and keeps the router in bf16.

    python tools/bench_convert.py --gb 4 --cache /tmp/moepack-bench [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from moepack.demo import SyntheticSpec, checkpoint_bytes, write_checkpoint

# Qwen3-30B-A3B's shape, cut down in experts, layers and vocab to reach a few GB.
DEFAULT_DIMS = dict(hidden=2048, width=768, experts=64, heads=32, kv_heads=4, head_dim=128, vocab=32768, top_k=8)


# ---------------------------------------------------------------------------------------------
# the synthetic checkpoint: moepack.demo's writer (real tensor names, hub config, streamed shard by shard)


def spec_for(d: dict) -> SyntheticSpec:
    return SyntheticSpec(hidden_size=d["hidden"], num_hidden_layers=d["layers"], num_attention_heads=d["heads"],
                         num_key_value_heads=d["kv_heads"], head_dim=d["head_dim"], num_experts=d["experts"],
                         num_experts_per_tok=d["top_k"], moe_intermediate_size=d["width"], vocab_size=d["vocab"])


def layers_for(gb: float, d: dict) -> int:
    """The number of layers that brings the checkpoint closest to ``gb`` GiB."""
    base = checkpoint_bytes(spec_for({**d, "layers": 0}))
    per_layer = checkpoint_bytes(spec_for({**d, "layers": 1})) - base
    return max(1, round((gb * (1 << 30) - base) / per_layer))


def build_checkpoint(root: Path, d: dict, shard_gb: float) -> Path:
    """Write (or reuse) the checkpoint in ``root``; a stamp file records the dimensions it was built with."""
    stamp = root / "bench.json"
    want = {"dims": d, "shard_gb": shard_gb, "version": 2}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return root
    shutil.rmtree(root, ignore_errors=True)
    print(f"[bench] writing the checkpoint to {root}", file=sys.stderr, flush=True)
    write_checkpoint(root, spec_for(d), shard_bytes=int(shard_gb * (1 << 30)))
    stamp.write_text(json.dumps(want))
    return root


# ---------------------------------------------------------------------------------------------
# measuring a subprocess tree


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(p))
    out, todo = [], [pid]
    while todo:
        q = todo.pop()
        out.append(q)
        todo += children.get(q, [])
    return out


def _memory(pid: int) -> tuple[int, int, int]:
    """(RSS, PSS, anonymous RSS) of one process in bytes; zeros once it has gone."""
    got = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss", "Anonymous"):
                    got[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return got.get("Rss", 0), got.get("Pss", 0), got.get("Anonymous", 0)


class TreeMemory(threading.Thread):
    """Samples summed RSS, PSS and anonymous RSS of a process and all its descendants; keeps each peak."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = [0, 0, 0]  # rss, pss, anon
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            total = [sum(col) for col in zip(*(_memory(p) for p in _descendants(self.pid)))]
            self.peak = [max(a, b) for a, b in zip(self.peak, total)]
            self.halt.wait(self.interval)


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


@dataclass
class Result:
    tool: str
    wall_s: float
    input_gb_per_s: float
    peak_rss_gb: float
    peak_pss_gb: float
    peak_anon_gb: float
    output_gb: float
    cold: bool
    command: str


def run_tool(tool: str, cmd: list[str], out: Path, input_bytes: int, cold: bool) -> Result:
    shutil.rmtree(out, ignore_errors=True)
    dropped = drop_caches() if cold else False
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    mon = TreeMemory(proc.pid)
    mon.start()
    log, _ = proc.communicate()
    mon.halt.set()
    mon.join()
    os.sync()  # count writing the output back, which moepack does with fsync and mlx_lm leaves to the kernel
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{tool} failed ({proc.returncode}):\n{log[-4000:]}")
    gb = 1 << 30
    rss, pss, anon = (b / gb for b in mon.peak)
    return Result(tool, wall, input_bytes / gb / wall, rss, pss, anon, dir_bytes(out) / gb, dropped, " ".join(cmd))


MOEPACK_SNIPPET = """
import logging, sys
from moepack.convert.pipeline import convert
from moepack.convert.recipe import Recipe
logging.basicConfig(level=logging.WARNING)
w = None if sys.argv[3] == "auto" else int(sys.argv[3])
convert(sys.argv[1], sys.argv[2], Recipe(expert_bits=4, expert_group_size=64, dense_bits=int(sys.argv[4]),
        dense_group_size=64), workers=w, progress=False)
"""


def commands(src: Path, work: Path, args) -> dict[str, tuple[list[str], Path]]:
    mp_out, ml_out = work / "moepack-out", work / "mlx_lm-out"
    return {
        "moepack": ([sys.executable, "-c", MOEPACK_SNIPPET, str(src), str(mp_out), str(args.workers),
                     str(args.dense_bits)], mp_out),
        "mlx_lm": ([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(src), "--mlx-path", str(ml_out),
                    "-q", "--q-bits", "4", "--q-group-size", "64"], ml_out),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "moepack-bench",
                    help="directory holding the synthetic checkpoint (reused when dimensions match) and the outputs")
    ap.add_argument("--gb", type=float, default=4.0, help="checkpoint size in GiB (sets the layer count)")
    ap.add_argument("--layers", type=int, help="number of layers (overrides --gb)")
    for k in ("hidden", "width", "experts", "vocab"):
        ap.add_argument(f"--{k}", type=int, default=DEFAULT_DIMS[k])
    ap.add_argument("--shard-gb", type=float, default=2.0, help="source shard size in GiB")
    ap.add_argument("--tools", default="moepack,mlx_lm", help="comma-separated subset of moepack,mlx_lm, in run order")
    ap.add_argument("--workers", default="auto", help="moepack worker processes (auto: its own default)")
    ap.add_argument("--dense-bits", type=int, default=4, help="moepack dense bits (4 matches mlx_lm -q --q-bits 4)")
    ap.add_argument("--warm", action="store_true", help="do not drop the page cache before each run")
    ap.add_argument("--keep", action="store_true", help="keep the converted outputs")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)

    d = {**DEFAULT_DIMS, **{k: getattr(args, k) for k in ("hidden", "width", "experts", "vocab")}}
    d["layers"] = args.layers or layers_for(args.gb, d)
    src = build_checkpoint(args.cache / "ckpt", d, args.shard_gb)
    input_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    cmds = commands(src, args.cache, args)
    results = []
    for tool in args.tools.split(","):
        cmd, out = cmds[tool]
        print(f"[bench] running {tool}", file=sys.stderr, flush=True)
        results.append(run_tool(tool, cmd, out, input_bytes, cold=not args.warm))
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)

    by = {r.tool: r for r in results}
    ratios = {}
    if {"moepack", "mlx_lm"} <= by.keys():
        a, b = by["moepack"], by["mlx_lm"]
        ratios = {"wall_s": a.wall_s / b.wall_s,
                  **{k: getattr(a, f"{k}_gb") / getattr(b, f"{k}_gb") for k in ("peak_rss", "peak_pss", "peak_anon")}}
    summary = {"checkpoint": {"dims": d, "input_gb": input_bytes / (1 << 30), "path": str(src)},
               "results": [asdict(r) for r in results], "moepack_over_mlx_lm": ratios}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"checkpoint: {input_bytes / (1 << 30):.2f} GiB bf16, {d}")
    print(f"{'tool':<8} {'wall s':>8} {'in GiB/s':>9} {'peak RSS':>9} {'peak PSS':>9} {'peak anon':>10} "
          f"{'out GiB':>8}  cold")
    for r in results:
        print(f"{r.tool:<8} {r.wall_s:>8.1f} {r.input_gb_per_s:>9.3f} {r.peak_rss_gb:>9.2f} {r.peak_pss_gb:>9.2f} "
              f"{r.peak_anon_gb:>10.2f} {r.output_gb:>8.2f}  {r.cold}")
    if ratios:
        print("moepack/mlx_lm: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
              + "  (goal: wall_s < 1, memory < 0.5)")


if __name__ == "__main__":
    main()
