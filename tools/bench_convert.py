#!/usr/bin/env python
"""Time ``moepack convert`` beside ``mlx_lm.convert`` on one synthetic multi-GB Qwen3-MoE checkpoint.

The checkpoint has the real Qwen3-MoE tensor names, a hub-spelling config.json (``num_experts``,
``rope_theta``), hub-like shards with ``model.safetensors.index.json`` and a minimal tokenizer (mlx_lm
loads one). It is written tensor by tensor straight into the safetensors format, so building it never
holds more than one tensor, and it is reused from the cache directory when the dimensions match.

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
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# Qwen3-30B-A3B's shape, cut down in experts, layers and vocab to reach a few GB.
DEFAULT_DIMS = dict(hidden=2048, width=768, experts=64, heads=32, kv_heads=4, head_dim=128, vocab=32768, top_k=8)


# ---------------------------------------------------------------------------------------------
# the synthetic checkpoint


def tensor_shapes(d: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a Qwen3-MoE checkpoint, in the order hub shards hold them."""
    H, I, E, nh, nkv, hd = d["hidden"], d["width"], d["experts"], d["heads"], d["kv_heads"], d["head_dim"]
    out = [("model.embed_tokens.weight", (d["vocab"], H))]
    for L in range(d["layers"]):
        p = f"model.layers.{L}."
        out += [(p + "input_layernorm.weight", (H,)), (p + "post_attention_layernorm.weight", (H,)),
                (p + "self_attn.q_proj.weight", (nh * hd, H)), (p + "self_attn.k_proj.weight", (nkv * hd, H)),
                (p + "self_attn.v_proj.weight", (nkv * hd, H)), (p + "self_attn.o_proj.weight", (H, nh * hd)),
                (p + "self_attn.q_norm.weight", (hd,)), (p + "self_attn.k_norm.weight", (hd,)),
                (p + "mlp.gate.weight", (E, H))]
        for e in range(E):
            q = f"{p}mlp.experts.{e}."
            out += [(q + "gate_proj.weight", (I, H)), (q + "up_proj.weight", (I, H)), (q + "down_proj.weight", (H, I))]
    out += [("model.norm.weight", (H,)), ("lm_head.weight", (d["vocab"], H))]
    return out


def model_bytes(d: dict) -> int:
    return sum(2 * int(np.prod(s)) for _, s in tensor_shapes(d))


def layers_for(gb: float, d: dict) -> int:
    """The number of layers that brings the checkpoint closest to ``gb`` GiB."""
    per_layer = model_bytes({**d, "layers": 1}) - model_bytes({**d, "layers": 0})
    return max(1, round((gb * (1 << 30) - model_bytes({**d, "layers": 0})) / per_layer))


def config_json(d: dict) -> dict:
    """Hub (pre-transformers-5) spelling, as Qwen/Qwen3-30B-A3B's config.json has it."""
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "decoder_sparse_step": 1,
        "head_dim": d["head_dim"], "hidden_act": "silu", "hidden_size": d["hidden"], "initializer_range": 0.02,
        "intermediate_size": 4 * d["width"], "max_position_embeddings": 40960, "max_window_layers": d["layers"],
        "mlp_only_layers": [], "moe_intermediate_size": d["width"], "norm_topk_prob": True,
        "num_attention_heads": d["heads"], "num_experts": d["experts"], "num_experts_per_tok": d["top_k"],
        "num_hidden_layers": d["layers"], "num_key_value_heads": d["kv_heads"], "output_router_logits": False,
        "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": d["vocab"],
    }


def random_bf16(rng: np.random.Generator, shape: tuple[int, ...], norm: bool) -> np.ndarray:
    """bf16 bit patterns: random sign and mantissa, exponent 120..121 (|x| in [2^-7, 2^-5)); norms are 1.0."""
    if norm:
        return np.full(shape, 0x3F80, np.uint16)
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    return (bits & 0x80FF) | 0x3C00


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...]]], rng: np.random.Generator) -> None:
    """Stream one shard in the safetensors format (8-byte header length, JSON header, data), a tensor at a time."""
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in tensors:
            f.write(random_bf16(rng, shape, norm=name.endswith("norm.weight")).tobytes())
    os.replace(tmp, path)


def build_checkpoint(root: Path, d: dict, shard_gb: float, seed: int = 0) -> Path:
    """Write (or reuse) the checkpoint in ``root``; a stamp file records the dimensions it was built with."""
    stamp = root / "bench.json"
    want = {"dims": d, "shard_gb": shard_gb, "seed": seed, "version": 1}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    shards, cur, size = [], [], 0
    for name, shape in tensor_shapes(d):
        n = 2 * int(np.prod(shape))
        if cur and size + n > shard_gb * (1 << 30):
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    shards.append(cur)
    rng = np.random.default_rng(seed)
    weight_map = {}
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        print(f"[bench] writing {fname}", file=sys.stderr, flush=True)
        write_safetensors(root / fname, tensors, rng)
        weight_map.update({n: fname for n, _ in tensors})
    index = {"metadata": {"total_size": model_bytes(d)}, "weight_map": dict(sorted(weight_map.items()))}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (root / "config.json").write_text(json.dumps(config_json(d), indent=2))
    (root / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    write_tokenizer(root)
    stamp.write_text(json.dumps(want))
    return root


def write_tokenizer(root: Path) -> None:
    """A minimal word-level fast tokenizer: mlx_lm.convert loads (and saves) one; moepack copies it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(253)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "model_max_length": 40960,
    }))


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
