"""The manifest schema (SPEC.md section "manifest.json"), as dataclasses that round-trip through JSON.

A pack is complete exactly when ``manifest.json`` exists: it is written last, atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moepack.errors import PackError

FORMAT_NAME = "moepack"
FORMAT_VERSION = 2  # the newest version this moepack writes and reads (SPEC section 3, compatibility rule)
READS_VERSIONS = (1, 2)  # readers refuse any other; version 2 added ``tables``
MANIFEST = "manifest.json"
DEFAULT_ALIGNMENT = 16384
BLOB_ALIGN = 64  # SPEC section 2: every array starts on a 64-byte boundary (cache line, SIMD loads)
# The unit a reader reads table rows in (SPEC 6): direct I/O addresses whole logical blocks of the device (512 or
# 4096 bytes), and every pack alignment is a multiple of it, so the pages holding a row are what a miss costs.
READ_PAGE = 4096


@dataclass
class Blob:
    """One contiguous run of bytes holding one array. ``file`` is omitted inside expert layouts."""

    offset: int
    length: int
    dtype: str
    shape: list[int]
    file: str | None = None

    def to_json(self) -> dict:
        d = {"offset": self.offset, "length": self.length, "dtype": self.dtype, "shape": list(self.shape)}
        if self.file is not None:
            d = {"file": self.file, **d}
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Blob":
        return cls(offset=d["offset"], length=d["length"], dtype=d["dtype"], shape=list(d["shape"]), file=d.get("file"))


@dataclass
class TensorRecord:
    """A logical tensor: ``raw`` (one part, ``data``), ``affine`` (parts ``weight``, ``scales``, ``biases``) or
    ``mxfp4`` (parts ``weight``, ``scales``)."""

    encoding: str
    shape: list[int]
    dtype: str  # raw: element dtype; affine: dtype of scales and biases (and of the dequantized tensor)
    parts: dict[str, Blob]
    bits: int | None = None
    group_size: int | None = None
    source_encoding: str | None = None  # how the source stored it (bf16, fp8-block, ...), for provenance
    carried: str | None = None  # quantized sources only: "lossless", "requantized" or "dequantized"

    def to_json(self) -> dict:
        d: dict[str, Any] = {"encoding": self.encoding, "shape": list(self.shape), "dtype": self.dtype}
        if self.encoding != "raw":
            d.update(bits=self.bits, group_size=self.group_size)
        if self.source_encoding:
            d["source_encoding"] = self.source_encoding
        if self.carried:
            d["carried"] = self.carried
        d["parts"] = {k: v.to_json() for k, v in self.parts.items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> "TensorRecord":
        return cls(
            encoding=d["encoding"],
            shape=list(d["shape"]),
            dtype=d["dtype"],
            parts={k: Blob.from_json(v) for k, v in d["parts"].items()},
            bits=d.get("bits"),
            group_size=d.get("group_size"),
            source_encoding=d.get("source_encoding"),
            carried=d.get("carried"),
        )

    @property
    def nbytes(self) -> int:
        return sum(b.length for b in self.parts.values())


@dataclass
class ExpertLayout:
    """Where each tensor of one routed expert sits inside its expert file (all experts of a layer share one)."""

    length: int  # the expert file's size: a multiple of the alignment
    tensors: dict[str, TensorRecord]  # "gate", "up", "down" (+ "gate_bias", ... where the architecture has them)

    def to_json(self) -> dict:
        return {"length": self.length, "tensors": {k: v.to_json() for k, v in self.tensors.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "ExpertLayout":
        return cls(length=d["length"], tensors={k: TensorRecord.from_json(v) for k, v in d["tensors"].items()})


@dataclass
class ExpertLayer:
    layer: int
    layout: str  # key into Manifest.expert_layouts
    files: list[str]  # files[e] is expert e's file

    def to_json(self) -> dict:
        return {"layer": self.layer, "layout": self.layout, "files": self.files}

    @classmethod
    def from_json(cls, d: dict) -> "ExpertLayer":
        return cls(layer=d["layer"], layout=d["layout"], files=list(d["files"]))


def align_up(n: int, a: int) -> int:
    return -(-n // a) * a


@dataclass
class Table:
    """A token-indexed table stored row by row (SPEC section 3.6), so that a step reads only the rows it needs.

    Rows are ``row_bytes`` apart inside blocks of ``block_bytes`` (the row rounded up to the alignment), as many
    rows per block as fit whole: row ``r`` starts at ``(r // rows_per_block) * block_bytes +
    (r % rows_per_block) * row_bytes`` and never crosses a block, so one aligned read of one block holds it.
    """

    file: str
    rows: int
    row: TensorRecord  # one row ([cols]); blob offsets are relative to the row's start and name no file
    row_bytes: int
    rows_per_block: int
    block_bytes: int

    @classmethod
    def layout(cls, file: str, rows: int, row: TensorRecord, alignment: int) -> "Table":
        """The geometry SPEC 3.6 prescribes for ``rows`` rows of ``row`` (its parts at 64-byte multiples)."""
        row_bytes = sum(align_up(b.length, BLOB_ALIGN) for b in row.parts.values())
        block = align_up(row_bytes, alignment)
        return cls(file, rows, row, row_bytes, block // row_bytes, block)

    def block_offset(self, r: int) -> int:
        """Where the block holding row ``r`` starts in the file."""
        return r // self.rows_per_block * self.block_bytes

    def row_offset(self, r: int) -> int:
        """Where row ``r`` starts in the file."""
        return self.block_offset(r) + r % self.rows_per_block * self.row_bytes

    def read_bytes(self, page: int = READ_PAGE) -> int:
        """The most a missing row costs to read: the ``page``-aligned pages holding it, for the worst-placed row."""
        last = min(self.rows_per_block, self.rows)  # the placement repeats block after block (blocks are whole pages)
        return page * max((k * self.row_bytes + self.row_bytes - 1) // page - k * self.row_bytes // page + 1
                          for k in range(last))

    @property
    def length(self) -> int:
        """The table file's length: whole blocks."""
        return -(-self.rows // self.rows_per_block) * self.block_bytes

    @property
    def shape(self) -> list[int]:
        return [self.rows, *self.row.shape]

    def to_json(self) -> dict:
        return {"file": self.file, "rows": self.rows, "row_bytes": self.row_bytes,
                "rows_per_block": self.rows_per_block, "block_bytes": self.block_bytes, "row": self.row.to_json()}

    @classmethod
    def from_json(cls, d: dict) -> "Table":
        return cls(d["file"], d["rows"], TensorRecord.from_json(d["row"]), d["row_bytes"], d["rows_per_block"],
                   d["block_bytes"])


@dataclass
class Manifest:
    architecture: dict  # family, model_type, num_layers, num_experts, top_k, ...
    alignment: int
    recipe: dict
    provenance: dict
    files: dict[str, dict]  # relative path -> {"length", "blake3"}; every file of the pack but the manifest
    dense: dict[str, TensorRecord]
    expert_layouts: dict[str, ExpertLayout]
    experts: list[ExpertLayer]
    format: str = FORMAT_NAME
    format_version: int | None = None  # None: the oldest version that describes the pack
    extra: dict = field(default_factory=dict)
    tables: dict[str, Table] = field(default_factory=dict)  # tensor name -> streamed table (version 2)

    def __post_init__(self) -> None:
        if self.format_version is None:  # a pack without tables stays version 1, which older readers still read
            self.format_version = FORMAT_VERSION if self.tables else 1

    def to_json(self) -> dict:
        return {
            "format": self.format,
            "format_version": self.format_version,
            "architecture": self.architecture,
            "alignment": self.alignment,
            "recipe": self.recipe,
            "provenance": self.provenance,
            "files": self.files,
            "dense": {k: v.to_json() for k, v in self.dense.items()},
            "expert_layouts": {k: v.to_json() for k, v in self.expert_layouts.items()},
            "experts": [e.to_json() for e in self.experts],
            **({"tables": {k: v.to_json() for k, v in self.tables.items()}} if self.tables else {}),
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_json(cls, d: dict) -> "Manifest":
        """Validate (see validate.py: every field, path, bound and size) and build; a bad field is a PackError."""
        from moepack.formats.validate import check_manifest  # validate builds on this module's constants

        check_manifest(d)
        try:
            return cls(
                architecture=d["architecture"],
                alignment=int(d["alignment"]),
                recipe=d["recipe"],
                provenance=d["provenance"],
                files=d["files"],
                dense={k: TensorRecord.from_json(v) for k, v in d["dense"].items()},
                expert_layouts={k: ExpertLayout.from_json(v) for k, v in d["expert_layouts"].items()},
                experts=[ExpertLayer.from_json(e) for e in d["experts"]],
                format_version=d["format_version"],
                extra=d.get("extra", {}),
                tables={k: Table.from_json(v) for k, v in d.get("tables", {}).items()},
            )
        except (KeyError, TypeError, ValueError) as e:
            raise PackError(f"manifest is malformed: {type(e).__name__}: {e}") from e

    @classmethod
    def load(cls, pack: str | os.PathLike) -> "Manifest":
        from moepack.formats.files import parse_json, read_pack_file
        from moepack.formats.validate import MANIFEST_BYTES_PER_VALUE, MAX_MANIFEST_BYTES

        try:
            data = read_pack_file(pack, MANIFEST, MAX_MANIFEST_BYTES)
        except FileNotFoundError:
            raise PackError(not_a_pack(Path(pack))) from None
        return cls.from_json(parse_json(data, Path(pack) / MANIFEST, "manifest",
                                        max_values=len(data) // MANIFEST_BYTES_PER_VALUE + 1024))

    def to_bytes(self) -> bytes:
        """manifest.json's contents."""
        return json.dumps(self.to_json(), indent=1).encode()

    def save(self, pack: str | os.PathLike) -> None:
        """Write manifest.json atomically (temp file, fsync, rename): readers never see half a manifest."""
        path = Path(pack) / MANIFEST
        atomic_write(path, self.to_bytes(), suffix=".tmp")
        fsync_dir(path.parent)


def not_a_pack(path: Path) -> str:
    """Why ``path`` (a directory without manifest.json) is not a pack, and what to do about it."""
    if (path / "config.json").is_file() and (any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json"))):
        return (f"{path} is a Hugging Face checkpoint, not a pack; convert it first: "
                f"moepack convert {path} {path.name}-moepack")
    if (path / ".moepack").is_dir():
        return (f"{path} has no {MANIFEST}: it is an unfinished conversion; re-run the same `moepack convert` "
                "command to finish it")
    return f"{path} has no {MANIFEST}: it is not a pack (make one with `moepack convert CHECKPOINT OUT`)"


def atomic_write(path: Path, data: bytes, suffix: str = ".part") -> None:
    """Write ``data`` to ``path`` so that it appears whole or not at all: temp file, fsync, rename.

    A failed write (a full disk) removes the temp file rather than leave half a file behind.
    """
    tmp = path.with_name(path.name + suffix)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

