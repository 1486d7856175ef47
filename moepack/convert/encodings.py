"""Quantized source encodings: how releases store quantized weights, and how each becomes pack tensors.

A release's quantized weight is several checkpoint tensors (codes plus scales) standing for one logical tensor.
:func:`logical_tensors` groups them under the logical name; :func:`read` reads one logical tensor (or one expert
of a fused one, or a row range) as a :class:`Quantized`; that either repacks into a pack encoding holding exactly
the same numbers (:meth:`Quantized.repack`) or decodes to float32 for the recipe (:meth:`Quantized.decode`).

- FP8 blocks (DeepSeek-V3, Kimi K2, MiniMax-M2): ``X.weight`` F8_E4M3 [out, in] and ``X.weight_scale_inv`` F32
  [ceil(out/128), ceil(in/128)], X = e4m3 * scale per block. Decoded (no pack encoding holds float scales over
  128x128 blocks), then the recipe applies.
- compressed-tensors pack-quantized (Kimi K2-Thinking, K2.5 experts): ``X.weight_packed`` I32 [out, in/8] (codes
  q+8, eight a word, lowest bits first), ``X.weight_scale`` [out, in/32], ``X.weight_shape`` [2]; X = q * s.
  Carried as MLX affine 4-bit group 32 with scale s and bias -8s: the words are MLX's own packing.
- DeepSeek V4's release: ``X.weight`` + ``X.scale`` (e8m0 powers of two): e4m3 dense weights in 128x128 blocks
  (decoded), e2m1 experts two a byte with a scale per 32 (MXFP4, carried as mxfp4).
- MXFP4 (gpt-oss experts): ``X_blocks`` U8 [..., out, in/32, 16] (two e2m1 codes a byte, low nibble first) and
  ``X_scales`` U8 [..., out, in/32] (e8m0); X = e2m1 * 2^(scale - 127). Carried as MLX's mxfp4 (the same bytes;
  every MLX moepack supports has that mode), or decoded for the recipe with ``requantize``.

Each format is a row of :data:`FORMATS`: a class saying which suffixes form a group and how to describe, read,
decode and repack it. Quantized tensors are always stored [out, in] with groups along ``in``, whatever
orientation the family's float checkpoints use.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace

import mlx.core as mx
import numpy as np

from moepack import arch
from moepack.convert.source import Checkpoint, TensorInfo
from moepack.errors import SourceError
from moepack.formats import dtypes, quant

log = logging.getLogger(__name__)


# e2m1 (FP4) codes: sign bit 3, then exponent and mantissa; and the e8m0 scale byte E meaning 2^(E-127) (255: NaN)
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
E8M0 = np.append(np.ldexp(np.float32(1), np.arange(-127, 128)).astype(np.float32), np.float32(np.nan))
# Lossless repacks keep scales in the recipe's dtype when that holds every value of the source's, else the source's.
HOLDS = {("bfloat16", "float32"), ("float16", "float32")}


@dataclass(frozen=True)
class QuantizedTensor:
    """One logical tensor stored quantized: the checkpoint tensors it is made of and what they mean.

    Quacks like :class:`TensorInfo` (``name``, ``file``, ``dtype``, ``shape``, ``nbytes``) so planning code treats
    both alike; ``dtype`` is the source encoding (``fp8-e4m3-block128x128``, ``int4-pack-quantized-g32``, ``mxfp4``).
    """

    name: str  # the logical tensor's name in the pack
    format: str  # key of FORMATS
    dtype: str  # the source encoding, recorded in the pack
    shape: tuple[int, ...]  # the decoded tensor's shape
    parts: dict[str, str]  # role -> checkpoint tensor name
    file: str  # shard of the main part (for messages)
    nbytes: int  # source bytes of all parts
    params: dict = field(default_factory=dict)  # format parameters: bits, group_size, block


@dataclass(frozen=True)
class ShardedTensor:
    """One table a release splits along its rows over several checkpoint tensors (``arch.TABLE_SHARD``), read as the
    concatenation of ``parts`` in order, a row range at a time (never the whole table). Quacks like
    :class:`TensorInfo` as :class:`QuantizedTensor` does."""

    name: str  # the whole table's name in the pack
    parts: tuple[TensorInfo, ...]

    @property
    def file(self) -> str:
        return self.parts[0].file

    @property
    def dtype(self) -> str:
        return self.parts[0].dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (sum(p.shape[0] for p in self.parts), *self.parts[0].shape[1:])

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def read(self, ckpt: Checkpoint, rows: slice | None, cols: slice | None) -> mx.array:
        """Rows ``rows`` (unit step) of the whole table, read from the parts that hold them."""
        start, stop, step = (rows or slice(None)).indices(self.shape[0])
        if step != 1:
            raise SourceError(f"{self.name}: a sharded table is read in row ranges, not every {step}th row")
        pieces, base = [], 0
        for p in self.parts:
            lo, hi = max(start, base), min(stop, base + p.shape[0])
            if lo < hi:
                pieces.append(ckpt.read(p.name, None, slice(lo - base, hi - base), cols))
            base += p.shape[0]
        return mx.concatenate(pieces, axis=0) if len(pieces) > 1 else pieces[0]


def _join_shards(ckpt: Checkpoint, tensors: dict[str, TensorInfo]) -> dict[str, ShardedTensor]:
    """Tables split over ``...shard_K.weight`` tensors (``arch.TABLE_SHARD``) -> one ShardedTensor each; the shards
    must be numbered from 0 without a gap and agree in dtype and row width."""
    groups: dict[str, dict[int, TensorInfo]] = {}
    for name, info in tensors.items():
        if m := arch.TABLE_SHARD.match(name):
            groups.setdefault(m["base"], {})[int(m["part"])] = info
    out = {}
    for base, parts in groups.items():
        if sorted(parts) != list(range(len(parts))):
            raise SourceError(f"{ckpt.root}: {base} has shards {sorted(parts)}, not 0..{len(parts) - 1}; "
                              "is a checkpoint file missing?")
        ordered = tuple(parts[k] for k in range(len(parts)))
        if len({(p.dtype, tuple(p.shape[1:]), len(p.shape)) for p in ordered}) != 1:
            raise SourceError(f"{ckpt.root}: the shards of {base} differ in dtype or row width")
        out[f"{base}.weight"] = ShardedTensor(f"{base}.weight", ordered)
    return out


@dataclass
class Quantized:
    """The stored parts of one quantized tensor (or one expert / row range of it), as read from the checkpoint."""

    source: QuantizedTensor
    parts: dict[str, mx.array]
    shape: tuple[int, ...]
    row_offset: int = 0  # rows into the first scale block (fp8 row ranges that start inside a block)

    @property
    def format(self) -> "Format":
        return FORMATS[self.source.format]

    def decode(self) -> mx.array:
        """The tensor in float32."""
        return self.format.decode(self)

    def repack(self, dtype: str) -> tuple[str, dict[str, mx.array], int, int, str] | None:
        """(encoding, parts, bits, group_size, record dtype) holding exactly the source's numbers, or None."""
        return self.format.repack(self, dtype)


def carry_dtype(source: str, recipe: str) -> str:
    return recipe if recipe == source or (source, recipe) in HOLDS else source


class Format:
    """A quantized source format. Subclasses fill in the class attributes and the four methods."""

    name: str
    marker: str  # suffix only this format's main tensor carries; ``base + marker`` identifies a group
    marker_dtype: str | None = None  # and the dtype it must have, where the suffix alone could be a float tensor's
    roles: dict[str, str]  # role -> suffix after the base name
    logical: str  # suffix of the logical tensor's name after the base name
    optional: tuple[str, ...] = ()  # roles that may be absent
    rowwise: tuple[str, ...] = ()  # roles whose leading axes are the tensor's (read with index / rows)

    def describe(self, ckpt: Checkpoint, parts: dict[str, TensorInfo], cfg: dict) -> tuple[str, tuple[int, ...], dict]:
        """(source encoding label, decoded shape, params), or SourceError when the group is inconsistent."""
        raise NotImplementedError

    def read(self, ckpt: Checkpoint, t: QuantizedTensor, index: int | None, rows: slice | None) -> Quantized:
        parts = {r: ckpt.read(t.parts[r], index, rows) for r in self.rowwise}
        return Quantized(t, parts, _sliced(t.shape, index, rows))

    def decode(self, q: Quantized) -> mx.array:
        raise NotImplementedError

    def repack(self, q: Quantized, dtype: str) -> tuple | None:
        return None


def _sliced(shape: tuple[int, ...], index: int | None, rows: slice | None) -> tuple[int, ...]:
    s = list(shape[1:] if index is not None else shape)
    if rows is not None:
        s[0] = len(range(rows.start, rows.stop, rows.step or 1))
    return tuple(s)


def _fail(ckpt: Checkpoint, info: TensorInfo, msg: str) -> SourceError:
    return SourceError(f"{ckpt.root / info.file}: {info.name} {msg}")


class FP8Block(Format):
    """DeepSeek-V3 / Kimi K2 / MiniMax-M2 FP8: e4m3 codes times one float32 scale per 128x128 block (edge blocks
    padded). No pack encoding holds arbitrary float scales over 128x128 blocks, so it is decoded for the recipe."""

    name = "fp8"
    marker = ".weight_scale_inv"
    roles = {"weight": ".weight", "scale_inv": ".weight_scale_inv"}
    logical = ".weight"
    rowwise = ("weight",)

    def describe(self, ckpt, parts, cfg):
        w, s = parts["weight"], parts["scale_inv"]
        if w.dtype != "float8_e4m3":
            raise _fail(ckpt, w, f"has dtype {w.dtype} next to a weight_scale_inv; moepack decodes float8_e4m3 blocks")
        block = tuple((cfg.get("quantization_config") or {}).get("weight_block_size") or (128, 128))
        if len(w.shape) < 2:
            raise _fail(ckpt, w, f"has shape {w.shape}; FP8 block scales need a matrix")
        lead, (rows, cols) = w.shape[:-2], w.shape[-2:]
        want = (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))
        if tuple(s.shape) != want:
            raise _fail(ckpt, s, f"has shape {s.shape}; {block[0]}x{block[1]} blocks of {w.shape} need {want}")
        return f"fp8-e4m3-block{block[0]}x{block[1]}", tuple(w.shape), {"block": block}

    def read(self, ckpt, t, index, rows):
        bo = t.params["block"][0]
        if rows is not None and (rows.step or 1) != 1:
            raise SourceError(f"{t.name}: a strided row selection of an FP8 tensor is not supported")
        w = ckpt.read(t.parts["weight"], index, rows)
        srows = None if rows is None else slice(rows.start // bo, -(-rows.stop // bo))
        s = ckpt.read(t.parts["scale_inv"], index, srows)
        return Quantized(t, {"weight": w, "scale_inv": s}, tuple(w.shape), 0 if rows is None else rows.start % bo)

    def decode(self, q):
        bo, bi = q.source.params["block"]
        v = mx.from_fp8(q.parts["weight"], dtype=mx.float32)  # [R, C]; bit-identical to torch's float8_e4m3fn
        s = q.parts["scale_inv"].astype(mx.float32)  # [ceil, ceil] blocks covering them
        R, C = v.shape
        off = q.row_offset
        so, si = s.shape
        v = mx.pad(v, [(off, so * bo - off - R), (0, si * bi - C)])  # whole blocks
        v = (v.reshape(so, bo, si, bi) * s[:, None, :, None]).reshape(so * bo, si * bi)
        return v[off : off + R, :C]


class PackQuantized(Format):
    """compressed-tensors ``pack-quantized`` symmetric integers (Kimi K2-Thinking, K2.5 experts: 4-bit, group 32).

    Word j of a row holds elements ``pf*j .. pf*j+pf-1`` at bits ``bits*i``, each as the unsigned code q + 2^(bits-1);
    that is MLX affine's own packing, so the words are carried unchanged with scale s and bias -2^(bits-1) s:
    ``code*s - 2^(bits-1)*s == q*s`` exactly in float32 for the bf16/f16 scales releases ship (both products
    are exact, and so is their difference).
    """

    name = "pack-quantized"
    marker = ".weight_packed"
    roles = {"packed": ".weight_packed", "scale": ".weight_scale", "shape": ".weight_shape",
             "zero_point": ".weight_zero_point"}
    logical = ".weight"
    optional = ("shape", "zero_point")
    rowwise = ("packed", "scale")

    def describe(self, ckpt, parts, cfg):
        p, s = parts["packed"], parts["scale"]
        if "zero_point" in parts:
            raise _fail(ckpt, parts["zero_point"], "is asymmetric (has a zero point); moepack reads symmetric "
                        "pack-quantized tensors")
        if p.dtype != "int32" or len(p.shape) != 2 or len(s.shape) != 2 or s.shape[0] != p.shape[0] or \
                s.dtype not in dtypes.FLOATS:
            raise _fail(ckpt, p, f"({p.dtype} {p.shape}, scale {s.dtype} {s.shape}) is not a pack-quantized int32 "
                        "[out, in/pf] tensor with a float [out, groups] scale")
        if "shape" in parts:
            rows, cols = (int(x) for x in np.array(ckpt.read(parts["shape"].name)).reshape(-1)[:2])
        else:
            rows, cols = p.shape[0], p.shape[1] * 8
        bits = next((b for b in (4, 8, 2) if math.ceil(cols / (32 // b)) == p.shape[1]), None)
        if rows != p.shape[0] or bits is None or cols % s.shape[1]:
            raise _fail(ckpt, p, f"of shape {p.shape} with scale {s.shape} cannot hold a [{rows}, {cols}] weight")
        gs = cols // s.shape[1]
        return f"int{bits}-pack-quantized-g{gs}", (rows, cols), {"bits": bits, "group_size": gs, "scale": s.dtype}

    def decode(self, q):
        bits, gs = q.source.params["bits"], q.source.params["group_size"]
        cols = q.shape[-1]
        codes = unpack_bits(q.parts["packed"].view(mx.uint32), bits)[..., :cols]
        s = mx.repeat(q.parts["scale"].astype(mx.float32), gs, axis=-1)[..., :cols]
        return (codes.astype(mx.float32) - 2 ** (bits - 1)) * s

    def repack(self, q, dtype):
        bits, gs = q.source.params["bits"], q.source.params["group_size"]
        if bits not in quant.BITS or gs not in quant.GROUP_SIZES or q.shape[-1] % (32 // bits) or q.shape[-1] % gs:
            return None
        d = carry_dtype(q.source.params["scale"], dtype)
        s = q.parts["scale"].astype(dtypes.get(d).mlx)
        return "affine", {"weight": q.parts["packed"].view(mx.uint32), "scales": s,
                          "biases": s * -(2 ** (bits - 1))}, bits, gs, d


class MXFP4(Format):
    """OCP MXFP4 as gpt-oss ships its experts: groups of 32 e2m1 codes sharing one e8m0 power-of-two scale.
    Byte k of a group holds elements 2k (low nibble) and 2k+1: read as little-endian uint32 words that is MLX's
    mxfp4 packing, and the scale bytes are MLX's too, so both are carried unchanged."""

    name = "mxfp4"
    marker = "_blocks"
    marker_dtype = "uint8"
    roles = {"blocks": "_blocks", "scales": "_scales"}
    logical = ""
    rowwise = ("blocks", "scales")

    def describe(self, ckpt, parts, cfg):
        b, s = parts["blocks"], parts["scales"]
        if b.dtype != "uint8" or s.dtype != "uint8" or len(b.shape) < 3 or b.shape[-1] != 16 or \
                tuple(b.shape[:-1]) != tuple(s.shape):
            raise _fail(ckpt, b, f"({b.dtype} {b.shape}, scales {s.dtype} {s.shape}) is not MXFP4 blocks "
                        "[..., rows, groups, 16] with uint8 scales [..., rows, groups]")
        return "mxfp4", (*b.shape[:-2], b.shape[-2] * 32), {"bits": 4, "group_size": 32}

    def decode(self, q):
        codes = unpack_bits(q.parts["blocks"].reshape(*q.shape[:-1], -1), 4)  # [..., R, C]
        v = mx.take(mx.array(E2M1), codes)
        scale = mx.take(mx.array(E8M0), q.parts["scales"].astype(mx.uint32))  # [..., R, C/32]
        return v * mx.repeat(scale, 32, axis=-1)

    def repack(self, q, dtype):
        w = q.parts["blocks"].reshape(*q.shape[:-1], -1).view(mx.uint32)  # [..., R, C/8]
        return "mxfp4", {"weight": w, "scales": q.parts["scales"]}, 4, 32, dtype


class E8M0Scaled(Format):
    """DeepSeek V4's release: ``X.weight`` with ``X.scale`` (F8_E8M0 bytes E meaning 2^(E-127)), two kinds by the
    weight's dtype. Dense weights: F8_E4M3 [out, in], one scale per 128x128 block; decoded as :class:`FP8Block`
    (then the recipe applies). Routed experts: e2m1 codes two a byte, low nibble first (I8 [out, in/2]), one scale
    per 32 along a row: MXFP4, carried as MLX's mxfp4 like gpt-oss's experts."""

    name = "e8m0-scaled"
    marker = ".scale"
    marker_dtype = "float8_e8m0"
    roles = {"weight": ".weight", "scale_inv": ".scale"}
    logical = ".weight"
    rowwise = ("weight", "scale_inv")

    def describe(self, ckpt, parts, cfg):
        w, s = parts["weight"], parts["scale_inv"]
        if w.dtype == "float8_e4m3":
            label, shape, params = FORMATS["fp8"].describe(ckpt, parts, cfg)
            return label + "-e8m0", shape, {**params, "kind": "fp8"}
        if w.dtype in ("int8", "uint8") and len(w.shape) >= 2 and tuple(s.shape) == (*w.shape[:-1], w.shape[-1] // 16):
            return "fp4-e2m1-g32-e8m0", (*w.shape[:-1], 2 * w.shape[-1]), {"kind": "fp4", "bits": 4, "group_size": 32}
        raise _fail(ckpt, w, f"({w.dtype} {w.shape}, scale {s.dtype} {s.shape}) is neither float8_e4m3 with 128x128 "
                    "block scales nor FP4 (int8 [out, in/2]) with one scale per 32")

    def read(self, ckpt, t, index, rows):
        if t.params["kind"] == "fp4":
            return super().read(ckpt, t, index, rows)
        q = FORMATS["fp8"].read(ckpt, t, index, rows)
        return replace(q, parts={**q.parts, "scale_inv": mx.take(mx.array(E8M0), q.parts["scale_inv"].astype(mx.uint32))})

    def _mxfp4(self, q: Quantized) -> Quantized:
        return replace(q, parts={"blocks": q.parts["weight"].view(mx.uint8), "scales": q.parts["scale_inv"]})

    def decode(self, q):
        return FORMATS["fp8"].decode(q) if q.source.params["kind"] == "fp8" else FORMATS["mxfp4"].decode(self._mxfp4(q))

    def repack(self, q, dtype):
        return None if q.source.params["kind"] == "fp8" else FORMATS["mxfp4"].repack(self._mxfp4(q), dtype)


FORMATS: dict[str, Format] = {f.name: f for f in (FP8Block(), PackQuantized(), MXFP4(), E8M0Scaled())}


def unpack_bits(words: mx.array, bits: int) -> mx.array:
    """[..., W] words (uint8 or uint32) -> [..., W * width/bits] codes, the lowest bits first."""
    per = words.dtype.size * 8 // bits
    shifts = mx.arange(per, dtype=words.dtype) * bits
    codes = (words[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*words.shape[:-1], -1).astype(mx.uint32)


# ---------------------------------------------------------------------------------------------


def logical_tensors(ckpt: Checkpoint) -> dict[str, TensorInfo | QuantizedTensor]:
    """Every logical tensor of ``ckpt`` under its pack name: quantized ones grouped with their companions, the
    rest as they are (``TensorInfo.name`` stays the checkpoint's), tables split over shards joined
    (:class:`ShardedTensor`), all renamed from a multimodal wrapper's
    prefixes to the text model's (``arch.text_name``). Vision towers are kept here, with a notice; the planner
    drops them."""
    cfg = arch.text_config(ckpt.config)
    out: dict[str, TensorInfo | QuantizedTensor] = {}
    used: set[str] = set()
    for fmt in FORMATS.values():
        for name in ckpt.tensors:
            if not name.endswith(fmt.marker) or fmt.marker_dtype not in (None, ckpt.tensors[name].dtype):
                continue
            base = name[: -len(fmt.marker)]
            parts = {r: ckpt.tensors.get(base + sfx) for r, sfx in fmt.roles.items()}
            missing = [base + fmt.roles[r] for r, i in parts.items() if i is None and r not in fmt.optional]
            if missing:
                raise SourceError(f"{ckpt.root}: {name} has no {', '.join(missing)}; is a shard missing?")
            parts = {r: i for r, i in parts.items() if i is not None}
            label, shape, params = fmt.describe(ckpt, parts, cfg)
            logical = base + fmt.logical
            out[logical] = QuantizedTensor(logical, fmt.name, label, shape, {r: i.name for r, i in parts.items()},
                                           parts[next(iter(fmt.roles))].file, sum(i.nbytes for i in parts.values()),
                                           params)
            used.update(i.name for i in parts.values())
    for name, info in ckpt.tensors.items():
        if name not in used and name not in out and not arch.TABLE_SHARD.match(name):
            out[name] = info
    out.update(_join_shards(ckpt, ckpt.tensors))
    vision = sorted({m[0].rstrip(".") for n in out if (m := arch.VISION.match(n))})
    if vision:  # the planner drops them (arch.SKIPPED)
        log.warning("leaving out %s: moepack converts and runs the text model only", ", ".join(vision))
    renamed = {arch.text_name(n, ckpt.config): t for n, t in out.items()}
    return {n: replace(t, name=n) if isinstance(t, QuantizedTensor) and t.name != n else t for n, t in renamed.items()}


def is_quantized(t: TensorInfo | QuantizedTensor | ShardedTensor) -> bool:
    return isinstance(t, QuantizedTensor)


def read(ckpt: Checkpoint, t: TensorInfo | QuantizedTensor | ShardedTensor, index: int | None = None,
         rows: slice | None = None, cols: slice | None = None) -> mx.array | Quantized:
    """A plain tensor as an MLX array (as ``Checkpoint.read``), a quantized one as :class:`Quantized`."""
    if isinstance(t, TensorInfo):
        return ckpt.read(t.name, index, rows, cols)
    if isinstance(t, ShardedTensor):
        if index is not None:
            raise SourceError(f"{t.name}: a sharded table has no expert axis")
        return t.read(ckpt, rows, cols)
    if cols is not None:
        raise SourceError(f"{t.name}: quantized tensors are stored [out, in]; a column selection is not supported")
    return FORMATS[t.format].read(ckpt, t, index, rows)
