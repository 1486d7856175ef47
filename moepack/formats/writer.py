"""Writing pack files: aligned blobs, blake3 while writing, atomic rename so a file exists only when whole."""

from __future__ import annotations

import os
from pathlib import Path

import blake3
import mlx.core as mx
import numpy as np

from moepack.errors import UsageError
from moepack.formats import dtypes
from moepack.formats.manifest import BLOB_ALIGN, Blob, Table, atomic_write

_ZEROS = bytes(1 << 16)


def align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def check_alignment(alignment: int) -> None:
    """Expert files are read with direct I/O, which needs page-multiple offsets and sizes; at most MAX_ALIGNMENT
    (2 MiB, a huge page), since each I/O thread stages a whole expert file padded to it."""
    from moepack.formats.validate import MAX_ALIGNMENT

    if not 4096 <= alignment <= MAX_ALIGNMENT or alignment & (alignment - 1):
        raise UsageError(f"alignment must be a power of two from 4096 to {MAX_ALIGNMENT} bytes, not {alignment}")


class AlignedFile:
    """Sequentially builds one pack file; ``close()`` pads it to the alignment and renames it into place."""

    def __init__(self, root: str | os.PathLike, relpath: str, alignment: int):
        self.root = Path(root)
        self.relpath = relpath
        self.alignment = alignment
        self.path = self.root / relpath
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(self.path.name + ".part")
        self._f = open(self.tmp, "wb")
        self._hash = blake3.blake3()
        self.pos = 0

    def _write(self, data) -> None:
        self._f.write(data)
        self._hash.update(data)
        self.pos += len(data) if isinstance(data, (bytes, bytearray)) else memoryview(data).nbytes

    def write_bytes(self, data) -> None:
        """Append raw bytes at the current position (a table's blocks, laid out by the caller)."""
        self._write(data)

    def pad_to(self, boundary: int) -> None:
        n = align_up(self.pos, boundary) - self.pos
        while n:
            k = min(n, len(_ZEROS))
            self._write(_ZEROS[:k])
            n -= k

    def add(self, a: mx.array, align: int = BLOB_ALIGN, with_file: bool = True) -> Blob:
        self.pad_to(align)
        arr = np.ascontiguousarray(dtypes.to_numpy_bytes(a))
        offset = self.pos
        self._write(memoryview(arr).cast("B"))
        return Blob(
            offset=offset,
            length=arr.nbytes,
            dtype=dtypes.name_of(a.dtype),
            shape=list(a.shape),
            file=self.relpath if with_file else None,
        )

    def close(self) -> dict:
        """Pad, fsync and rename; returns the file's manifest entry ``{"length", "blake3"}``."""
        self.pad_to(self.alignment)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        return {"length": self.pos, "blake3": self._hash.hexdigest()}

    def abort(self) -> None:
        try:
            self._f.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def add_table_rows(f: AlignedFile, table: Table, first: int, parts: dict[str, mx.array]) -> None:
    """Append rows ``first ..`` of ``table`` to its file ``f`` (SPEC 3.6): ``parts[k]`` holds those rows' part ``k``
    [n, ...]. ``first`` must start a block (callers write in chunks of whole blocks); a last block short of rows
    is zero-filled."""
    t = table
    if first % t.rows_per_block or f.pos != t.block_offset(first):
        raise ValueError(f"table rows must be written in order, whole blocks at a time (row {first})")
    n = next(iter(parts.values())).shape[0]
    blocks = -(-n // t.rows_per_block)
    rows = np.zeros((blocks * t.rows_per_block, t.row_bytes), np.uint8)
    for k, b in t.row.parts.items():
        rows[:n, b.offset : b.offset + b.length] = np.ascontiguousarray(dtypes.to_numpy_bytes(parts[k])).view(np.uint8).reshape(n, -1)
    out = np.zeros((blocks, t.block_bytes), np.uint8)
    out[:, : t.rows_per_block * t.row_bytes] = rows.reshape(blocks, -1)
    f.write_bytes(memoryview(out).cast("B"))


def hash_file(path: str | os.PathLike) -> str:
    """blake3 of a whole file, multi-threaded (verify and resume re-hash large files).

    Read in 4 MiB chunks rather than memory-mapped: a map of a multi-GB shard would put all of it in the
    process's resident set; chunked reads hash as fast and hold 4 MiB.
    """
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


class PackWriter:
    """Thin handle on an output directory: creates aligned files and copies side files (config, tokenizer)."""

    def __init__(self, root: str | os.PathLike, alignment: int):
        check_alignment(alignment)
        self.root = Path(root)
        self.alignment = alignment
        self.root.mkdir(parents=True, exist_ok=True)

    def open(self, relpath: str) -> AlignedFile:
        return AlignedFile(self.root, relpath, self.alignment)

    def copy_file(self, src: str | os.PathLike, relpath: str) -> dict:
        data = Path(src).read_bytes()
        return self.write_bytes(relpath, data)

    def write_bytes(self, relpath: str, data: bytes) -> dict:
        atomic_write(self.root / relpath, data)
        return {"length": len(data), "blake3": blake3.blake3(data).hexdigest()}
