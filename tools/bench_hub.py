#!/usr/bin/env python
"""Streamed vs local conversion of a multi-GB checkpoint served by the local test hub (tests/hubserver.py).

Writes tools/bench_convert.py's synthetic Qwen3-MoE checkpoint (moepack.demo's writer: random bf16 weights, real
tensor names, hub config spelling) of about ``--gb`` GiB in ``--shards`` shards under WORKDIR, serves it on
loopback with tests/hubserver.py, and times three
conversions, each in a child process while the disk under its directories and the resident memory of its whole
process tree are sampled every 0.1 s:

- ``local``: ``moepack convert DIR OUT`` from the checkpoint directory;
- ``download``: ``moepack convert REPO OUT --no-stream``: the whole repo into a fresh hub cache, then convert;
- ``stream``: ``moepack convert REPO OUT --stream``: shard by shard, each deleted once converted.

    python tools/bench_hub.py /tmp/bench-hub --gb 3 [--json] [--keep]

The three packs are compared byte for byte (the manifests but for the source's name); WORKDIR is deleted at the
end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tools")]

from bench_convert import DEFAULT_DIMS, layers_for, spec_for  # noqa: E402
from hubserver import HubServer  # noqa: E402

from moepack.demo import checkpoint_bytes, write_checkpoint  # noqa: E402

REPO = "bench/qwen3-moe-synthetic"


def write_repo(d: Path, gib: float, n_shards: int) -> Path:
    """tools/bench_convert.py's checkpoint (moepack.demo's writer) of about ``gib`` GiB, in ``n_shards`` shards."""
    d_ = {**DEFAULT_DIMS, "layers": 0}
    spec = spec_for({**d_, "layers": layers_for(gib, d_)})
    return write_checkpoint(d, spec, shard_bytes=checkpoint_bytes(spec) // n_shards + 1)


def _tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (Linux /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def _du(*dirs: Path) -> int:
    total = 0
    for d in dirs:
        for root, _, files in os.walk(d):
            for f in files:
                p = os.path.join(root, f)
                try:
                    if not os.path.islink(p):
                        total += os.lstat(p).st_blocks * 512
                except FileNotFoundError:
                    pass
    return total


def run(name: str, args: list[str], env: dict, watch: list[Path]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "moepack.cli", "convert", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_disk = peak_rss = 0
    while proc.poll() is None:
        peak_disk = max(peak_disk, _du(*watch))
        peak_rss = max(peak_rss, _tree_rss(proc.pid))
        time.sleep(0.1)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{err[-3000:]}")
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_disk_bytes": peak_disk, "peak_rss_bytes": peak_rss}


def same_files(a: Path, b: Path) -> bool:
    def files(d):
        return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() and p.name != "manifest.json")
    if files(a) != files(b):
        return False
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in files(a))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--gb", type=float, default=3.0, help="checkpoint size in GiB")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    w = a.workdir
    try:
        ckpt = write_repo(w / "repo" / REPO, a.gb, a.shards)
        source = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
        rows = {}
        with HubServer({REPO: ckpt}) as hub:
            env = {**os.environ, "HF_ENDPOINT": hub.url, "PYTHONPATH": str(ROOT), "HF_HUB_DISABLE_TELEMETRY": "1"}
            env.pop("HF_HUB_OFFLINE", None)
            rows["local"] = run("local", [str(ckpt), str(w / "local")], env, [w / "local"])
            env_d = {**env, "HF_HOME": str(w / "home-download")}
            rows["download"] = run("download", [REPO, str(w / "download"), "--no-stream"], env_d,
                                   [w / "download", w / "home-download"])
            env_s = {**env, "HF_HOME": str(w / "home-stream")}
            rows["stream"] = run("stream", [REPO, str(w / "stream"), "--stream"], env_s,
                                 [w / "stream", w / "home-stream"])
        pack = sum(p.stat().st_size for p in (w / "stream").rglob("*") if p.is_file())
        shards = sorted(p.stat().st_size for p in ckpt.glob("*.safetensors"))
        result = {"source_bytes": source, "shards": len(shards), "largest_shard_bytes": shards[-1], "pack_bytes": pack,
                  "runs": rows, "stream_equals_local": same_files(w / "stream", w / "local"),
                  "stream_equals_download": (w / "stream" / "manifest.json").read_bytes() ==
                  (w / "download" / "manifest.json").read_bytes() and same_files(w / "stream", w / "download"),
                  "cpus": os.cpu_count()}
        if a.json:
            print(json.dumps(result, indent=2))
        else:
            g = lambda n: f"{n / 1e9:.2f} GB"
            print(f"source {g(source)} in {len(shards)} shards (largest {g(shards[-1])}), pack {g(pack)}")
            for k, r in rows.items():
                print(f"{k:>9}: {r['seconds']:7.1f} s, peak disk {g(r['peak_disk_bytes'])}, "
                      f"peak memory {g(r['peak_rss_bytes'])}")
            print(f"stream == local: {result['stream_equals_local']}, stream == download (manifest too): "
                  f"{result['stream_equals_download']}")
    finally:
        if not a.keep:
            shutil.rmtree(w, ignore_errors=True)


if __name__ == "__main__":
    main()
