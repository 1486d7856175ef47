#!/usr/bin/env python
"""Milliseconds per call of ``y = x @ W.T`` for one expert's P rows, by method, on the current MLX device.

Shapes: hidden 2048, expert width 768 (gate/up W [768, 2048], down W [2048, 768]). Encodings: affine 4-bit g64,
affine 8-bit g64, mxfp4 (g32), raw float32. Methods:

  mlx_qmm      mx.quantized_matmul on one slot of a pool (mx.matmul for raw): kernels.expert_matmul(path="mlx")
  gather_qmm   mx.gather_qmm over a 64-expert pool, x [P, 1, D], P rows spread evenly over the 64 experts with
               sorted rhs_indices (mx.gather_mm for raw): today's whole-layer call (models/moe.py _project)
  deq_mx       mx.dequantize of the slot + mx.matmul
  deq_np       mx.dequantize of the slot + numpy np.matmul (OpenBLAS): kernels.expert_matmul(path="blas")

``--dense``: also kernels.dense_matmul on a 2048x2048 nn.Linear / QuantizedLinear (8-bit, 4-bit), MLX vs BLAS.

Median and min of repeated calls after a warm-up (each call fully evaluated). Also reports numpy's BLAS threads and
whether a numpy sgemm and MLX CPU compute slow each other down when run at the same time.

    python tools/bench_kernels.py [--rows 1,4,16,64,256,1024] [--encodings affine4,raw] [--dense] [--json out.json]
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python tools/bench_kernels.py   # without those overrides
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import platform
import statistics
import sys
import threading
import time
from types import SimpleNamespace

import mlx.core as mx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's moepack
from moepack.runtime import kernels

HIDDEN, WIDTH, N_EXPERTS = 2048, 768, 64
ENCODINGS = {  # name -> (encoding, bits, group_size)
    "affine4": ("affine", 4, 64),
    "affine8": ("affine", 8, 64),
    "mxfp4": ("mxfp4", 4, 32),
    "raw": ("raw", None, None),
}


def blas_info() -> dict:
    """numpy's BLAS: library, core type and thread count (threadpoolctl if installed, else the library itself)."""
    info: dict = {"env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                                          "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}}
    try:
        import threadpoolctl

        info["threadpoolctl"] = [{k: d.get(k) for k in ("internal_api", "num_threads", "version", "architecture")}
                                 for d in threadpoolctl.threadpool_info()]
    except ImportError:
        info["threadpoolctl"] = "not installed"
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), "..", "numpy.libs", "libscipy_openblas*"))
    if libs:
        lib = ctypes.CDLL(libs[0])
        for sym, key in (("scipy_openblas_get_num_threads64_", "num_threads"),
                         ("scipy_openblas_get_corename64_", "corename"),
                         ("scipy_openblas_get_config64_", "config")):
            f = getattr(lib, sym, None)
            if f is not None:
                if key != "num_threads":
                    f.restype = ctypes.c_char_p
                v = f()
                info[key] = v.decode() if isinstance(v, bytes) else v
    return info


def timeit(fn, min_time: float = 0.3, max_reps: int = 15, min_reps: int = 3) -> tuple[float, float]:
    """(median, min) ms per call. On a shared machine the median carries others' load; the min is closest to
    what the hardware does alone."""
    fn()  # warm-up
    ts: list[float] = []
    while len(ts) < min_reps or (sum(ts) < min_time and len(ts) < max_reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3, min(ts) * 1e3


def make_pool(shape: tuple[int, int], encoding: str, bits, group_size) -> dict[str, mx.array]:
    w = mx.random.normal((N_EXPERTS, *shape), key=mx.random.key(0)) * 0.02
    if encoding == "raw":
        parts = {"data": w}
    else:
        q = mx.quantize(w, group_size=group_size, bits=bits, mode=encoding)
        parts = dict(zip(("weight", "scales", "biases"), q))
    mx.eval(parts)
    return parts


def bench_one(parts, rec, P: int, d_in: int) -> dict[str, float]:
    x = mx.random.normal((P, d_in), key=mx.random.key(1))
    mx.eval(x)
    slot = 3
    res = {}
    res["mlx_qmm"] = timeit(lambda: mx.eval(kernels.expert_matmul(x, parts, slot, rec, path="mlx")))
    xs = x[:, None, :]
    idx = mx.array(((np.arange(P) * N_EXPERTS) // P).astype(np.uint32))
    if rec.encoding == "raw":
        res["gather_qmm"] = timeit(lambda: mx.eval(mx.gather_mm(xs, parts["data"].swapaxes(-1, -2), rhs_indices=idx,
                                                                sorted_indices=True)))
    else:
        res["gather_qmm"] = timeit(lambda: mx.eval(mx.gather_qmm(
            xs, parts["weight"], parts["scales"], parts.get("biases"), rhs_indices=idx, transpose=True,
            group_size=rec.group_size, bits=rec.bits, mode=rec.encoding, sorted_indices=True)))
    p = {k: v[slot] for k, v in parts.items()}

    def deq_mx():
        w = kernels._dequantize(p, rec.encoding, rec.bits, rec.group_size)
        mx.eval(mx.matmul(x, w.T))

    res["deq_mx"] = timeit(deq_mx)
    res["deq_np"] = timeit(lambda: mx.eval(kernels.expert_matmul(x, parts, slot, rec, path="blas")))
    res["deq_only"] = timeit(lambda: mx.eval(kernels._dequantize(p, rec.encoding, rec.bits, rec.group_size)))
    return res


def bench_dense(rows: list[int]) -> list[dict]:
    """kernels.dense_matmul on a 2048x2048 projection (attention-sized): layer(x) (MLX) vs the BLAS path."""
    import mlx.nn as nn

    lin = nn.Linear(HIDDEN, HIDDEN, bias=False)
    layers = {"raw": lin, "affine8": nn.QuantizedLinear.from_linear(lin, group_size=64, bits=8),
              "affine4": nn.QuantizedLinear.from_linear(lin, group_size=64, bits=4)}
    mx.eval([m.parameters() for m in layers.values()])
    out = []
    for name, layer in layers.items():
        for P in rows:
            x = mx.random.normal((P, HIDDEN), key=mx.random.key(7))
            mx.eval(x)
            r = {m: timeit(lambda m=m: mx.eval(kernels.dense_matmul(x, layer, path=m))) for m in kernels.PATHS}
            out.append({"dense": name, "P": P, **r})
            print(f"dense {name:8s} 2048x2048 P={P:5d}  " + "  ".join(f"{k} {v[0]:8.2f}/{v[1]:.2f}"
                                                                       for k, v in r.items()), flush=True)
    return out


def contention() -> dict:
    """A numpy sgemm [256, 2048]x[2048, 768] alone and while an MLX thread runs 1-row quantized matmuls, and the
    MLX loop alone and beside numpy: do they share the cores?"""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((256, HIDDEN), dtype=np.float32)
    b = rng.standard_normal((WIDTH, HIDDEN), dtype=np.float32)
    w = mx.random.normal((WIDTH, HIDDEN), key=mx.random.key(2))
    wq, s, bi = mx.quantize(w, group_size=64, bits=4)
    x1 = mx.random.normal((1, HIDDEN), key=mx.random.key(3))
    mx.eval(wq, s, bi, x1)

    def np_calls(n=20):
        t0 = time.perf_counter()
        for _ in range(n):
            np.matmul(a, b.T)
        return (time.perf_counter() - t0) / n * 1e3

    def mx_calls(n=200):
        t0 = time.perf_counter()
        for _ in range(n):
            mx.eval(mx.quantized_matmul(x1, wq, s, bi, transpose=True, group_size=64, bits=4))
        return (time.perf_counter() - t0) / n * 1e3

    np_calls(3), mx_calls(10)
    alone_np, alone_mx = np_calls(), mx_calls()
    out: dict = {}
    th = threading.Thread(target=lambda: out.__setitem__("mx", mx_calls(600)))
    th.start()
    out["np"] = np_calls(40)
    th.join()
    return {"np_sgemm_ms_alone": alone_np, "np_sgemm_ms_with_mlx": out["np"],
            "mlx_qmm1_ms_alone": alone_mx, "mlx_qmm1_ms_with_numpy": out["mx"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,4,16,64,256,1024")
    ap.add_argument("--encodings", default=",".join(ENCODINGS))
    ap.add_argument("--dense", action="store_true", help="also time dense_matmul on a 2048x2048 layer")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    info = {"device": str(mx.default_device()), "mlx": mx.__version__, "numpy": np.__version__,
            "machine": platform.processor() or platform.machine(), "cpus": len(os.sched_getaffinity(0)),
            "loadavg": os.getloadavg(), "blas": blas_info()}
    print(json.dumps(info, indent=1))
    table = []
    for name in args.encodings.split(","):
        encoding, bits, gs = ENCODINGS[name]
        rec = SimpleNamespace(encoding=encoding, bits=bits, group_size=gs)
        for proj, shape in (("gate/up", (WIDTH, HIDDEN)), ("down", (HIDDEN, WIDTH))):
            parts = make_pool(shape, encoding, bits, gs)
            for P in rows:
                r = bench_one(parts, rec, P, shape[1])
                table.append({"encoding": name, "proj": proj, "P": P, **r})
                print(f"{name:8s} {proj:7s} P={P:5d}  " + "  ".join(f"{k} {v[0]:8.2f}/{v[1]:.2f}"
                                                                     for k, v in r.items()), flush=True)
            del parts
    dense = bench_dense(rows) if args.dense else []
    cont = contention()
    print(json.dumps(cont, indent=1))
    methods = ["mlx_qmm", "gather_qmm", "deq_mx", "deq_np"]
    for i, stat in enumerate(("median", "min")):
        print(f"\nms per call, {stat} of repeats (deq_only: the dequantize alone)")
        print("| encoding | proj | P | " + " | ".join(methods) + " | deq_only | best |")
        print("|---|---|---:|" + "---:|" * (len(methods) + 2))
        for r in table:
            best = min(methods, key=lambda m: r[m][i])
            print(f"| {r['encoding']} | {r['proj']} | {r['P']} | " + " | ".join(f"{r[m][i]:.2f}" for m in methods)
                  + f" | {r['deq_only'][i]:.2f} | {best} |")
    print(f"\nloadavg at end: {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "table": table, "dense": dense, "contention": cont}, f, indent=1)


if __name__ == "__main__":
    main()
