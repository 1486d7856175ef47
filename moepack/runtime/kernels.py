"""Matmuls for many rows at once: one expert's rows against one slot of the pool, and dense layers.

Prefill sorts prompt tokens by expert and computes all rows routed to one expert in ONE matmul. Two ways to
compute ``y = x @ W.T``, chosen by device and row count:

* MLX: ``mx.quantized_matmul`` on the slot's packed arrays (``mx.matmul`` for raw). Used on a GPU (Metal,
  CUDA) always, and on the CPU for few rows. MLX's CPU back end pays per row for quantized matmuls (64 rows
  cost as much as 64 one-row calls) and links the reference netlib BLAS for float matmuls, so many rows are
  slow there.
* CPU BLAS: dequantize the slot once (``mx.dequantize``, the same decode MLX's kernels apply), view it as a
  numpy float32 matrix and multiply with numpy's ``np.matmul`` (OpenBLAS sgemm, multi-threaded). Costs one
  float32 ``[out, in]`` copy of the weight per call (6 MiB for a 768x2048 expert), freed on return. It is a
  synchronisation point: the inputs are evaluated and the result is a fresh, already-computed array.

Numerics: both paths multiply by exactly the dequantized float32 weight and accumulate in float32; results
agree to float32 rounding (~1e-6 relative), not bitwise. Each path is deterministic (same inputs, same bits).
Which path serves a call depends only on the device and the row count, so a caller that always computes one
expert's rows together (sorted prefill) gets results independent of the memory budget.

Row independence (measured, tests/test_kernels.py, 768x2048): OpenBLAS sgemm as numpy calls it gives each row
bitwise the same result whatever other rows share the call, for P >= 2 rows; a single row alone differs (numpy
calls sgemv, another summation order), and so do tiny matrices (M*N*K below ~2^18 take OpenBLAS's small-matrix
kernel). This is the BLAS build's and CPU's behaviour, not a guarantee. MLX's CPU path is row-invariant, P=1
included. Decode (P=1, MLX path) and prefill (many rows, BLAS path) thus agree to rounding only.

Bias: ``expert_matmul`` adds an expert bias only when the caller passes it (``bias=``, the slot's row of
``store.pool[name + "_bias"]["data"]``); ``dense_matmul`` adds the layer's own bias.

Contention: numpy's OpenBLAS uses all cores (2 threads here) and MLX's CPU streams are threads too; running both
at once oversubscribes the cores (measured here: a [256,2048]x[2048,768] sgemm 8.6 -> 43 ms while one MLX thread
ran 1-row quantized matmuls, which went 1.6 -> 3.6 ms). Call the BLAS path when no MLX CPU work is in flight
(it evaluates its inputs first, so work it depends on is finished before sgemm starts).

Timings behind the crossovers: the comment on ``CPU_BLAS_MIN_ROWS``; ``python tools/bench_kernels.py`` remeasures.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

# Rows from which the CPU BLAS path is used, per encoding (CPU only; a GPU always uses MLX).
# Measured with tools/bench_kernels.py on the dev VM: 2 vCPUs (AMD EPYC, OpenBLAS picks SkylakeX kernels), mlx 0.32.4
# [cpu], numpy 2.4.6 + OpenBLAS 0.3.31 with its default 2 threads, shared with other jobs (load average 4-5).
# Expert 768x2048 (gate/up) and 2048x768 (down); ms per call, min of repeats, MLX quantized_matmul vs
# dequantize+np.matmul:
#   affine 4-bit g64  P=1 1.4 vs 3.2-12   P=4 5.7 vs 4-40   P=16 22 vs 4-44   P=64 92 vs 5-52   P=256 370 vs 9-94
#   affine 8-bit g64  P=1 1.9 vs 8-12     P=4 6.2 vs 4-44   P=16 23 vs 4-86   P=64 95-185 vs 5-24  P=1024 1600 vs 25-81
#   mxfp4 g32         P=1 0.9 vs 20-60    P=16 11-20 vs 14-64   P=32 22-30 vs 15-23   P=64 63-93 vs 22-61
#   raw float32       (mx.matmul)  P=4 5.8 vs 0.8-80   P=16 21-45 vs 1.2-84   P=32 42-76 vs 1.9-10   P=64 120-280 vs 4-38
# The fixed cost of the BLAS path is the dequantize, ~2-3.5 ms (affine) or ~13-20 ms (mxfp4, MLX decodes e2m1
# slowly on the CPU); MLX costs ~1.4 ms (affine) / ~1 ms (mxfp4) per row; sgemm itself is ~0.02-0.05 ms a row. On a
# quiet machine BLAS would win from ~3 rows (affine). On this shared VM the 2-thread OpenBLAS often stalls (e.g.
# [16,2048]x[2048,768] at 36-84 ms instead of ~1 ms; our reading: it waits for its second thread to be scheduled,
# since the stalls vanish with OPENBLAS_NUM_THREADS=1), so the BLAS path wins reliably only from: affine 16 rows (won 12 of 16 measurements at 16 rows,
# all at 64), mxfp4 64 (mixed at 16-48), raw 32 (won 5 of 6 at 32, the loss 44 vs 42 ms;
# lost every gate/up one at 16; won all at 64).
# With OPENBLAS_NUM_THREADS=1 the stalls go away and BLAS wins from 4 rows (affine, 8 of 8), 2 rows (raw) and
# 16-32 rows (mxfp4); a deployment that pins BLAS to one thread per MLX-free core can lower these.
# In the engine's prompt path (two experts' weights dequantized at once over both cores, the next pair during this
# pair's matmuls) the affine crossover measured lower: whole prompts on the 3 GiB 16-layer pack of BENCHMARKS.md,
# quiet machine, seconds for 18 / 100 / 400 tokens at a minimum of 2 rows: 16.0 / 23.2 / 27.1; 4: 12.4 / 22.3 / 27.1;
# 8: 9.6 / 24.7 / 23.8; 16: 9.1 / 29.7 / 26.5 (one Engine.forward each, 1.2 GB budget).
CPU_BLAS_MIN_ROWS = {"affine": 8, "mxfp4": 64, "raw": 32}

# The dense BLAS path dequantizes a quantized weight in slices of output rows of at most this many float32
# bytes, so the temporary is bounded (a 151936x2048 LM head would otherwise need 1.2 GiB at once). The slicing
# depends only on the layer's shape, never on the rows, so results stay deterministic.
DENSE_SLICE_BYTES = 64 << 20

PATHS = ("mlx", "blas")


_EXTRA_STREAMS: list | None = None


def compute_streams() -> list:
    """Streams for independent MLX work: the caller's default stream (None), plus on the CPU one more per core (up
    to 8 in all), since MLX's CPU back end runs each op on one thread. Thread-local streams, so a model loaded on one
    thread can generate on another."""
    global _EXTRA_STREAMS
    if _EXTRA_STREAMS is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n = min(cores, 8) - 1 if on_cpu() else 0
        _EXTRA_STREAMS = [mx.new_thread_local_stream(mx.cpu) for _ in range(n)]
    return [None, *_EXTRA_STREAMS]


def on_stream(stream) -> contextlib.AbstractContextManager:
    return mx.stream(stream) if stream is not None else contextlib.nullcontext()


def dequantize_slots(jobs: list[tuple[dict[str, mx.array], int, Any]]) -> list[mx.array]:
    """Several expert matrices (pool parts, slot, TensorRecord) dequantized to float32 [out, in] over the compute
    streams (MLX dequantizes on one core per op), started at once (``mx.async_eval``): the caller takes them with
    ``np.asarray`` when it needs them, so the next experts' weights decode while this expert multiplies."""
    streams = compute_streams()
    outs = []
    for i, (parts, slot, rec) in enumerate(jobs):
        with on_stream(streams[i % len(streams)]):
            outs.append(_dequantize(_slot_parts(parts, slot), rec.encoding, rec.bits, rec.group_size))
    mx.async_eval(*outs)
    return outs


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def choose_path(rows: int, encoding: str) -> str:
    """"blas" on the CPU from ``CPU_BLAS_MIN_ROWS[encoding]`` rows on, else "mlx"."""
    if on_cpu() and rows >= CPU_BLAS_MIN_ROWS.get(encoding, CPU_BLAS_MIN_ROWS["affine"]):
        return "blas"
    return "mlx"


def _slot_parts(parts: dict[str, mx.array], slot: int) -> dict[str, mx.array]:
    return {k: v[slot] for k, v in parts.items()}


def _dequantize(p: dict[str, mx.array], encoding: str, bits: int | None, group_size: int | None) -> mx.array:
    """One matrix's parts -> float32 [out, in], exactly the values MLX's quantized matmul multiplies by."""
    if encoding == "raw":
        w = p["data"]
        return w if w.dtype == mx.float32 else w.astype(mx.float32)
    if encoding in ("affine", "mxfp4"):
        return mx.dequantize(p["weight"], p["scales"], p.get("biases"), group_size=group_size, bits=bits,
                             mode=encoding, dtype=mx.float32)
    raise ValueError(f"unknown tensor encoding {encoding!r}; expected raw, affine or mxfp4")


def _host(a: mx.array) -> np.ndarray:
    """An evaluated float32 MLX array as a numpy array (no copy for contiguous arrays)."""
    return np.asarray(a)


def _mlx_matmul(x: mx.array, p: dict[str, mx.array], encoding: str, bits: int | None,
                group_size: int | None) -> mx.array:
    if encoding == "raw":
        return mx.matmul(x, p["data"].T)
    return mx.quantized_matmul(x, p["weight"], p["scales"], p.get("biases"), transpose=True,
                               group_size=group_size, bits=bits, mode=encoding)


def expert_matmul(x: mx.array, parts: dict[str, mx.array], slot: int, rec, *, bias: mx.array | None = None,
                  path: str | None = None) -> mx.array:
    """``x @ W.T`` for the rows of one expert: x [P, D_in] -> [P, D_out] in x's dtype.

    ``parts``: the pool's arrays of one tensor (``store.pool[name]``); ``slot``: the expert's slot; ``rec``:
    its TensorRecord (only ``encoding``, ``bits``, ``group_size`` are read). ``bias``: the expert's bias row
    [D_out], if the pack has one (``store.pool[name + "_bias"]["data"][slot]``); the caller passes it, since
    ``parts`` holds one tensor's parts only. ``path``: "mlx" or "blas" to force one (tests, benchmarks);
    default by ``choose_path``.
    """
    path = path or choose_path(x.shape[0], rec.encoding)
    p = _slot_parts(parts, slot)
    if path == "mlx":
        y = _mlx_matmul(x, p, rec.encoding, rec.bits, rec.group_size)
        y = y if bias is None else y + bias.astype(y.dtype)
        return y if y.dtype == x.dtype else y.astype(x.dtype)  # float32 scales would promote bf16 rows
    if path != "blas":
        raise ValueError(f"path must be one of {PATHS}, not {path!r}")
    w = _dequantize(p, rec.encoding, rec.bits, rec.group_size)
    xf = x if x.dtype == mx.float32 else x.astype(mx.float32)
    bf = None if bias is None else bias.astype(mx.float32)
    mx.eval(xf, w) if bf is None else mx.eval(xf, w, bf)
    y = np.matmul(_host(xf), _host(w).T)
    if bf is not None:
        y += _host(bf)
    out = mx.array(y)
    return out if x.dtype == mx.float32 else out.astype(x.dtype)


def _layer_parts(layer: nn.Module) -> tuple[str, dict[str, mx.array], int | None, int | None]:
    if isinstance(layer, nn.QuantizedLinear):
        p = {"weight": layer.weight, "scales": layer.scales}
        if "biases" in layer:
            p["biases"] = layer.biases
        return layer.mode, p, layer.bits, layer.group_size
    if isinstance(layer, nn.Linear):
        return "raw", {"data": layer.weight}, None, None
    raise TypeError(f"dense_matmul takes nn.Linear or nn.QuantizedLinear, not {type(layer).__name__}")


def dense_matmul(x: mx.array, layer: nn.Module, *, path: str | None = None) -> mx.array:
    """``layer(x)`` for nn.Linear / nn.QuantizedLinear (affine or mxfp4), bias included: x [..., in] -> [..., out].

    On the CPU with many rows (``choose_path`` on the row count), a quantized weight is dequantized per call
    into float32 slices of at most ``DENSE_SLICE_BYTES`` (64 MiB) of output rows, each multiplied with numpy's
    BLAS; without slicing that temporary would be one float32 [out, in] matrix (4 bytes per weight). A float32
    nn.Linear weight is used in place (no copy). Otherwise ``layer(x)`` itself (MLX). The crossover is the experts'
    (``CPU_BLAS_MIN_ROWS`` by encoding: nn.Linear counts as raw); both costs scale with in*out, and a 2048x2048
    layer measured the same way (ms, MLX vs BLAS, tools/bench_kernels.py --dense): 8-bit P=4 17 vs 14-19, P=16
    69 vs 16, P=256 1040 vs 25; 4-bit P=16 58 vs 14; float32 P=4 14 vs 40, P=16 76 vs 3, P=256 1000 vs 16.
    """
    encoding, p, bits, group_size = _layer_parts(layer)
    *lead, d_in = x.shape
    rows = math.prod(lead)
    path = path or choose_path(rows, encoding)
    if path == "mlx":
        return layer(x)
    if path != "blas":
        raise ValueError(f"path must be one of {PATHS}, not {path!r}")
    out_dims = p["weight" if encoding != "raw" else "data"].shape[0]
    xf = x.reshape(rows, d_in)
    xf = xf if xf.dtype == mx.float32 else xf.astype(mx.float32)
    mx.eval(xf)
    xn = _host(xf)
    step = out_dims if encoding == "raw" else max(1, DENSE_SLICE_BYTES // (4 * d_in))
    y = np.empty((rows, out_dims), dtype=np.float32)
    for a in range(0, out_dims, step):
        b = min(a + step, out_dims)
        w = _dequantize({k: v[a:b] for k, v in p.items()}, encoding, bits, group_size)
        mx.eval(w)
        y[:, a:b] = np.matmul(xn, _host(w).T)
        del w
    if "bias" in layer:
        bias = layer.bias.astype(mx.float32)
        mx.eval(bias)
        y += _host(bias)
    out = mx.array(y).reshape(*lead, out_dims)
    return out if x.dtype == mx.float32 else out.astype(x.dtype)


def matmul_nt(x: mx.array, w: mx.array) -> mx.array:
    """``x @ w.T`` for float matrices, through numpy's BLAS from ``CPU_BLAS_MIN_ROWS["raw"]`` rows of x on the CPU."""
    if choose_path(math.prod(x.shape[:-1]), "raw") == "mlx":
        return x @ w.T
    mx.eval(x, w)
    return mx.array(np.matmul(_host(x), _host(w).T))


def linear(layer: nn.Module, x: mx.array) -> mx.array:
    """``nn.Linear.__call__``/``nn.QuantizedLinear.__call__`` for ``layer``, through numpy's BLAS where
    ``choose_path`` says so (modules that subclass a linear layer, e.g. routers, call this)."""
    encoding = layer.mode if isinstance(layer, nn.QuantizedLinear) else "raw"
    if choose_path(math.prod(x.shape[:-1]), encoding) == "blas":
        return dense_matmul(x, layer, path="blas")
    base = nn.QuantizedLinear if isinstance(layer, nn.QuantizedLinear) else nn.Linear
    return base.__call__(layer, x)


class _RowsLinear:
    """Mixin: many rows through numpy's BLAS (``dense_matmul``), few through the layer's own MLX call."""

    def __call__(self, x: mx.array) -> mx.array:
        return linear(self, x)


class RowsLinear(_RowsLinear, nn.Linear):
    pass


class RowsQuantizedLinear(_RowsLinear, nn.QuantizedLinear):
    pass


def blas_for_many_rows(model: nn.Module) -> int:
    """On MLX's CPU back end, let every plain ``nn.Linear``/``nn.QuantizedLinear`` of ``model`` send calls with many
    rows (a prompt) through numpy's BLAS; returns how many layers. Subclasses (routers) keep their own call."""
    if not on_cpu():
        return 0
    n = 0
    for _, m in model.named_modules():
        if type(m) is nn.QuantizedLinear:
            m.__class__ = RowsQuantizedLinear
        elif type(m) is nn.Linear:
            m.__class__ = RowsLinear
        else:
            continue
        n += 1
    return n
