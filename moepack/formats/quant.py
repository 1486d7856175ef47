"""Tensor encodings of the pack (SPEC.md "Encodings").

``raw``: the tensor's elements, row-major, little-endian.
``affine``: MLX affine quantization. Each row of the last axis is cut into groups of ``group_size``
elements; a group has a scale ``s`` and bias ``b`` (stored in the record's dtype) and each element is
an unsigned ``bits``-bit code ``q`` with value ``q * s + b``. Codes form a little-endian bit stream per
row (element i occupies bits ``[i*bits, (i+1)*bits)``), stored as uint32 words. Encoding is done by
``mlx.core.quantize`` itself, so packed bytes equal what MLX produces for the same input.
``mxfp4``: OCP MXFP4, MLX's ``mode="mxfp4"``: groups of 32 e2m1 codes (4 bits, packed as for affine) sharing one
e8m0 scale byte; no biases. Written only by carrying an MXFP4 source (gpt-oss) losslessly.
"""

from __future__ import annotations

import mlx.core as mx

from moepack.errors import PackError

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)


def can_quantize(shape: tuple[int, ...] | list[int], group_size: int) -> bool:
    """Affine needs a matrix whose rows split into whole groups (and whole uint32 words)."""
    return len(shape) >= 2 and shape[-1] % group_size == 0 and shape[-1] >= group_size


def encode_affine(w: mx.array, bits: int, group_size: int) -> dict[str, mx.array]:
    if bits not in BITS or group_size not in GROUP_SIZES:
        raise ValueError(f"unsupported affine parameters bits={bits} group_size={group_size}")
    wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    return {"weight": wq, "scales": scales, "biases": biases}


def decode(parts: dict[str, mx.array], encoding: str, bits: int | None = None, group_size: int | None = None) -> mx.array:
    """Turn stored parts back into a dense tensor (used by tests, verify-like tools and non-matmul consumers)."""
    if encoding == "raw":
        return parts["data"]
    if encoding == "affine":
        return mx.dequantize(parts["weight"], parts["scales"], parts["biases"], group_size=group_size, bits=bits)
    if encoding == "mxfp4":
        return mx.dequantize(parts["weight"], parts["scales"], group_size=group_size, bits=bits, mode="mxfp4",
                             dtype=mx.float32)
    raise PackError(f"unknown tensor encoding {encoding!r}; this moepack knows raw, affine and mxfp4")


def packed_shape(shape: list[int], bits: int, group_size: int) -> dict[str, list[int]]:
    """Shapes of the affine parts of a ``shape`` tensor, known before encoding (for planning file layouts)."""
    *lead, cols = shape
    return {"weight": [*lead, cols * bits // 32], "scales": [*lead, cols // group_size], "biases": [*lead, cols // group_size]}
