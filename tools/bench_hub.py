#!/usr/bin/env python
"""Streamed vs local conversion of a multi-GB checkpoint served by the local test hub (tests/hubserver.py).

Writes a synthetic Qwen3-MoE checkpoint (random bf16 weights, real tensor names and shapes from transformers on the
meta device) of about ``--gb`` GB in ``--shards`` shards under WORKDIR, serves it on loopback, and times three
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
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from hubserver import HubServer, write_shards  # noqa: E402

REPO = "bench/qwen3-moe-synthetic"
CONFIG = dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=32000, hidden_size=2048,
              num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
              intermediate_size=4096, moe_intermediate_size=768, num_experts=32, num_experts_per_tok=4,
              norm_topk_prob=True, rms_norm_eps=1e-6, max_position_embeddings=4096, rope_theta=1e6,
              tie_word_embeddings=False, torch_dtype="bfloat16")


def shapes(cfg: dict) -> dict[str, list[int]]:
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    sd = model.state_dict()
    if "model.layers.0.mlp.experts.gate_up_proj" in sd:  # transformers 5 fuses experts; write the hub's spelling
        out = {}
        for k, v in sd.items():
            if k.endswith("mlp.experts.gate_up_proj"):
                E, two_i, h = v.shape
                for e in range(E):
                    out[k.replace("gate_up_proj", f"{e}.gate_proj.weight")] = [two_i // 2, h]
                    out[k.replace("gate_up_proj", f"{e}.up_proj.weight")] = [two_i // 2, h]
            elif k.endswith("mlp.experts.down_proj"):
                E, h, i = v.shape
                for e in range(E):
                    out[k.replace("down_proj", f"{e}.down_proj.weight")] = [h, i]
            else:
                out[k] = list(v.shape)
        return out
    return {k: list(v.shape) for k, v in sd.items()}


def scale_to(cfg: dict, gb: float) -> dict:
    """The config with as many layers as make about ``gb`` GB of bf16."""
    per_layer = 3 * cfg["num_experts"] * cfg["hidden_size"] * cfg["moe_intermediate_size"] * 2
    cfg = dict(cfg, num_hidden_layers=max(1, round(gb * 1e9 / per_layer)))
    return cfg


def write_checkpoint(d: Path, gb: float, n_shards: int) -> Path:
    """Random bf16 weights (normal, std 0.02; norms 1) in ``n_shards`` files cut in layer order, with an index."""
    cfg = scale_to(CONFIG, gb)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    sh = shapes(cfg)
    rng = np.random.default_rng(0)
    pool = ((rng.standard_normal(1 << 22, np.float32) * 0.02).view(np.uint32) >> 16).astype(np.uint16)  # bf16 bits

    def data(k: str) -> bytes:
        count = math.prod(sh[k])
        if "norm" in k:
            return np.full(count, 0x3F80, np.uint16).tobytes()  # 1.0
        return np.resize(np.roll(pool, -int(rng.integers(0, len(pool)))), count).tobytes()

    write_shards(d, {k: ("BF16", s, math.prod(s) * 2) for k, s in sh.items()}, n_shards, data)
    return d


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
    ap.add_argument("--gb", type=float, default=3.0)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    w = a.workdir
    try:
        ckpt = write_checkpoint(w / "repo" / REPO, a.gb, a.shards)
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
