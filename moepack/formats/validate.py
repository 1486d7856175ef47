"""Checks on a pack's manifest and file tree, made once at load before anything else uses them (config.json is
checked against the manifest by the reader, ``reader.check_config``, since that needs the architecture table).

Packs are downloaded from strangers, so manifest.json is untrusted input. Every field is type- and range-checked;
every path must stay inside the pack (no absolute paths, no ``..``, no symlink leading out); every blob must lie
within its file and hold exactly ``prod(shape) * itemsize`` bytes of a known dtype; quantized parts must agree
with ``bits`` and ``group_size``; sizes are bounded before anything is allocated from them. A failure is a
PackError naming the field, e.g. ``manifest.json: dense["model.norm.weight"].parts.data.offset: ...``.

One linear pass: a Kimi-K2-sized manifest (60 MoE layers x 384 experts, 23,040 expert files) takes about 0.1 s.
Real file sizes are not stat'ed here (23,040 stats would dominate); the runtime checks each read's length.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable, NoReturn

from moepack.errors import PackError
from moepack.formats import dtypes
from moepack.formats.dtypes import FLOATS
from moepack.formats.manifest import BLOB_ALIGN, FORMAT_NAME, READS_VERSIONS, Table, TensorRecord
from moepack.formats.quant import BITS, GROUP_SIZES, packed_shape

MAX_MANIFEST_BYTES = 32 << 20  # Kimi-K2's is ~5 MB; a bound on what parsing may cost (SPEC section 3)
MANIFEST_BYTES_PER_VALUE = 8  # a manifest moepack writes has ~30 bytes per JSON value; [[],[],...] has 3
MAX_CONFIG_BYTES = 16 << 20
MAX_FILE_BYTES = 1 << 44  # 16 TiB: far above any one pack file
MAX_NDIM = 8
MAX_LAYERS = 4096
MAX_EXPERTS = 1 << 16
MAX_WIDTH = 1 << 24  # hidden size, expert width
MAX_PATH = 1024
MAX_ALIGNMENT = 1 << 21  # 2 MiB: each I/O thread stages one expert file, padded to this
EXPERT_SHAPES = {  # expert tensor -> its shape from (hidden, width); the first three are required
    "gate": lambda h, w: [w, h], "up": lambda h, w: [w, h], "down": lambda h, w: [h, w],
    "gate_bias": lambda h, w: [w], "up_bias": lambda h, w: [w], "down_bias": lambda h, w: [h],
}
REQUIRED_EXPERT_TENSORS = ("gate", "up", "down")
_HEX = "0123456789abcdef"


def _affine_parts(shape: list[int], bits: int, gs: int, dtype: str) -> dict[str, tuple[str, list[int]]]:
    s = packed_shape(shape, bits, gs)
    return {"weight": ("uint32", s["weight"]), "scales": (dtype, s["scales"]), "biases": (dtype, s["biases"])}


def _mxfp4_parts(shape: list[int], bits: int, gs: int, dtype: str) -> dict[str, tuple[str, list[int]]]:
    s = packed_shape(shape, bits, gs)  # affine's, less the biases; the scales are e8m0 bytes
    return {"weight": ("uint32", s["weight"]), "scales": ("uint8", s["scales"])}


@dataclass(frozen=True)
class Encoding:
    """What a tensor encoding allows: its ``bits`` and ``group_size`` values (empty: the encoding has none), the
    record dtypes it allows, and its parts as ``part -> (dtype, shape)`` from (shape, bits, group_size, dtype)."""

    bits: tuple[int, ...]
    group_sizes: tuple[int, ...]
    dtypes: tuple[str, ...]
    parts: Callable[[list[int], int, int, str], dict[str, tuple[str, list[int]]]]


ENCODINGS = {
    "raw": Encoding((), (), tuple(dtypes.BY_NAME), lambda shape, bits, gs, dtype: {"data": (dtype, list(shape))}),
    "affine": Encoding(BITS, GROUP_SIZES, FLOATS, _affine_parts),
    "mxfp4": Encoding((4,), (32,), FLOATS, _mxfp4_parts),
}


# ---- primitives ---------------------------------------------------------------------------------


def _fail(where: str, msg: str) -> NoReturn:
    raise PackError(f"manifest.json: {where}: {msg}")


def show(v: Any) -> str:
    """``v`` for an error message: a pack's own bytes, cut short so a hostile value cannot flood it."""
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _obj(v: Any, where: str, required: tuple[str, ...] = ()) -> dict:
    if type(v) is not dict:
        _fail(where, f"must be an object, not {show(v)}")
    for k in required:
        if k not in v:
            _fail(f"{where}.{k}" if where else k, "is missing")
    return v


def _list(v: Any, where: str) -> list:
    if type(v) is not list:
        _fail(where, f"must be a list, not {show(v)}")
    return v


def _int(v: Any, where: str, lo: int = 0, hi: int = MAX_FILE_BYTES) -> int:
    if type(v) is not int:  # bool is not an int here, nor is 3.0
        _fail(where, f"must be an integer, not {show(v)}")
    if not lo <= v <= hi:
        _fail(where, f"{v} is out of range [{lo}, {hi}]")
    return v


def _str(v: Any, where: str, optional: bool = False) -> str | None:
    if not (isinstance(v, str) or optional and v is None):
        _fail(where, f"must be a string, not {show(v)}")
    return v


def _dtype(v: Any, where: str, allowed: tuple[str, ...] | None = None) -> str:
    if type(v) is not str or v not in dtypes.BY_NAME:
        _fail(where, f"unknown dtype {show(v)}; this moepack knows {sorted(dtypes.BY_NAME)}")
    if allowed is not None and v not in allowed:
        _fail(where, f"dtype {v} is not allowed here (one of {list(allowed)})")
    return v


def _shape(v: Any, where: str) -> list[int]:
    _list(v, where)
    if len(v) > MAX_NDIM:
        _fail(where, f"has {len(v)} dimensions (at most {MAX_NDIM})")
    for i, s in enumerate(v):
        _int(s, f"{where}[{i}]")
    return v


def relpath_problem(rel: Any) -> str | None:
    """Why ``rel`` may not name a file of a pack, or None: it must be a relative POSIX path that stays inside."""
    if type(rel) is not str or not rel:
        return f"{show(rel)} is not a file name"
    if len(rel) > MAX_PATH or "\x00" in rel or "\\" in rel:
        return f"{show(rel)} is not a plain relative path"
    if rel.startswith("/"):
        return f"{show(rel)} is an absolute path (a pack names its files relative to its own directory)"
    wrapped = f"/{rel}/"
    if "//" in wrapped or "/./" in wrapped or "/../" in wrapped:
        return f"{show(rel)} has an empty, '.' or '..' component (a pack may not name files outside itself)"
    return None


# ---- the manifest -------------------------------------------------------------------------------


def check_manifest(d: Any) -> None:
    """Raise PackError at the first field of ``d`` (parsed manifest.json) that a valid pack cannot have."""
    if type(d) is not dict:
        _fail("manifest", f"must be a JSON object, not {show(d)}")
    if d.get("format") != FORMAT_NAME:
        raise PackError(f"not a moepack manifest (format={show(d.get('format'))})")
    version = d.get("format_version")
    if type(version) is not int or version not in READS_VERSIONS:
        raise PackError(
            f"pack format version {show(version)} is not supported by this moepack (reads versions "
            f"{', '.join(map(str, READS_VERSIONS))}); upgrade moepack or re-convert the model"
        )
    _obj(d, "", ("architecture", "alignment", "recipe", "provenance", "files", "dense", "expert_layouts", "experts"))
    align = _int(d["alignment"], "alignment", 4096, MAX_ALIGNMENT)
    if align & (align - 1):
        _fail("alignment", f"{align} is not a power of two")
    a = _architecture(d["architecture"])
    recipe = _obj(d["recipe"], "recipe")
    if "dtype" in recipe:
        _dtype(recipe["dtype"], "recipe.dtype", FLOATS)
    _obj(d["provenance"], "provenance")
    if "extra" in d:
        _obj(d["extra"], "extra")
    files = _files(d["files"])
    for name, rec in _obj(d["dense"], "dense").items():
        _record(rec, f"dense[{json.dumps(name)}]", files=files)
    layouts = {k: _layout(v, f"expert_layouts[{json.dumps(k)}]", align, a)
               for k, v in _obj(d["expert_layouts"], "expert_layouts").items()}
    _experts(d["experts"], a, layouts, files)
    if "tables" in d:
        if version < 2:
            _fail("tables", f"appear in a version {version} manifest; tables are a version 2 addition")
        taken = {e for el in d["experts"] for e in el["files"]} | {b["file"] for r in d["dense"].values()
                                                                     for b in r["parts"].values()}
        for name, t in _obj(d["tables"], "tables").items():
            if name in d["dense"]:
                _fail(f"tables[{json.dumps(name)}]", "is also a dense tensor")
            _table(t, f"tables[{json.dumps(name)}]", align, files, taken)


def _architecture(a: Any) -> dict:
    _obj(a, "architecture", ("family", "model_type", "num_layers", "moe_layers", "num_experts", "top_k"))
    _str(a["family"], "architecture.family")
    _str(a["model_type"], "architecture.model_type", optional=True)
    n = _int(a["num_layers"], "architecture.num_layers", 1, MAX_LAYERS)
    e = _int(a["num_experts"], "architecture.num_experts", 1, MAX_EXPERTS)
    _int(a["top_k"], "architecture.top_k", 1, e)
    moe = _list(a["moe_layers"], "architecture.moe_layers")
    if not moe:
        _fail("architecture.moe_layers", "is empty (a pack holds a Mixture-of-Experts model)")
    for i, L in enumerate(moe):
        _int(L, f"architecture.moe_layers[{i}]", 0, n - 1)
        if i and L <= moe[i - 1]:
            _fail(f"architecture.moe_layers[{i}]", "layers must be listed once each, in increasing order")
    for k in ("hidden_size", "expert_width"):
        if a.get(k) is not None:
            _int(a[k], f"architecture.{k}", 1, MAX_WIDTH)
    if a.get("vocab_size") is not None:
        _int(a["vocab_size"], "architecture.vocab_size", 1, 1 << 31)
    return a


def _files(f: Any) -> dict[str, int]:
    out = {}
    for rel, info in _obj(f, "files").items():
        if problem := relpath_problem(rel):
            _fail(f"files[{json.dumps(rel)}]", problem)
        if type(info) is dict and type(n := info.get("length")) is int and 0 <= n <= MAX_FILE_BYTES and \
                type(h := info.get("blake3")) is str and len(h) == 64 and not h.strip(_HEX):
            out[rel] = n  # the common case, without building field names (23,040 entries for Kimi-K2)
            continue
        where = f"files[{json.dumps(rel)}]"
        _obj(info, where, ("length", "blake3"))
        _int(info["length"], f"{where}.length")
        _fail(f"{where}.blake3", f"{show(info['blake3'])} is not a blake3 digest (64 lowercase hex digits)")
    return out


def _blob(b: Any, where: str, limit: int | None, files: dict[str, int] | None) -> tuple[str, list[int], int]:
    """Check one blob; returns (dtype, shape, end). Dense blobs name a listed file (``files``), expert blobs lie
    within the expert file's ``limit`` bytes and name none."""
    _obj(b, where, ("offset", "length", "dtype", "shape"))
    if files is not None:
        rel = b.get("file")
        if type(rel) is not str or rel not in files:
            _fail(f"{where}.file", f"{show(rel)} is not a file listed in files")
        limit = files[rel]
    elif b.get("file") is not None:
        _fail(f"{where}.file", "blobs of an expert layout lie in each expert's own file and name none")
    else:
        rel = "the expert file"
    off = _int(b["offset"], f"{where}.offset")
    if off % BLOB_ALIGN:
        _fail(f"{where}.offset", f"{off} is not a multiple of {BLOB_ALIGN}")
    n = _int(b["length"], f"{where}.length")
    dt = _dtype(b["dtype"], f"{where}.dtype")
    shape = _shape(b["shape"], f"{where}.shape")
    need = math.prod(shape) * dtypes.BY_NAME[dt].itemsize
    if need != n:
        _fail(f"{where}.length", f"{n} bytes, but shape {shape} of {dt} holds {need}")
    if off + n > limit:
        _fail(f"{where}.offset", f"bytes {off}..{off + n} run past the end of {rel} ({limit} bytes)")
    return dt, shape, off + n


def _record(r: Any, where: str, limit: int | None = None, files: dict[str, int] | None = None) -> tuple[int, int]:
    """Check one tensor record and its parts; returns (first byte, bytes the parts span at 64-byte alignment)."""
    _obj(r, where, ("encoding", "shape", "dtype", "parts"))
    enc_name = r["encoding"]
    enc = ENCODINGS.get(enc_name) if type(enc_name) is str else None
    if enc is None:
        _fail(f"{where}.encoding", f"unknown tensor encoding {show(enc_name)}; this moepack knows {list(ENCODINGS)}")
    shape = _shape(r["shape"], f"{where}.shape")
    dtype = _dtype(r["dtype"], f"{where}.dtype", enc.dtypes)
    bits = gs = 0
    if enc.bits:
        bits, gs = r.get("bits"), r.get("group_size")
        if type(bits) is not int or bits not in enc.bits:
            _fail(f"{where}.bits", f"{show(bits)} is not one of {list(enc.bits)} ({enc_name})")
        if type(gs) is not int or gs not in enc.group_sizes:
            _fail(f"{where}.group_size", f"{show(gs)} is not one of {list(enc.group_sizes)} ({enc_name})")
        if not shape or shape[-1] % gs or shape[-1] * bits % 32:
            _fail(f"{where}.shape", f"{shape} does not split into groups of {gs} and whole 32-bit words of {bits}-bit codes")
    for k in ("source_encoding", "carried"):
        _str(r.get(k), f"{where}.{k}", optional=True)
    expected = enc.parts(shape, bits, gs, dtype)
    parts = _obj(r["parts"], f"{where}.parts")
    if set(parts) != set(expected):
        _fail(f"{where}.parts", f"has {sorted(parts)}; a {enc_name} tensor has {sorted(expected)}")
    start, span = MAX_FILE_BYTES, 0
    for p, (pdt, pshape) in expected.items():
        w = f"{where}.parts.{p}"
        dt, s, _ = _blob(parts[p], w, limit, files)
        if dt != pdt:
            _fail(f"{w}.dtype", f"is {dt}; a {enc_name} tensor of {dtype} {shape} stores {pdt} here")
        if s != pshape:
            _fail(f"{w}.shape", f"is {s}; a {enc_name} tensor of shape {shape} stores {pshape} here")
        start, span = min(start, parts[p]["offset"]), span + _align(parts[p]["length"], BLOB_ALIGN)
    return start, span


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


def _layout(lay: Any, where: str, align: int, a: dict) -> int:
    """Check one expert layout; returns its file length."""
    _obj(lay, where, ("length", "tensors"))
    length = _int(lay["length"], f"{where}.length", 1)
    if length % align:
        _fail(f"{where}.length", f"{length} is not a multiple of the alignment {align}")
    tensors = _obj(lay["tensors"], f"{where}.tensors")
    for t in REQUIRED_EXPERT_TENSORS:
        if t not in tensors:
            _fail(f"{where}.tensors", f"has no {t!r} tensor")
    h, w = a.get("hidden_size"), a.get("expert_width")
    span = 0
    for t, rec in tensors.items():
        tw = f"{where}.tensors[{json.dumps(t)}]"
        if t not in EXPERT_SHAPES:
            _fail(tw, f"is not an expert tensor this moepack knows ({list(EXPERT_SHAPES)})")
        start, n = _record(rec, tw, limit=length)
        if start % align:
            _fail(tw, f"its segment starts at byte {start}, not on an alignment ({align}) boundary")
        span += _align(n, align)
        if h is not None and w is not None and rec["shape"] != EXPERT_SHAPES[t](h, w):
            _fail(f"{tw}.shape", f"is {rec['shape']}, but hidden_size {h} and expert_width {w} make it "
                                 f"{EXPERT_SHAPES[t](h, w)}")
    if length > span:  # aligned segments of 64-byte-aligned arrays need no more: no room for absurd read sizes
        _fail(f"{where}.length", f"{length} bytes, but the expert's tensors need at most {span}")
    return length


def _table(t: Any, where: str, align: int, files: dict[str, int], taken: set[str]) -> None:
    """Check one streamed table (SPEC 3.6): a file of its own whose geometry is exactly the one the spec derives
    from the row record, so no row lies out of its file, crosses a block or costs an absurd read."""
    _obj(t, where, ("file", "rows", "row_bytes", "rows_per_block", "block_bytes", "row"))
    rel = t["file"]
    if type(rel) is not str or rel not in files:
        _fail(f"{where}.file", f"{show(rel)} is not a file listed in files")
    if rel in taken:
        _fail(f"{where}.file", f"{rel} also holds dense tensors, experts or another table")
    taken.add(rel)
    rows = _int(t["rows"], f"{where}.rows", 1, 1 << 40)
    for k in ("row_bytes", "rows_per_block", "block_bytes"):
        _int(t[k], f"{where}.{k}", 1)
    row = _obj(t["row"], f"{where}.row", ("shape",))
    if type(row["shape"]) is not list or len(row["shape"]) != 1:
        _fail(f"{where}.row.shape", f"{show(row['shape'])} is not one row's shape [columns]")
    _int(row["shape"][0], f"{where}.row.shape[0]", 1, MAX_WIDTH)
    start, span = _record(row, f"{where}.row", limit=t["row_bytes"])
    want = Table.layout(rel, rows, TensorRecord.from_json(row), align)
    if start != 0 or t["row_bytes"] != span:
        _fail(f"{where}.row_bytes", f"{t['row_bytes']}, but the row's parts laid out from its start take {span}")
    for k in ("rows_per_block", "block_bytes"):
        if t[k] != getattr(want, k):
            _fail(f"{where}.{k}", f"is {t[k]}; rows of {span} bytes at alignment {align} make it {getattr(want, k)}")
    if files[rel] != want.length:
        _fail(f"{where}.file", f"files[{json.dumps(rel)}].length is {files[rel]}; {rows} rows take {want.length}")


def _experts(ex: Any, a: dict, layouts: dict[str, int], files: dict[str, int]) -> None:
    _list(ex, "experts")
    n, seen_layers, seen_files = a["num_experts"], set(), set()
    for i, e in enumerate(ex):
        where = f"experts[{i}]"
        _obj(e, where, ("layer", "layout", "files"))
        L = _int(e["layer"], f"{where}.layer", 0, a["num_layers"] - 1)
        if L in seen_layers:
            _fail(f"{where}.layer", f"layer {L} is listed twice")
        seen_layers.add(L)
        lay = e["layout"]
        if type(lay) is not str or lay not in layouts:
            _fail(f"{where}.layout", f"{show(lay)} is not one of expert_layouts {sorted(layouts)}")
        length = layouts[lay]
        fl = _list(e["files"], f"{where}.files")
        if len(fl) != n:
            _fail(f"{where}.files", f"lists {len(fl)} files for architecture.num_experts={n} experts")
        for j, rel in enumerate(fl):
            if type(rel) is not str or rel not in files:
                _fail(f"{where}.files[{j}]", f"{show(rel)} is not a file listed in files")
            if rel in seen_files:
                _fail(f"{where}.files[{j}]", f"{rel} is the file of another expert too")
            seen_files.add(rel)
            if files[rel] != length:
                _fail(f"{where}.files[{j}]", f"files[{json.dumps(rel)}].length is {files[rel]}, the layout's {length}")
    if sorted(seen_layers) != a["moe_layers"]:
        _fail("experts", f"covers layers {sorted(seen_layers)}, but architecture.moe_layers is {a['moe_layers']}")
