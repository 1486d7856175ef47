"""Element types of stored blobs, as data: name -> (numpy storage dtype, MLX dtype, bytes per element).

bfloat16 has no numpy dtype; it is stored and moved as little-endian uint16 and reinterpreted in MLX.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from moepack.errors import PackError


@dataclass(frozen=True)
class DType:
    name: str
    numpy: np.dtype  # how the bytes are held in numpy (bfloat16 -> uint16)
    mlx: mx.Dtype
    itemsize: int


_TABLE = [
    DType("float32", np.dtype("<f4"), mx.float32, 4),
    DType("float16", np.dtype("<f2"), mx.float16, 2),
    DType("bfloat16", np.dtype("<u2"), mx.bfloat16, 2),
    DType("uint32", np.dtype("<u4"), mx.uint32, 4),
    DType("int32", np.dtype("<i4"), mx.int32, 4),
    DType("uint16", np.dtype("<u2"), mx.uint16, 2),
    DType("uint8", np.dtype("u1"), mx.uint8, 1),
    DType("int8", np.dtype("i1"), mx.int8, 1),
]
BY_NAME = {d.name: d for d in _TABLE}
BY_MLX = {d.mlx: d for d in _TABLE}


def get(name: str) -> DType:
    try:
        return BY_NAME[name]
    except KeyError:
        raise PackError(f"unknown dtype {name!r}; this moepack knows {sorted(BY_NAME)}") from None


def name_of(dtype: mx.Dtype) -> str:
    return BY_MLX[dtype].name


def to_numpy_bytes(a: mx.array) -> np.ndarray:
    """The array's little-endian bytes as a numpy array of its storage dtype (no float conversion)."""
    d = BY_MLX[a.dtype]
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.asarray(a).astype(d.numpy, copy=False)


def from_numpy_bytes(arr: np.ndarray, dtype: str) -> mx.array:
    """Inverse of :func:`to_numpy_bytes`: numpy storage array -> MLX array of ``dtype``."""
    d = get(dtype)
    a = mx.array(arr.view(d.numpy))
    return a.view(mx.bfloat16) if d.name == "bfloat16" else a
