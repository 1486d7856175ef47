"""Which expert cache policy reads the fewest bytes per decoded token: LRU, LFU, either with a pinned hot set from a
heat profile, either with next-layer prefetch, at several budgets.

Protocol. Prompts are cut from TEXT (the demo model's held-out Vim help, or any text): every ``--prompt-tokens``
window of the tokenized text, ``--prompts`` of them, spread over the text. The heat profile the pinned runs use is
recorded on a disjoint set of prompts (as ``moepack profile`` would, on the user's own workload). For each budget
(a fraction of all routed experts as slots) and each configuration, one fresh engine runs every prompt: the prompt
goes through the model, then ``--tokens`` tokens are decoded with fixed sampling (the output does not depend on the
policy, so every configuration decodes the same tokens), and only the decode's expert reads are counted. The pool
carries over from prompt to prompt, as in a chat or a server.

    python tools/bench_policy.py PACK --text /tmp/vim-heldout.txt --json

Byte counts do not depend on the machine's speed or load; they are the figure to compare.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import moepack
from moepack.runtime import heat
from moepack.runtime.policy import LFUPolicy
from moepack.runtime.tokenizer import Tokenizer

CONFIGS = {  # name: engine options
    "lru": {"policy": "lru"},
    "lfu": {"policy": "lfu"},
    "lru+pinned": {"policy": "lru", "pin_hot": 0.5},
    "lfu+pinned": {"policy": "lfu", "pin_hot": 0.5},
    "lru+prefetch": {"policy": "lru", "prefetch": True},
    "lfu+prefetch": {"policy": "lfu", "prefetch": True},
}


def prompts_from(text: str, tok: Tokenizer, n: int, length: int, offset: int = 0) -> list[list[int]]:
    """``n`` prompts of ``length`` tokens spread evenly over ``text``; ``offset`` (0 or 1) picks a disjoint set."""
    ids = tok.encode(text, add_special_tokens=False)
    step = max(length, len(ids) // (2 * n + 1))
    starts = range(offset * step, len(ids) - length, 2 * step)
    out = [ids[s:s + length] for s in starts][:n]
    if len(out) < n:
        raise SystemExit(f"the text gives only {len(out)} prompts of {length} tokens; use a longer text")
    return out


def budget_for_slots(pack: str, slots: int) -> int:
    """The memory budget whose plan has exactly ``slots`` expert slots (the engine's own arithmetic)."""
    with moepack.load(pack, heat=False) as full:
        minimum, slot_bytes = full.plan.minimum, full.plan.slot_bytes
    with moepack.load(pack, memory_budget=minimum, heat=False) as small:
        base = small.plan.n_slots
    budget = minimum + (slots - base) * slot_bytes
    for _ in range(4):
        with moepack.load(pack, memory_budget=budget, heat=False) as e:
            got = e.plan.n_slots
        if got == slots:
            return budget
        budget += (slots - got) * slot_bytes
    raise SystemExit(f"could not find a budget with {slots} slots (got {got})")


def config(name: str) -> dict:
    """A name of CONFIGS, or ``lfu:N``: LFU whose counts halve every N accesses (``lfu``: every 2 x experts)."""
    if name.startswith("lfu:"):
        return {"policy": LFUPolicy(period=int(name[4:]))}  # a fresh policy for each engine
    if name not in CONFIGS:
        raise SystemExit(f"unknown configuration {name!r}: one of {', '.join(CONFIGS)} or lfu:PERIOD")
    return CONFIGS[name]


def run_config(pack: str, budget: int, opts: dict, prompts: list[list[int]], tokens: int,
               heat_path: Path | None) -> dict:
    use_heat = heat_path if opts.get("pin_hot") else False
    with moepack.load(pack, memory_budget=budget, heat=use_heat, **opts) as engine:
        read = hits = misses = prefetched = decoded = 0
        for i, prompt in enumerate(prompts):
            cache = engine.make_cache()
            engine.forward(prompt[:-1], cache)
            before = dict(engine.stats())
            n = sum(1 for _ in engine.generate(prompt[-1:], tokens, temperature=0.7, top_p=0.9, seed=i, cache=cache))
            after = engine.stats()
            read += after["bytes_read"] - before["bytes_read"]
            hits += after["hits"] - before["hits"]
            misses += after["misses"] - before["misses"]
            prefetched += after["prefetch_issued"] - before["prefetch_issued"]
            decoded += n
        return {"slots": engine.plan.n_slots, "decode_tokens": decoded, "bytes_per_token": read / decoded,
                "hit_rate": hits / max(1, hits + misses), "prefetch_issued": prefetched}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pack")
    ap.add_argument("--text", type=Path, required=True, help="text to cut prompts from (held out from training)")
    ap.add_argument("--fractions", default="0.125,0.25,0.5", help="budgets, as fractions of all experts")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=200, help="tokens decoded per prompt")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: names of CONFIGS, or lfu:PERIOD")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    tok = Tokenizer(args.pack)
    text = args.text.read_text(encoding="utf-8", errors="replace")
    prompts = prompts_from(text, tok, args.prompts, args.prompt_tokens)
    profile_prompts = prompts_from(text, tok, args.prompts, args.prompt_tokens, offset=1)
    with moepack.load(args.pack, heat=False) as engine:
        total = sum(len(layer.files) for layer in engine.reader.manifest.experts)
        for p in profile_prompts:  # the heat profile: which experts this kind of workload uses
            list(engine.generate(p, args.tokens, temperature=0.7, top_p=0.9, seed=0))
        tmp = Path(tempfile.mkdtemp(prefix="moepack-policy-"))
        heat_path = heat.save(engine.reader, engine.store.heat, tmp / "heat.json")

    rows = []
    for frac in (float(f) for f in args.fractions.split(",")):
        slots = max(1, round(frac * total))
        budget = budget_for_slots(args.pack, slots)
        for name in args.configs.split(","):
            r = run_config(args.pack, budget, config(name), prompts, args.tokens, heat_path)
            rows.append({"fraction": frac, "config": name, "budget": budget, **r})
            if not args.json:
                print(f"{frac:>6.3f} {r['slots']:>5} slots  {name:<13} {r['bytes_per_token'] / 1024:8.1f} KiB/token"
                      f"  hit rate {100 * r['hit_rate']:5.1f}%", flush=True)
    if args.json:
        json.dump({"pack": args.pack, "experts": total, "prompts": args.prompts, "prompt_tokens": args.prompt_tokens,
                   "tokens": args.tokens, "rows": rows}, sys.stdout, indent=1)
        print()


if __name__ == "__main__":
    main()
