"""Element types, as one table: name -> numpy storage dtype, MLX dtype, safetensors spelling, pack membership.

Both sides read it: the pack format (the dtypes a blob may have, SPEC.md section 2) and the converter (the dtypes
a source checkpoint may hold, some of which no pack stores: float64, int64, float8, ...). One table keeps the two
from drifting apart. bfloat16 and float8 have no numpy dtype; their bytes are held as unsigned integers of the
same width (bfloat16 is reinterpreted in MLX).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from moepack.errors import PackError


@dataclass(frozen=True)
class DType:
    name: str
    numpy: np.dtype  # how the bytes are held in numpy (bfloat16 -> uint16, float8 -> uint8)
    mlx: mx.Dtype | None  # None: a source-only dtype, never stored in a pack
    safetensors: str | None  # its spelling in a safetensors header, where the converter reads it from checkpoints

    @property
    def itemsize(self) -> int:
        return self.numpy.itemsize

    @property
    def in_packs(self) -> bool:
        return self.mlx is not None


_TABLE = [
    DType("float32", np.dtype("<f4"), mx.float32, "F32"),
    DType("float16", np.dtype("<f2"), mx.float16, "F16"),
    DType("bfloat16", np.dtype("<u2"), mx.bfloat16, "BF16"),
    DType("uint32", np.dtype("<u4"), mx.uint32, "U32"),
    DType("int32", np.dtype("<i4"), mx.int32, "I32"),
    DType("uint16", np.dtype("<u2"), mx.uint16, None),
    DType("uint8", np.dtype("u1"), mx.uint8, "U8"),
    DType("int8", np.dtype("i1"), mx.int8, "I8"),
    # source checkpoints only
    DType("float64", np.dtype("<f8"), None, "F64"),
    DType("int64", np.dtype("<i8"), None, "I64"),
    DType("int16", np.dtype("<i2"), None, "I16"),
    DType("bool", np.dtype("?"), None, "BOOL"),
    DType("float8_e4m3", np.dtype("u1"), None, "F8_E4M3"),
    DType("float8_e5m2", np.dtype("u1"), None, "F8_E5M2"),
    DType("float8_e8m0", np.dtype("u1"), None, "F8_E8M0"),  # power-of-two scales (DeepSeek V4's release)
]
BY_NAME = {d.name: d for d in _TABLE if d.in_packs}  # the dtypes a pack may hold (SPEC.md section 2)
BY_MLX = {d.mlx: d for d in _TABLE if d.in_packs}
SOURCE = {d.name: d for d in _TABLE if d.safetensors}  # the dtypes the converter reads from checkpoints
BY_SAFETENSORS = {d.safetensors: d for d in _TABLE if d.safetensors}
FLOATS = ("float32", "float16", "bfloat16")  # unquantized values, and quantization scales and biases
# Integer source tensors (DeepSeek V4's token id -> experts table), stored raw as int32 (``TABLE_DTYPE``).
INTEGERS = ("int64", "int32", "int16", "int8", "uint8", "uint32")
TABLE_DTYPE = "int32"


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
