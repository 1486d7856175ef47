#!/usr/bin/env python
"""Concurrent requests batched vs the same requests one after another: expert bytes read and tokens per second
for N = 1, 2, 4, 8, from the server's own counters (``/stats``), at a memory budget well below the pack.

It starts `moepack serve --parallel 8` on --pack (default: a synthetic Qwen3-MoE of 8 experts, top-2, per layer,
random weights, so routing is close to random) and, for each N, sends N different completions one after another,
then the same N at once. Each row reports expert bytes read per generated token and throughput; ``union`` is what
random top-k routing predicts for the batch's reads relative to the sequential ones (per layer and step: the
expected number of distinct experts N sequences touch, over N x k).

    python tools/bench_batch.py                       # synthetic pack, budget: a third of its experts
    python tools/bench_batch.py --slots 8             # fewer slots than one token's experts
    python tools/bench_batch.py --pack PACK --budget 8GB --max-tokens 64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's moepack
WORDS = ["fox", "river", "engine", "cloud", "lantern", "harbor", "orbit", "meadow", "signal", "copper", "violet",
         "summit", "glacier", "ember", "falcon", "marble"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synthetic_pack(root: Path) -> Path:
    from moepack.convert.pipeline import convert
    from moepack.demo import SyntheticSpec, write_checkpoint

    spec = SyntheticSpec(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                         head_dim=64, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=1024,
                         vocab_size=1024, seed=1)
    return convert(str(write_checkpoint(root / "ckpt", spec)), root / "pack", progress=False, workers=1)


def budget_for(pack: Path, slots: int | None) -> int:
    """Dense weights plus ``slots`` expert slots (default: a third of the pack's experts)."""
    import moepack

    cfg = json.loads((pack / "config.json").read_text())
    experts = cfg["num_hidden_layers"] * cfg.get("num_experts", cfg.get("n_routed_experts", 0))
    with moepack.load(pack, heat=False) as e:
        return e.plan.dense_bytes + (slots or experts // 3) * e.plan.slot_bytes


def expected_union(n: int, k: int, experts: int) -> float:
    """E[distinct experts] / (n k) for n sequences each routing to k of ``experts`` uniformly at random."""
    return experts * (1 - (1 - k / experts) ** n) / (n * k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pack", type=Path)
    ap.add_argument("--budget", help="memory budget (default: dense + --slots expert slots)")
    ap.add_argument("--slots", type=int, help="expert slots when --budget is not given (default: a third of the "
                    "pack's experts)")
    ap.add_argument("--ns", type=int, nargs="*", default=[1, 2, 4, 8])
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    pack = a.pack or synthetic_pack(Path(tmp.name))
    budget = a.budget or str(budget_for(pack, a.slots))
    cfg = json.loads((pack / "config.json").read_text()) if (pack / "config.json").is_file() else {}
    k, n_exp = cfg.get("num_experts_per_tok", 0), cfg.get("num_experts", cfg.get("n_routed_experts", 0))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "MOEPACK_API_KEY"} | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "moepack.cli", "serve", str(pack), "--port", str(port),
                             "--parallel", str(max(a.ns)), "--memory-budget", budget],
                            env=env, stdout=subprocess.DEVNULL)
    rows = []
    try:
        c = httpx.Client(base_url=base, timeout=600)
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}")
            try:
                if c.get("/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        stats = lambda: c.get("/stats").json()["engine"]  # noqa: E731

        def complete(i: int) -> int:
            r = c.post("/v1/completions", json={"prompt": f"{WORDS[i % len(WORDS)]} {i}", "max_tokens": a.max_tokens,
                                                "temperature": 0.8, "seed": i})
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        complete(99)  # warm-up
        slots = stats()["slots"]
        for n in a.ns:
            out = {"n": n}
            for mode in ("sequential", "concurrent"):
                s0, t0 = stats(), time.perf_counter()
                if mode == "sequential":
                    toks = sum(complete(i) for i in range(n))
                else:
                    with ThreadPoolExecutor(n) as pool:
                        toks = sum(pool.map(complete, range(n)))
                dt, s1 = time.perf_counter() - t0, stats()
                read = s1["bytes_read"] - s0["bytes_read"]
                out[mode] = {"tokens": toks, "seconds": dt, "tok_s": toks / dt, "bytes_read": read,
                             "bytes_per_token": read / max(toks, 1), "reads": s1["reads"] - s0["reads"]}
            seq, con = out["sequential"], out["concurrent"]
            out["bytes_ratio"] = con["bytes_per_token"] / max(seq["bytes_per_token"], 1e-9)
            out["union_expected"] = expected_union(n, k, n_exp) if k and n_exp else None
            rows.append(out)
            print(f"N={n}: sequential {seq['tok_s']:.1f} tok/s, {seq['bytes_per_token'] / 2**20:.2f} MiB/token | "
                  f"concurrent {con['tok_s']:.1f} tok/s, {con['bytes_per_token'] / 2**20:.2f} MiB/token | "
                  f"bytes ratio {out['bytes_ratio']:.2f}"
                  + (f" (random-routing union {out['union_expected']:.2f})" if out["union_expected"] else ""),
                  flush=True)
        print(f"pack {pack}, budget {budget} bytes ({slots} expert slots), {k} of {n_exp} experts per token")
    finally:
        proc.terminate()
        proc.wait(30)
        tmp.cleanup()
    if a.json:
        a.json.write_text(json.dumps({"budget": budget, "slots": slots, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
