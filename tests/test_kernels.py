"""moepack.runtime.kernels: one expert's rows (and dense layers) through the MLX and the CPU BLAS paths.

Every path is checked against a float64 numpy reference of ``x @ dequantized(W).T`` and against the other path,
for determinism, and for whether a row's result depends on the other rows in the call. No timings here
(tools/bench_kernels.py measures).
"""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from moepack.runtime import kernels

ENCODINGS = {  # name -> record fields
    "affine4": dict(encoding="affine", bits=4, group_size=64),
    "affine8": dict(encoding="affine", bits=8, group_size=64),
    "mxfp4": dict(encoding="mxfp4", bits=4, group_size=32),
    "raw": dict(encoding="raw", bits=None, group_size=None),
}
N_SLOTS, D_OUT, D_IN = 3, 96, 256
TOL = 1e-5


def make_pool(name: str, d_out: int = D_OUT, d_in: int = D_IN, slots: int = N_SLOTS, seed: int = 0):
    rec = SimpleNamespace(**ENCODINGS[name])
    w = mx.random.normal((slots, d_out, d_in), key=mx.random.key(seed)) * 0.05
    if rec.encoding == "raw":
        parts = {"data": w}
    else:
        parts = dict(zip(("weight", "scales", "biases"),
                         mx.quantize(w, group_size=rec.group_size, bits=rec.bits, mode=rec.encoding)))
    mx.eval(parts)
    return parts, rec


def dequantized64(parts, rec, slot: int) -> np.ndarray:
    """The slot's weight as float64, from MLX's own decode (the values both paths multiply by)."""
    p = {k: v[slot] for k, v in parts.items()}
    if rec.encoding == "raw":
        w = p["data"]
    else:
        w = mx.dequantize(p["weight"], p["scales"], p.get("biases"), group_size=rec.group_size, bits=rec.bits,
                          mode=rec.encoding, dtype=mx.float32)
    return np.asarray(w).astype(np.float64)


def rel_err(y, ref) -> float:
    y = np.asarray(y, dtype=np.float64)
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def rows(P: int, d_in: int = D_IN, seed: int = 1) -> mx.array:
    x = mx.random.normal((P, d_in), key=mx.random.key(seed))
    mx.eval(x)
    return x


@pytest.mark.parametrize("name", list(ENCODINGS))
@pytest.mark.parametrize("path", kernels.PATHS)
@pytest.mark.parametrize("P", [1, 5, 33])
def test_expert_matmul_matches_float64_reference(name, path, P):
    parts, rec = make_pool(name)
    x = rows(P)
    for slot in range(N_SLOTS):
        y = kernels.expert_matmul(x, parts, slot, rec, path=path)
        assert y.shape == (P, D_OUT) and y.dtype == mx.float32
        ref = np.asarray(x).astype(np.float64) @ dequantized64(parts, rec, slot).T
        assert rel_err(y, ref) < TOL, (name, path, P, slot)


@pytest.mark.parametrize("name", list(ENCODINGS))
@pytest.mark.parametrize("P", [1, 2, 7, 64])
def test_blas_path_agrees_with_mlx_path(name, P):
    parts, rec = make_pool(name)
    x = rows(P)
    a = kernels.expert_matmul(x, parts, 1, rec, path="mlx")
    b = kernels.expert_matmul(x, parts, 1, rec, path="blas")
    assert rel_err(b, np.asarray(a).astype(np.float64)) < TOL


@pytest.mark.parametrize("name", list(ENCODINGS))
@pytest.mark.parametrize("path", kernels.PATHS)
def test_deterministic(name, path):
    parts, rec = make_pool(name, d_out=768, d_in=2048, slots=2)
    x = rows(40, 2048)
    a = np.asarray(kernels.expert_matmul(x, parts, 1, rec, path=path))
    b = np.asarray(kernels.expert_matmul(x, parts, 1, rec, path=path))
    assert np.array_equal(a, b)


@pytest.mark.parametrize("path", kernels.PATHS)
def test_bias_added(path):
    parts, rec = make_pool("affine4")
    x = rows(6)
    bias = mx.random.normal((N_SLOTS, D_OUT), key=mx.random.key(5))
    y = kernels.expert_matmul(x, parts, 2, rec, bias=bias[2], path=path)
    ref = np.asarray(x).astype(np.float64) @ dequantized64(parts, rec, 2).T + np.asarray(bias[2])
    assert rel_err(y, ref) < TOL


@pytest.mark.parametrize("path", kernels.PATHS)
def test_bf16_rows_come_back_bf16(path):
    parts, rec = make_pool("affine4")
    x = rows(8)
    y = kernels.expert_matmul(x.astype(mx.bfloat16), parts, 0, rec, path=path)
    assert y.dtype == mx.bfloat16
    ref = np.asarray(x.astype(mx.bfloat16).astype(mx.float32)).astype(np.float64) @ dequantized64(parts, rec, 0).T
    assert rel_err(y.astype(mx.float32), ref) < 1e-2  # bf16 output rounding


def test_default_path_by_rows_on_cpu():
    assert mx.default_device() == mx.cpu  # these tests run on the CPU back end
    for enc, n in kernels.CPU_BLAS_MIN_ROWS.items():
        assert kernels.choose_path(n - 1, enc) == "mlx"
        assert kernels.choose_path(n, enc) == "blas"
        assert kernels.choose_path(4096, enc) == "blas"
    assert kernels.choose_path(1, "affine") == "mlx"  # decode stays on MLX
    parts, rec = make_pool("affine8")
    for P in (1, 64):
        x = rows(P)
        want = kernels.expert_matmul(x, parts, 0, rec, path=kernels.choose_path(P, rec.encoding))
        assert np.array_equal(np.asarray(kernels.expert_matmul(x, parts, 0, rec)), np.asarray(want))


def test_unknown_path_rejected():
    parts, rec = make_pool("raw")
    with pytest.raises(ValueError):
        kernels.expert_matmul(rows(2), parts, 0, rec, path="gpu")


# ---- do a row's bits depend on the other rows in the call? ------------------------------------------------


def _row_invariance(path: str, name: str, d_out: int, d_in: int) -> dict:
    """For each P, whether the first P rows computed alone equal (bitwise) the same rows of a 257-row call."""
    parts, rec = make_pool(name, d_out=d_out, d_in=d_in, slots=1)
    x = rows(257, d_in)
    full = np.asarray(kernels.expert_matmul(x, parts, 0, rec, path=path))
    return {P: bool(np.array_equal(np.asarray(kernels.expert_matmul(x[:P], parts, 0, rec, path=path)), full[:P]))
            for P in (1, 2, 3, 5, 16, 64, 200)}


@pytest.mark.parametrize("name", ["affine4", "raw"])
def test_blas_rows_independent_of_batch_at_expert_size(name):
    """At expert size (768x2048), OpenBLAS sgemm gives a row the same bits for any P >= 2 rows in the call; one row
    alone differs (numpy calls sgemv). Measured on this machine's SkylakeX kernels: a property of the BLAS build
    and CPU, not a guarantee, so a different result is reported (xfail), not failed: the runtime does not rely on
    it, because the caller computes one expert's rows together and the path depends only on P."""
    got = _row_invariance("blas", name, 768, 2048)
    print(f"blas {name} 768x2048, rows bitwise equal to the 257-row call: {got}")
    if not all(v for P, v in got.items() if P >= 2):
        pytest.xfail(f"this BLAS is not row-invariant for P >= 2 at expert size: {got}")


@pytest.mark.parametrize("name", ["affine4", "raw"])
def test_mlx_rows_independent_of_batch(name):
    """MLX's CPU quantized matmul goes row by row: a row's bits do not depend on the others (reported likewise)."""
    got = _row_invariance("mlx", name, 768, 2048)
    print(f"mlx {name} 768x2048, rows bitwise equal to the 257-row call: {got}")
    if not all(got.values()):
        pytest.xfail(f"MLX is not row-invariant here: {got}")


# ---- dense layers --------------------------------------------------------------------------------------------


def dense_layers(d_in: int = 256, d_out: int = 192):
    lin = nn.Linear(d_in, d_out, bias=True)
    lin_nb = nn.Linear(d_in, d_out, bias=False)
    layers = {
        "linear": lin,
        "linear_nobias": lin_nb,
        "affine8": nn.QuantizedLinear.from_linear(lin, group_size=64, bits=8),
        "affine4_nobias": nn.QuantizedLinear.from_linear(lin_nb, group_size=64, bits=4),
        "mxfp4": nn.QuantizedLinear.from_linear(lin, group_size=32, bits=4, mode="mxfp4"),
    }
    mx.eval([layer.parameters() for layer in layers.values()])
    return layers


def dense_reference(x: mx.array, layer) -> np.ndarray:
    if isinstance(layer, nn.QuantizedLinear):
        w = mx.dequantize(layer.weight, layer.scales, layer.get("biases"), group_size=layer.group_size,
                          bits=layer.bits, mode=layer.mode, dtype=mx.float32)
    else:
        w = layer.weight
    y = np.asarray(x).astype(np.float64) @ np.asarray(w).astype(np.float64).T
    return y + np.asarray(layer.bias) if "bias" in layer else y


@pytest.mark.parametrize("kind", ["linear", "linear_nobias", "affine8", "affine4_nobias", "mxfp4"])
@pytest.mark.parametrize("path", kernels.PATHS)
def test_dense_matmul(kind, path):
    layer = dense_layers()[kind]
    x = mx.random.normal((2, 37, 256), key=mx.random.key(3))  # [B, T, in]
    y = kernels.dense_matmul(x, layer, path=path)
    assert y.shape == (2, 37, 192) and y.dtype == mx.float32
    ref = dense_reference(x.reshape(-1, 256), layer).reshape(2, 37, 192)
    assert rel_err(y, ref) < TOL
    assert rel_err(y, np.asarray(layer(x)).astype(np.float64)) < TOL
    assert np.array_equal(np.asarray(y), np.asarray(kernels.dense_matmul(x, layer, path=path)))  # deterministic


@pytest.mark.parametrize("kind", ["affine8", "mxfp4"])
def test_dense_slices_bounded_and_exact(kind, monkeypatch):
    """Slicing the dequantized weight into output-row slices gives the same result as one slice."""
    layer = dense_layers()[kind]
    x = mx.random.normal((50, 256), key=mx.random.key(4))
    whole = np.asarray(kernels.dense_matmul(x, layer, path="blas"))
    monkeypatch.setattr(kernels, "DENSE_SLICE_BYTES", 4 * 256 * 40)  # 40 rows a slice: 5 slices, the last short
    sliced = np.asarray(kernels.dense_matmul(x, layer, path="blas"))
    assert rel_err(sliced, whole.astype(np.float64)) < TOL
    assert rel_err(sliced, dense_reference(x, layer)) < TOL


def test_dense_default_path_and_rejects_other_modules():
    layer = dense_layers()["affine8"]
    x1 = mx.random.normal((1, 1, 256), key=mx.random.key(6))
    assert np.array_equal(np.asarray(kernels.dense_matmul(x1, layer)), np.asarray(layer(x1)))  # 1 row: MLX itself
    with pytest.raises(TypeError):
        kernels.dense_matmul(x1, nn.RMSNorm(256))
