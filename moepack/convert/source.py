"""Source checkpoints: a local Hugging Face directory or a hub repo id, read tensor by tensor.

Tensors are read through safetensors' lazy slices into MLX arrays, so the converter never holds a shard,
only the tensor (or the one expert of a fused tensor) it is working on.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from moepack.errors import PackError, SourceError
from moepack.formats import dtypes
from moepack.formats.files import open_regular, parse_json
from moepack.formats.validate import relpath_problem

log = logging.getLogger(__name__)

WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
SIDE_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "tiktoken.model",
    "vocab.json",
    "merges.txt",
]
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit


def resolve(src: str, revision: str | None = None) -> tuple[Path, dict]:
    """A local directory, or a hub repo id fetched (or found in the hub cache) with huggingface_hub."""
    p = Path(src).expanduser()
    if p.is_dir():
        return p, {"source": str(p.resolve()), "revision": revision}
    if p.exists() or src.startswith((".", "/", "~")) or src.count("/") != 1:
        raise SourceError(f"{src}: not a checkpoint directory (and not a hub repo id of the form owner/name)")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(src, revision=revision, allow_patterns=WEIGHT_PATTERNS + SIDE_FILES)
    except Exception as e:  # network, auth, offline-without-cache: all end the same way for the user
        raise SourceError(
            f"could not fetch {src} from the Hugging Face hub ({type(e).__name__}: {e}); "
            "check the repo id, your network or HF_TOKEN, or download it and pass the directory"
        ) from e
    return Path(local), {"source": src, "revision": revision or Path(local).name}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str  # shard file name, relative to the checkpoint directory
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0  # absolute byte offset of the tensor's data in its shard

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * dtypes.SOURCE[self.dtype].itemsize


class Checkpoint:
    """The tensors and config of a Hugging Face checkpoint directory, indexed from shard headers only."""

    transient = False  # shards deleted while converting (a streamed source): descriptors are not kept

    def __init__(self, root: Path, config: dict | None = None, tensors: dict[str, TensorInfo] | None = None):
        """``config`` and ``tensors`` (from headers read elsewhere, e.g. over HTTP) stand in for reading them from
        ``root``, whose shards may then arrive later (a streamed conversion)."""
        self.root = Path(root)
        self._fds: dict[str, int] = {}  # one read-only descriptor per shard, for pread
        if tensors is not None:
            self.config, self.tensors = config, tensors
            self.shards = sorted({t.file for t in tensors.values()})
            return
        cfg_path = self.root / "config.json"
        if not cfg_path.is_file():
            raise SourceError(f"{self.root}: no config.json; is this a Hugging Face checkpoint directory?")
        self.config = _json_file(cfg_path, "config")
        if type(self.config) is not dict:
            raise SourceError(f"{cfg_path}: must be a JSON object, not {type(self.config).__name__}")
        from moepack import arch

        if problem := arch.config_problem(arch.text_config(self.config)):
            raise SourceError(f"{cfg_path}: {problem}")
        self.shards = self._shard_files()
        self.tensors: dict[str, TensorInfo] = {}
        for shard in self.shards:
            for info in self._read_header(shard):
                if info.name in self.tensors:
                    raise SourceError(f"{shard}: tensor {info.name} also appears in {self.tensors[info.name].file}")
                self.tensors[info.name] = info

    def __getstate__(self) -> dict:  # sent to worker processes: descriptors stay behind
        return {**self.__dict__, "_fds": {}}

    def _shard_files(self) -> list[str]:
        index = sorted(self.root.glob("*.safetensors.index.json"))
        if index:
            d = _json_file(index[0], "safetensors index")
            weight_map = d.get("weight_map") if type(d) is dict else None
            if type(weight_map) is not dict or not all(type(v) is str for v in weight_map.values()):
                raise SourceError(f"{index[0]}: not a safetensors index (it needs a \"weight_map\" object of tensor "
                                  "name -> shard file name)")
            shards = sorted(set(weight_map.values()))
            for s in shards:  # checked before anything is opened: an index may only name files beside it
                if (problem := relpath_problem(s)) or "/" in s:
                    raise SourceError(f"{index[0]}: shard {problem or repr(s) + ' is in another directory'}; an "
                                      "index names shard files of its own directory")
            missing = [s for s in shards if not (self.root / s).is_file()]
            if missing:
                raise SourceError(f"{self.root}: shard file(s) named by {index[0].name} are missing: {', '.join(missing)}")
            return shards
        shards = sorted(p.name for p in self.root.glob("*.safetensors"))
        if not shards:
            raise SourceError(f"{self.root}: no *.safetensors files (moepack reads safetensors checkpoints)")
        return shards

    def _read_header(self, shard: str) -> list[TensorInfo]:
        """Parse a safetensors header (8-byte little-endian length, then JSON) and check it against the file size.

        Read directly rather than through ``safetensors.safe_open``: its numpy/mlx slicing cannot return bfloat16,
        and reading raw bytes lets every source encoding (bf16, FP8, packed INT4) come through the same path.
        """
        path = self.root / shard
        try:
            fd = open_regular(path)  # a FIFO named *.safetensors is refused here, not read forever
        except (OSError, PackError) as e:  # a symlink loop (ELOOP), permissions, a FIFO
            raise SourceError(f"{path}: cannot open it ({getattr(e, 'strerror', None) or e})") from None
        try:
            with os.fdopen(fd, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                n = int.from_bytes(f.read(8), "little")
                check_header_length(n, size)
                raw = f.read(n)
        except (OSError, ValueError) as e:
            raise SourceError(f"{path}: cannot read safetensors header ({e}); the file is truncated or corrupt") from e
        return parse_header(shard, raw, size, str(path))

    def read(self, name: str, index: int | None = None, rows: slice | None = None, cols: slice | None = None) -> mx.array:
        """Read one tensor, or ``[index]`` of its first axis (one expert of a fused tensor), optionally a row range
        and a column selection. Slices may step (gpt-oss interleaves gate and up): the covered rows are read whole.

        Only the requested bytes are read, so a fused [E, 2I, H] tensor costs one expert's bytes. They are read with
        ``pread`` into a private buffer rather than through a memory map: a map would keep every page touched so far
        in the process's resident set, which grows to the size of the checkpoint over a conversion.
        """
        info = self.tensors[name]
        path = self.root / info.file
        storage = dtypes.SOURCE[info.dtype].numpy
        start, shape = locate(info, index, rows)
        try:
            count = int(np.prod(shape, dtype=np.int64))
            raw = self.read_bytes(info.file, start, count * storage.itemsize).view(storage).reshape(shape)
            if rows is not None and rows.step not in (None, 1):
                raw = np.ascontiguousarray(raw[:: rows.step])
            if cols is not None:
                raw = np.ascontiguousarray(raw[:, cols])
        except (OSError, ValueError, PackError) as e:
            raise SourceError(f"{path}: reading {name} failed ({e}); the shard may be truncated or corrupt") from e
        a = mx.array(raw)
        return a.view(mx.bfloat16) if info.dtype == "bfloat16" else a

    def read_bytes(self, file: str, start: int, n: int) -> np.ndarray:
        """``n`` bytes of shard ``file`` at ``start`` (overridden to read a shard that is not here)."""
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = open_regular(self.root / file)  # a FIFO is refused, not read forever
        return _pread(fd, start, n)

    def close(self, file: str) -> None:
        """Close ``file``'s descriptor (before the shard is deleted)."""
        if (fd := self._fds.pop(file, None)) is not None:
            os.close(fd)

    def side_files(self) -> list[str]:
        return [n for n in SIDE_FILES if (self.root / n).is_file()]

    def source_files(self) -> list[str]:
        return [*self.shards, *sorted(p.name for p in self.root.glob("*.safetensors.index.json"))]

    def file_path(self, name: str) -> Path:
        return self.root / name


MAX_JSON_BYTES = 64 << 20  # config.json, an index (DeepSeek-V3's is ~9 MB)


def _json_file(path: Path, what: str):
    """A JSON file of the checkpoint as a regular file of bounded size; anything wrong is a SourceError."""
    try:
        fd = open_regular(path)
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except (OSError, PackError) as e:
        raise SourceError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if len(data) > MAX_JSON_BYTES:
        raise SourceError(f"{path}: over {MAX_JSON_BYTES >> 20} MiB, far larger than a {what} file")
    try:
        return parse_json(data, path, what)
    except PackError as e:
        raise SourceError(str(e)) from None


def locate(info: TensorInfo, index: int | None, rows: slice | None) -> tuple[int, list[int]]:
    """(absolute byte offset, shape) of ``info[index]`` (one expert of a fused tensor) and of its row range
    ``rows.start:rows.stop`` (a step is applied after reading the covered rows)."""
    item = dtypes.SOURCE[info.dtype].itemsize
    shape, start = list(info.shape), info.offset
    if index is not None:
        start += index * int(np.prod(shape[1:], dtype=np.int64)) * item
        shape = shape[1:]
    if rows is not None:
        start += rows.start * int(np.prod(shape[1:], dtype=np.int64)) * item
        shape = [rows.stop - rows.start, *shape[1:]]
    return start, shape


def check_header_length(n: int, size: int) -> None:
    if n <= 0 or 8 + n > size or n > MAX_HEADER_BYTES:
        raise ValueError(f"header length {n} does not fit in a file of {size} bytes")


def parse_header(shard: str, raw: bytes, size: int, path: str) -> list[TensorInfo]:
    """The tensors a safetensors header (``raw``: the JSON after the 8-byte length) describes, checked against the
    shard's ``size``; ``path`` names the shard in messages (a file, or a URL before it is downloaded)."""
    n = len(raw)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise SourceError(f"{path}: cannot read safetensors header ({e}); the file is truncated or corrupt") from e
    if type(header) is not dict:
        raise SourceError(f"{path}: the safetensors header is not a JSON object; the file is corrupt")
    base = 8 + n
    out = []
    for k, v in header.items():
        if k == "__metadata__":
            continue
        d = dtypes.BY_SAFETENSORS.get(v.get("dtype")) if type(v) is dict and type(v.get("dtype")) is str else None
        if d is None:
            raise SourceError(f"{path}: tensor {k} has dtype {v.get('dtype') if type(v) is dict else v!r} "
                              "that moepack cannot read")
        shape, offsets = v.get("shape"), v.get("data_offsets")
        if type(shape) is not list or len(shape) > 8 or any(type(d) is not int or d < 0 for d in shape):
            raise SourceError(f"{path}: tensor {k} has shape {shape!r}, not a list of non-negative integers")
        if type(offsets) is not list or len(offsets) != 2 or any(type(o) is not int for o in offsets) or \
                not 0 <= offsets[0] <= offsets[1]:
            raise SourceError(f"{path}: tensor {k} has data_offsets {offsets!r}, not [begin, end] with "
                              "0 <= begin <= end; the file is corrupt")
        begin, end = offsets
        if base + end > size:
            raise SourceError(f"{path}: tensor {k} ends at byte {base + end} but the file has {size} bytes; "
                              "the shard is truncated (re-download it)")
        info = TensorInfo(k, shard, d.name, tuple(shape), base + begin)
        if info.nbytes != end - begin:
            raise SourceError(f"{path}: tensor {k} has {end - begin} bytes for shape {info.shape} of {d.name}")
        out.append(info)
    return out


def _pread(fd: int, offset: int, n: int) -> np.ndarray:
    """Exactly ``n`` bytes at ``offset`` (a read returns at most ~2 GiB, so loop); short means truncated."""
    buf = np.empty(n, np.uint8)
    view, done = memoryview(buf), 0
    while done < n:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise ValueError(f"file ends at byte {offset + done}, {n - done} bytes short of the tensor's end")
        done += got
    return buf


def file_fingerprint(path: Path) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
