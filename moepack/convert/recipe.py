"""What a conversion does to each tensor: the recipe (dtype, quantization of experts and dense matrices).

Tensors a release already quantized (see ``encodings``) are carried as they are when a pack encoding holds the
same numbers (``carried: "lossless"``); otherwise, or with ``requantize``, they are decoded and the recipe applies
as to any float tensor (``"requantized"``, or ``"dequantized"`` when the recipe leaves them unquantized).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from moepack import arch
from moepack.convert.encodings import Quantized
from moepack.formats import dtypes, quant
from moepack.formats.manifest import DEFAULT_ALIGNMENT
from moepack.formats.writer import check_alignment

DTYPES = {name: dtypes.get(name).mlx for name in dtypes.FLOATS}


class Encoded(NamedTuple):
    """One tensor as the pack stores it (the fields of a TensorRecord, less the blobs)."""

    encoding: str
    parts: dict[str, mx.array]
    bits: int | None
    group_size: int | None
    dtype: str  # the record's dtype
    carried: str | None  # for a quantized source tensor: "lossless", "requantized" or "dequantized"


@dataclass(frozen=True)
class Recipe:
    dtype: str = "bfloat16"  # for everything left unquantized, and for scales/biases
    quantize: bool = True
    expert_bits: int = 4
    expert_group_size: int = 64
    dense_bits: int = 8
    dense_group_size: int = 64
    alignment: int = DEFAULT_ALIGNMENT
    requantize: bool = False  # decode quantized source tensors and apply the recipe even where they carry losslessly
    stream_tables: bool = True  # token-indexed tables (the input embedding, PLE) streamed (SPEC 3.6; False: resident, v1)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
        for b in (self.expert_bits, self.dense_bits):
            if b not in quant.BITS:
                raise ValueError(f"bits must be one of {quant.BITS}")
        for g in (self.expert_group_size, self.dense_group_size):
            if g not in quant.GROUP_SIZES:
                raise ValueError(f"group size must be one of {quant.GROUP_SIZES}")
        check_alignment(self.alignment)  # here, before a conversion starts and records its options

    def to_json(self) -> dict:
        return asdict(self)

    def encode(self, name: str, a: mx.array, expert: bool) -> tuple[str, dict[str, mx.array], int | None, int | None]:
        """Encode one source tensor: returns (encoding, parts, bits, group_size)."""
        a = a.astype(DTYPES[self.dtype])
        bits, gs = (self.expert_bits, self.expert_group_size) if expert else (self.dense_bits, self.dense_group_size)
        wants = expert and name in arch.EXPERT_PROJS or not expert and arch.is_quantizable_dense(name, list(a.shape))
        if self.quantize and wants and quant.can_quantize(a.shape, gs):
            return "affine", quant.encode_affine(a, bits, gs), bits, gs
        return "raw", {"data": a}, None, None

    def encode_source(self, name: str, a: mx.array | Quantized, expert: bool) -> Encoded:
        """Encode one source tensor, float or quantized (see the module docstring)."""
        if not isinstance(a, Quantized) and not mx.issubdtype(a.dtype, mx.floating):  # an integer table
            table = dtypes.get(dtypes.TABLE_DTYPE).mlx
            if a.size and (a.max().item() > np.iinfo(np.int32).max or a.min().item() < np.iinfo(np.int32).min):
                raise ValueError(f"{name}: integer values beyond int32, which packs store tables in")
            return Encoded("raw", {"data": a.astype(table)}, None, None, dtypes.TABLE_DTYPE, None)
        if not isinstance(a, Quantized):
            return Encoded(*self.encode(name, a, expert), self.dtype, None)
        if not self.requantize and (packed := a.repack(self.dtype)) is not None:
            return Encoded(*packed, "lossless")
        enc, parts, bits, gs = self.encode(name, a.decode(), expert)
        return Encoded(enc, parts, bits, gs, self.dtype, "dequantized" if enc == "raw" else "requantized")
