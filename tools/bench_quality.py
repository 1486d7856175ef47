"""What each conversion recipe costs in quality: pack size and held-out perplexity, float32 down to 2-bit experts.

Converts SRC (default: the demo model shipped with moepack) once per recipe and runs ``moepack eval``'s perplexity
over the same tokens with the same windows for each, so the figures compare. The demo model was trained with
256-token sequences, hence the default context of 256 (stride 128: every token but the first scored once, with
at least 128 tokens of context after the first window).

    python tools/train_demo.py /tmp/demo --held-out /tmp/vim-heldout.txt     # the held-out text, if not kept
    python tools/bench_quality.py --text /tmp/vim-heldout.txt
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import moepack
from moepack.convert.pipeline import convert
from moepack.convert.recipe import Recipe
from moepack.demo import DEMO_MODEL
from moepack.runtime.evaluate import perplexity
from moepack.runtime.tokenizer import Tokenizer

RECIPES = {  # name: (Recipe, the convert options that make it)
    "float32": (Recipe(quantize=False, dtype="float32"), "--no-quantize --dtype float32"),
    "bfloat16": (Recipe(quantize=False), "--no-quantize"),
    "8-bit": (Recipe(expert_bits=8), "--q-bits 8"),
    "default (4-bit experts)": (Recipe(), ""),
    "3-bit experts": (Recipe(expert_bits=3), "--q-bits 3"),
    "2-bit experts": (Recipe(expert_bits=2), "--q-bits 2"),
}


def pack_bytes(pack: Path) -> int:
    return sum(p.stat().st_size for p in pack.rglob("*") if p.is_file() and ".moepack" not in p.parts)


def expert_payload_bytes(pack: Path) -> int:
    """The routed experts' bytes without the alignment padding of their files: on a model this small the padding
    (16 KiB per expert file) hides the difference between recipes in the pack's size."""
    from moepack.formats.reader import PackReader

    m = PackReader(pack).manifest
    return sum(len(layer.files) * sum(r.nbytes for r in m.expert_layouts[layer.layout].tensors.values())
               for layer in m.experts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=DEMO_MODEL, help="checkpoint to convert (default: the demo model)")
    ap.add_argument("--text", type=Path, required=True, help="held-out text to score")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--stride", type=int, default=128)
    ap.add_argument("--max-text-tokens", type=int, default=50000)
    ap.add_argument("--work", type=Path, help="where to put the packs (default: a temporary folder)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = args.work or Path(tempfile.mkdtemp(prefix="moepack-quality-"))
    rows, base = [], None
    for name, (recipe, flags) in RECIPES.items():
        pack = work / name.split()[0]
        convert(str(args.src), pack, recipe, force=True, progress=False)
        text = args.text.read_text(encoding="utf-8", errors="replace")
        ids = Tokenizer(pack).encode(text)[: args.max_text_tokens]
        t0 = time.perf_counter()
        with moepack.load(pack) as engine:
            r = perplexity(engine, ids, context=args.context, stride=args.stride)
        base = base or r.perplexity
        row = {"recipe": name, "convert_options": flags, "pack_bytes": pack_bytes(pack),
               "expert_payload_bytes": expert_payload_bytes(pack), "perplexity": r.perplexity,
               "vs_float32": r.perplexity / base - 1, "scored_tokens": r.scored_tokens,
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        if not args.json:
            print(f"| {name} | `{flags}` | {row['pack_bytes'] / 2**20:.2f} MiB | "
                  f"{row['expert_payload_bytes'] / 2**20:.2f} MiB | {r.perplexity:.3f} | "
                  f"{100 * row['vs_float32']:+.2f}% |", flush=True)
    if args.json:
        json.dump({"src": str(args.src), "text": str(args.text), "context": args.context, "stride": args.stride,
                   "rows": rows}, sys.stdout, indent=1)
        print()


if __name__ == "__main__":
    main()
