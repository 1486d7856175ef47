"""The pack a conversion would write, predicted from shard headers alone: every file's size byte for byte.

Each unit runs through the converter's own code (``pipeline.write_unit``) on lazy MLX zeros of the source shapes
(:class:`ShapeCheckpoint`) into a file that only counts bytes (:class:`SizeFile`), so sizes cannot drift from what
``convert`` writes. Experts whose sources look alike are sized once.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from moepack.convert.recipe import Recipe
from moepack.convert.source import Checkpoint, locate
from moepack.convert.units import Unit, plan_units
from moepack.errors import MoepackError
from moepack.units import human_bytes
from moepack.formats import dtypes
from moepack.formats.manifest import BLOB_ALIGN, Blob, Manifest
from moepack.formats.writer import align_up

log = logging.getLogger(__name__)


class DiskSpaceError(MoepackError):
    """The disk under OUT cannot hold what the chosen conversion mode needs."""


NO_HASH = "0" * 64  # a blake3 hex digest's length: a predicted manifest is as long as the real one


class ShapeCheckpoint(Checkpoint):
    """A checkpoint whose reads are lazy zeros of the right shape and dtype: nothing is read or computed."""

    def __init__(self, ckpt: Checkpoint):
        super().__init__(ckpt.root, ckpt.config, ckpt.tensors)

    def read(self, name: str, index: int | None = None, rows: slice | None = None, cols: slice | None = None) -> mx.array:
        info = self.tensors[name]
        storage = dtypes.SOURCE[info.dtype].numpy
        view = np.broadcast_to(np.zeros((), storage), locate(info, index, rows)[1])  # no memory: stride 0
        if rows is not None and rows.step not in (None, 1):
            view = view[:: rows.step]
        if cols is not None:
            view = view[:, cols]
        return mx.zeros(view.shape, mx.bfloat16 if info.dtype == "bfloat16" else mx.array(np.zeros(1, storage)).dtype)


class SizeFile:
    """AlignedFile's interface, counting bytes instead of writing them."""

    def __init__(self, relpath: str, alignment: int):
        self.relpath, self.alignment, self.pos = relpath, alignment, 0

    def pad_to(self, boundary: int) -> None:
        self.pos = align_up(self.pos, boundary)

    def add(self, a: mx.array, align: int = BLOB_ALIGN, with_file: bool = True) -> Blob:
        self.pad_to(align)
        blob = Blob(self.pos, a.nbytes, dtypes.name_of(a.dtype), list(a.shape), self.relpath if with_file else None)
        self.pos += a.nbytes
        return blob

    def close(self) -> dict:
        self.pad_to(self.alignment)
        return {"length": self.pos, "blake3": NO_HASH}

    def abort(self) -> None:
        pass


def _expert_key(u: Unit) -> tuple:
    """What an expert file's layout depends on: each projection's read and its source's dtype and shape."""
    return tuple(sorted((p, r.index is None, r.sel, r.axis, r.transpose, u.payload["sources"][r.name].dtype,
                         u.payload["sources"][r.name].shape) for p, r in u.payload["projs"].items()))


def size_units(ckpt: Checkpoint, recipe: Recipe, units: list[Unit], sizes: dict[str, int]) -> dict[str, dict]:
    """What ``convert`` records of each unit (as ``run_unit`` returns it), hashes left as zeros; ``sizes``: each
    source file's size in bytes."""
    from moepack.convert.pipeline import write_unit

    shapes = ShapeCheckpoint(ckpt)
    results: dict[str, dict] = {}
    seen: dict[tuple, dict] = {}
    for u in units:
        if u.kind == "hash":
            results[u.id] = {"source_hash": {u.payload["file"]: {"size": sizes[u.payload["file"]], "blake3": NO_HASH}}}
            continue
        key = _expert_key(u) if u.kind == "expert" else None
        if key is not None and key in seen:
            r = seen[key]
            results[u.id] = {**r, "files": {u.payload["file"]: next(iter(r["files"].values()))}}
            continue
        results[u.id] = write_unit(shapes, recipe, u, SizeFile(u.payload["file"], recipe.alignment))
        if key is not None:
            seen[key] = results[u.id]
    return results


def predict(ckpt: Checkpoint, recipe: Recipe, provenance: dict, sizes: dict[str, int]) -> Manifest:
    """The manifest ``convert`` would write (hashes zeroed), every file's length exact; ``sizes``: of every source
    and side file by name."""
    from moepack.convert.pipeline import assemble

    units, architecture = plan_units(ckpt, recipe)
    results = size_units(ckpt, recipe, units, sizes)
    side = {n: {"length": sizes[n], "blake3": NO_HASH} for n in ckpt.side_files()}
    return assemble(recipe, architecture, provenance, units, results, side)


def pack_bytes(manifest: Manifest) -> int:
    """Everything a pack holds: its files and manifest.json."""
    return sum(e["length"] for e in manifest.files.values()) + len(manifest.to_bytes())


# ---------------------------------------------------------------------------------------------
# disk: what a conversion needs, with and without streaming


def stream_peak(ckpt: Checkpoint, units: list[Unit], sizes: dict[str, int], window: int) -> int:
    """Most source bytes a streamed conversion holds at once: the ``window`` shards it fetches ahead, plus earlier
    shards a unit still needs because its other tensors lie in a later shard."""
    shards = ckpt.shards
    pos = {s: i for i, s in enumerate(shards)}
    last_needed = {s: i for i, s in enumerate(shards)}  # shard -> index of the last shard a unit reading it needs
    for u in units:
        idx = [pos[f] for f in u.reads if f in pos]
        for i in idx:
            last_needed[shards[i]] = max(last_needed[shards[i]], max(idx))
    peak = 0
    for i in range(len(shards)):
        held = {j for j in range(i) if last_needed[shards[j]] >= i} | set(range(i, min(len(shards), i + window)))
        peak = max(peak, sum(sizes[shards[j]] for j in held))
    return peak


def disk_need(ckpt: Checkpoint, recipe: Recipe, provenance: dict, sizes: dict[str, int], window: int) -> dict:
    """Bytes of the pack, of the whole source, and of the source shards a streamed conversion holds at most."""
    manifest = predict(ckpt, recipe, provenance, sizes)
    units, _ = plan_units(ckpt, recipe)
    pack = pack_bytes(manifest)
    source = sum(sizes[f] for f in ckpt.source_files()) + sum(sizes[f] for f in ckpt.side_files())
    peak = stream_peak(ckpt, units, sizes, window)
    return {"pack": pack, "source": source, "stream_source_peak": peak, "with_stream": pack + peak,
            "without_stream": pack + source, "manifest": manifest}


def _used(out: Path) -> int:
    """Bytes already under ``out`` (a resumed conversion's finished files and shards), links not followed."""
    if not out.is_dir():
        return 0
    return sum(p.lstat().st_size for p in out.rglob("*") if p.is_file() and not p.is_symlink())


def free_bytes(path: Path) -> int:
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _remote_sizes(repo) -> dict[str, int]:
    return {name: f.size for name, f in repo.files.items()}


def check_stream_disk(out: Path, ckpt: Checkpoint, recipe: Recipe, provenance: dict, repo, window: int) -> None:
    """Refuse a streamed conversion the disk under ``out`` cannot hold, before anything large is written."""
    need = disk_need(ckpt, recipe, provenance, _remote_sizes(repo), window)
    free, used = free_bytes(out), _used(out)
    missing = need["with_stream"] - used
    if missing > free:
        raise DiskSpaceError(
            f"{out}: {human_bytes(free)} free, a streamed conversion needs {human_bytes(missing)} more (pack "
            f"{human_bytes(need['pack'])} + up to {human_bytes(need['stream_source_peak'])} of source shards at once, "
            f"{human_bytes(used)} already written); a full download would need {human_bytes(need['without_stream'])}. "
            f"Free space or choose an OUT on a larger disk, then re-run the same command to resume")
    log.info("disk: %s free; streaming needs %s (pack %s + at most %s of shards)", human_bytes(free),
             human_bytes(need["with_stream"]), human_bytes(need["pack"]), human_bytes(need["stream_source_peak"]))


def choose_stream(src: str, revision: str | None, out: Path, recipe: Recipe, window: int) -> bool:
    """Whether ``convert REPO OUT`` streams: only when the disk cannot hold the download and the pack and can hold
    a streamed conversion (said in a message); refused with both figures when neither fits. Offline, or with the
    repo already in the hub cache, nothing is downloaded and nothing streams."""
    from huggingface_hub import constants, snapshot_download

    from moepack.convert.hub import HubRepo

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        snapshot_download(src, revision=revision, allow_patterns=["*.safetensors", "*.json"], local_files_only=True)
        return False  # all here already
    except Exception:  # noqa: BLE001 - not (wholly) in the cache
        pass
    repo = HubRepo(src, revision)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = repo.checkpoint(Path(tmp))
        need = disk_need(ckpt, recipe, repo.provenance, _remote_sizes(repo), window)
    cache = Path(constants.HF_HUB_CACHE)
    free_out, free_cache = free_bytes(out), free_bytes(cache)
    same = _device(out) == _device(cache)
    fits = need["without_stream"] <= free_out if same else need["source"] <= free_cache and need["pack"] <= free_out
    if fits:
        return False
    if need["with_stream"] <= free_out:
        log.warning("%s: %s free cannot hold the download (%s) and the pack (%s): converting shard by shard "
                    "(--stream), which needs %s", out, human_bytes(free_out), human_bytes(need["source"]),
                    human_bytes(need["pack"]), human_bytes(need["with_stream"]))
        return True
    raise DiskSpaceError(
        f"{out}: {human_bytes(free_out)} free; converting {src} needs {human_bytes(need['without_stream'])} with a full "
        f"download or {human_bytes(need['with_stream'])} streamed (--stream). Free space or choose an OUT on a larger "
        "disk")


def _device(path: Path) -> int:
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return os.stat(path).st_dev
