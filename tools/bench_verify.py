#!/usr/bin/env python
"""What ``--verify`` costs: each expert file's blake3 is checked against the manifest on its first read.

On a synthetic pack with Qwen3-30B-A3B's expert size (hidden 2048, expert width 768: 2.5 MiB per expert at 4 bits),
measures blake3's own speed on one expert, the time of a first read of each expert through the store with and
without the check, and prompt and decode speed at a budget that streams experts, with and without it. The pack is
built once and reused from ``--cache``. Figures are in RELIABILITY.md.

    python tools/bench_verify.py --cache /tmp/moepack-verify [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import blake3
import numpy as np

import moepack
from moepack.convert.pipeline import convert
from moepack.demo import SyntheticSpec, write_checkpoint
from moepack.errors import BudgetError
from moepack.formats.reader import PackReader
from moepack.runtime.store import ExpertStore

SPEC = SyntheticSpec(hidden_size=2048, num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=4,
                     head_dim=128, num_experts=32, num_experts_per_tok=8, moe_intermediate_size=768, vocab_size=1024)


def build(cache: Path) -> Path:
    pack = cache / "pack"
    if not (pack / "manifest.json").exists():
        ckpt = write_checkpoint(cache / "ckpt", SPEC)
        convert(str(ckpt), pack, force=True, progress=False)
    return pack


def first_reads(pack: Path, verify: bool) -> tuple[list[float], str]:
    """Seconds to make each expert resident once, in a fresh store (one I/O thread, no prefetch)."""
    reader = PackReader(pack)
    n = len(reader.moe_layers) * SPEC.num_experts
    store = ExpertStore(reader, n, threads=1, prefetch=False, verify=verify)
    times = []
    try:
        for L in reader.moe_layers:
            for e in range(SPEC.num_experts):
                t0 = time.perf_counter()
                store.fetch(L, [e])
                times.append(time.perf_counter() - t0)
    finally:
        store.close()
    return times, store.io.mode


def decode(pack: Path, verify: bool, budget: int, prompt: list[int], tokens: int) -> dict:
    eng = moepack.load(pack, memory_budget=budget, heat=False, verify=verify)
    try:
        t0 = time.perf_counter()
        first = None
        for _ in eng.generate(prompt, tokens):
            first = first or time.perf_counter()
        end = time.perf_counter()
        return {"prompt_s": first - t0, "decode_tok_s": (tokens - 1) / (end - first), "bytes_read": eng.stats()["bytes_read"]}
    finally:
        eng.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/moepack-verify"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    pack = build(args.cache)
    expert_bytes = PackReader(pack).expert_layout(0).length

    buf = np.random.default_rng(0).integers(0, 255, expert_bytes, dtype=np.uint8)
    t0 = time.perf_counter()
    for _ in range(20):
        blake3.blake3(buf).hexdigest()
    hash_s = (time.perf_counter() - t0) / 20

    reads = {False: [], True: []}
    for _ in range(args.rounds):  # alternate, so drift in the machine's load hits both alike
        for verify in (False, True):
            t, mode = first_reads(pack, verify)
            reads[verify] += t
    try:
        moepack.load(pack, memory_budget=1, heat=False)
    except BudgetError as e:
        budget = e.minimum  # top_k slots: every token reads its experts, and the first reads get checked
    prompt = list(range(5, 5 + 16))
    runs = {}
    for verify in (False, True, False, True):  # the second of each is kept: the first warms MLX and the page cache
        runs[verify] = decode(pack, verify, budget, prompt, args.tokens)
    r = {
        "expert_bytes": expert_bytes, "io_mode": mode,
        "blake3_ms_per_expert": hash_s * 1e3, "blake3_gbps": expert_bytes / hash_s / 1e9,
        "first_read_ms": {"plain": statistics.median(reads[False]) * 1e3, "verify": statistics.median(reads[True]) * 1e3},
        "streaming_budget": budget, "generation": {"plain": runs[False], "verify": runs[True]},
    }
    if args.json:
        print(json.dumps(r, indent=2))
        return
    f, g = r["first_read_ms"], r["generation"]
    print(f"expert file {expert_bytes / 2**20:.2f} MiB, reads {mode}")
    print(f"blake3 alone: {r['blake3_ms_per_expert']:.2f} ms per expert ({r['blake3_gbps']:.2f} GB/s, one thread)")
    print(f"first read of an expert (median): {f['plain']:.2f} ms plain, {f['verify']:.2f} ms with verify "
          f"(+{f['verify'] - f['plain']:.2f} ms, {f['verify'] / f['plain'] - 1:+.0%})")
    for k in ("plain", "verify"):
        print(f"{k:>6}: prompt {g[k]['prompt_s']:.2f} s, decode {g[k]['decode_tok_s']:.2f} tok/s at the minimum budget")


if __name__ == "__main__":
    main()
