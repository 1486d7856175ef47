"""The pack a conversion would write, predicted from shard headers alone: every file's size byte for byte.

Each unit runs through the converter's own code (``pipeline.write_unit``) on lazy MLX zeros of the source shapes
(:class:`ShapeCheckpoint`) into a file that only counts bytes (:class:`SizeFile`), so sizes cannot drift from what
``convert`` writes. Experts whose sources look alike are sized once.
"""

from __future__ import annotations

import json
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

    def write_bytes(self, data) -> None:
        self.pos += len(data)

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
    return shutil.disk_usage(_existing(path)).free


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
    return os.stat(_existing(path)).st_dev


def _existing(path: Path) -> Path:
    """``path``, or its nearest existing parent (OUT may not exist yet): the file system it would be on."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return path


# ---------------------------------------------------------------------------------------------
# `moepack plan MODEL`: size, memory, disk and speed before anything is downloaded

COMMON_RECIPES = {"q4": Recipe(), "q8": Recipe(expert_bits=8), "bf16": Recipe(quantize=False)}
TTFT_TOKENS = 2048
READ_TEST_BYTES = 256 << 20


def open_model(model: str, revision: str | None, staging: Path):
    """(checkpoint or None, pack reader or None, provenance, file sizes) for a hub repo id, a checkpoint directory
    or a pack; a hub repo is read through its headers only."""
    from moepack.convert.hub import HubRepo, is_repo_id
    from moepack.convert.source import resolve
    from moepack.formats.reader import PackReader

    p = Path(model).expanduser()
    if (p / "manifest.json").is_file():
        return None, PackReader(p), {"source": str(p.resolve())}, {}
    from huggingface_hub import constants

    if is_repo_id(model) and not constants.HF_HUB_OFFLINE:  # offline: the copy in the hub cache, below
        repo = HubRepo(model, revision)
        return repo.checkpoint(staging), None, repo.provenance, _remote_sizes(repo)
    root, provenance = resolve(model, revision)
    ckpt = Checkpoint(root)
    names = [*ckpt.source_files(), *ckpt.side_files()]
    return ckpt, None, provenance, {n: ckpt.file_path(n).stat().st_size for n in names}


def read_speed(directory: Path, block: int, seconds: float = 1.0, threads: int = 8,
               size: int = READ_TEST_BYTES) -> tuple[float, str]:
    """Bytes/s of uncached reads of ``block``-sized pieces at random aligned offsets of a scratch file in
    ``directory``, as the engine reads experts (direct I/O, ``threads`` at once); and the read mode used."""
    import random
    import threading
    import time

    from moepack.runtime.io import DirectReader, aligned_buffer

    block = max(4096, align_up(block, 4096))
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".moepack-readtest-", dir=directory)
    try:
        chunk = np.random.default_rng(0).integers(0, 256, 1 << 20, np.uint8).tobytes()
        size = max(size, 4 * block) >> 20 << 20 or 1 << 20
        with os.fdopen(fd, "wb") as f:
            for _ in range(size >> 20):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        reader = DirectReader()
        done, stop = [0], time.perf_counter() + seconds
        lock = threading.Lock()

        def work(seed: int) -> None:
            rng, buf = random.Random(seed), aligned_buffer(block)
            while time.perf_counter() < stop:
                reader.read_into(name, buf, rng.randrange(0, (size - block) // 4096) * 4096)
                with lock:
                    done[0] += block

        t0 = time.perf_counter()
        pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        return done[0] / (time.perf_counter() - t0), reader.mode
    finally:
        os.unlink(name)


def plan_model(model: str, recipe: Recipe, revision: str | None = None, target: Path | None = None,
               window: int = 2, disk_bps: float | None = None) -> dict:
    """Everything `moepack plan MODEL` prints, as a dict (``--json``). ``target``: where the pack would go (its
    disk is measured and its free space compared); ``disk_bps``: skip the read test and use this speed."""
    from moepack.formats.reader import PackReader
    from moepack.runtime.memory import available_memory, default_budget, memory_need

    target = Path(target or ".")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, reader, provenance, sizes = open_model(model, revision, Path(tmp) / "source")
        out: dict = {"model": model, **{k: v for k, v in provenance.items() if k == "revision"}}
        if ckpt is not None:
            need = disk_need(ckpt, recipe, provenance, sizes, window)
            manifest = need.pop("manifest")
            out["recipes"] = {"chosen": {**recipe.to_json(), "pack_bytes": need["pack"]}}
            for name, r in COMMON_RECIPES.items():
                r = Recipe(**{**r.to_json(), "alignment": recipe.alignment, "dtype": recipe.dtype})
                out["recipes"][name] = {**r.to_json(), "pack_bytes": need["pack"] if r == recipe else
                                        pack_bytes(predict(ckpt, r, provenance, sizes))}
            out["files"] = {n: e["length"] for n, e in manifest.files.items()}
            out["files"]["manifest.json"] = len(manifest.to_bytes())
            free = free_bytes(target)
            out["disk"] = {**need, "target": str(target), "free": free, "stream_window": window,
                           "fits_without_stream": need["without_stream"] <= free,
                           "fits_with_stream": need["with_stream"] <= free}
            pack_dir = Path(tmp) / "pack"
            pack_dir.mkdir()
            (pack_dir / "config.json").write_text(json.dumps(ckpt.config))
            manifest.save(pack_dir)
            reader = PackReader(pack_dir)
        m = reader.manifest
        if ckpt is None:
            out["recipes"] = {"chosen": {**m.recipe, "pack_bytes": pack_bytes(m)}}
        need_mem = memory_need(reader, mx.bfloat16)  # the bytes as stored (bf16 packs)
        lengths = {el.layer: m.expert_layouts[el.layout].length for el in m.experts}
        E, k = m.architecture["num_experts"], m.architecture["top_k"]
        per_token = k * sum(lengths.values())
        avail = available_memory()
        all_in = need_mem.dense_bytes + need_mem.experts * need_mem.slot_bytes + need_mem.table_rows * need_mem.row_bytes
        recommended = max(need_mem.minimum, min(default_budget(), all_in))
        slots, rows = need_mem.split(recommended)
        out["memory"] = {"dense_resident_bytes": need_mem.dense_bytes, "bytes_per_expert": max(lengths.values(), default=0),
                         "slot_bytes": need_mem.slot_bytes, "experts": need_mem.experts, "top_k": k,
                         "bytes_per_token_cold": per_token, "minimum_budget": need_mem.minimum,
                         "table_bytes": need_mem.table_bytes, "table_rows": need_mem.table_rows,
                         "table_row_bytes_per_token": need_mem.row_bytes,
                         "table_bytes_per_token_cold": need_mem.table_read_bytes,
                         "available": avail, "recommended_budget": recommended,
                         "recommended_split": {"expert_slots": slots, "expert_pool_bytes": slots * need_mem.slot_bytes,
                                               "table_cache_rows": rows, "table_cache_bytes": rows * need_mem.row_bytes},
                         "fits_in_memory": need_mem.minimum <= avail}
        if disk_bps is None:
            disk_bps, mode = read_speed(target, max(lengths.values(), default=1 << 20))
        else:
            mode = "given"
        hit = min(1.0, slots / need_mem.experts) if need_mem.experts else 1.0
        table_hit = rows / need_mem.table_rows if need_mem.table_rows else 1.0
        cold = per_token + need_mem.table_read_bytes
        expected = per_token * (1 - hit) + need_mem.table_read_bytes * (1 - table_hit)
        prompt = sum(E * (1 - (1 - k / E) ** TTFT_TOKENS) * n for n in lengths.values()) + \
            TTFT_TOKENS * need_mem.table_read_bytes
        out["speed"] = {"disk_read_bytes_per_s": disk_bps, "read_mode": mode, "expected_hit_rate": hit,
                        "expected_table_hit_rate": table_hit,
                        "decode_tok_s_cold": disk_bps / cold if cold else None,
                        "decode_tok_s_expected": disk_bps / expected if expected else None,
                        f"ttft_s_{TTFT_TOKENS}": prompt / disk_bps,
                        "note": "I/O bounds: expert and table reads over the measured disk speed, compute not counted; "
                                "the hit rates assume uniform routing over the slots, and uniform tokens over the "
                                "table rows, that the recommended budget buys"}
    return out


def describe_plan(p: dict) -> str:
    """The plan for people."""
    hb = human_bytes
    lines = [f"{p['model']}" + (f" @ {p['revision']}" if p.get("revision") else "")]
    for name, r in p["recipes"].items():
        what = "unquantized" if not r.get("quantize", True) else f"experts {r['expert_bits']}-bit, dense {r['dense_bits']}-bit"
        lines.append(f"  pack ({name}, {what}, {r['dtype']}): {hb(r['pack_bytes'])} ({r['pack_bytes']} bytes)")
    m = p["memory"]
    lines += [f"  dense weights resident: {hb(m['dense_resident_bytes'])}; one expert: {hb(m['bytes_per_expert'])} "
              f"({m['experts']} routed experts, top-{m['top_k']})",
              f"  a token reads {hb(m['bytes_per_token_cold'])} of experts when none is cached"
              + (f", and {hb(m['table_bytes_per_token_cold'])} from the streamed tables ({hb(m['table_bytes'])}, "
                 f"{m['table_rows']:,} rows) when no row is" if m["table_bytes"] else ""),
              f"  memory budget: minimum {hb(m['minimum_budget'])}, recommended here {hb(m['recommended_budget'])} "
              f"(available {hb(m['available'])})"]
    if m["table_bytes"]:
        sp = m["recommended_split"]
        lines.append(f"    which holds {sp['expert_slots']} expert slots ({hb(sp['expert_pool_bytes'])}) and a table "
                     f"cache of {sp['table_cache_rows']:,} rows ({hb(sp['table_cache_bytes'])})")
    if "disk" in p:
        d = p["disk"]
        lines.append(f"  disk at {d['target']} ({hb(d['free'])} free): {hb(d['without_stream'])} with a full download "
                     f"(source {hb(d['source'])} + pack), {hb(d['with_stream'])} streamed (--stream: pack + at most "
                     f"{hb(d['stream_source_peak'])} of shards)")
        if not d["fits_without_stream"]:
            lines.append("    a full download does not fit: " + ("use --stream" if d["fits_with_stream"] else
                                                                 "neither mode fits; choose a larger disk"))
    s = p["speed"]
    tok = lambda x: "n/a" if x is None else f"{x:.2f}"
    lines.append(f"  speed bound (disk {s['disk_read_bytes_per_s'] / 1e9:.2f} GB/s, {s['read_mode']}): decode "
                 f"{tok(s['decode_tok_s_cold'])} tok/s with no hits, {tok(s['decode_tok_s_expected'])} tok/s at the "
                 f"expected {s['expected_hit_rate']:.0%} hits; first token of a {TTFT_TOKENS}-token prompt "
                 f"{s[f'ttft_s_{TTFT_TOKENS}']:.1f} s (I/O only)")
    return "\n".join(lines)
