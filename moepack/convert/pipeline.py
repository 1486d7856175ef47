"""The conversion pipeline: plan units of work from shard headers (units.py), run them (in parallel), write the
manifest last.

Units are independent and each ends by renaming its output file into place and recording a small
"done" note in ``OUT/.moepack/``. A re-run with the same arguments skips finished units, so an
interrupted conversion (even ``kill -9``) resumes and ends byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

from moepack import __version__, arch
from moepack.convert import encodings
from moepack.convert.recipe import Recipe
from moepack.convert.hub import HubRepo, ShardFeed, is_repo_id
from moepack.convert.plan import check_stream_disk, choose_stream
from moepack.convert.source import SIDE_FILES, Checkpoint, file_fingerprint, resolve
from moepack.convert.units import Unit, expert_relpath, plan_units
from moepack.errors import MoepackError, SourceError
from moepack.formats import dtypes
from moepack.formats.manifest import BLOB_ALIGN, Blob, ExpertLayer, ExpertLayout, Manifest, Table, TensorRecord, align_up
from moepack.formats.writer import AlignedFile, PackWriter, add_table_rows, hash_file

log = logging.getLogger(__name__)

STATE_DIR = ".moepack"


# ---------------------------------------------------------------------------------------------
# running one unit (top level so worker processes can run it)


def run_unit(src_dir: str, out: str, recipe_json: dict, unit: Unit) -> dict:
    """Write one unit's output file (or hash one source file); returns what the manifest records of it."""
    recipe = Recipe(**recipe_json)
    if unit.kind == "hash":
        path = Path(src_dir) / unit.payload["file"]
        try:
            return {"source_hash": {unit.payload["file"]: {"size": path.stat().st_size, "blake3": hash_file(path)}}}
        except OSError as e:
            raise SourceError(f"{path}: cannot read it ({e.strerror})") from None
    ckpt = _checkpoint(src_dir)
    try:
        return write_unit(ckpt, recipe, unit, PackWriter(out, recipe.alignment).open(unit.payload["file"]))
    finally:
        if ckpt.transient:  # a streamed shard is deleted once read: an open descriptor would keep its space
            for f in unit.reads:
                ckpt.close(f)


def write_unit(ckpt: Checkpoint, recipe: Recipe, unit: Unit, f: AlignedFile) -> dict:
    """Encode a dense or expert unit into ``f`` (an AlignedFile, or plan.py's SizeFile that only counts)."""
    try:
        if unit.kind == "dense":
            records = {}
            for name in unit.payload["names"]:
                info = unit.payload["sources"][name]
                a = encodings.read(ckpt, info)
                e = recipe.encode_source(name, a, expert=False)
                blobs = {k: f.add(v) for k, v in e.parts.items()}
                records[name] = TensorRecord(e.encoding, list(a.shape), e.dtype, blobs, e.bits, e.group_size,
                                             source_encoding=info.dtype, carried=e.carried).to_json()
                del a, e
            result = {"dense": records}
        elif unit.kind == "table":
            result = {"tables": {unit.payload["name"]: _write_table(ckpt, recipe, f, unit.payload).to_json()}}
        else:
            tensors = {}
            for proj in sorted(unit.payload["projs"], key=_proj_order):
                r = unit.payload["projs"][proj]
                sel = slice(*r.sel) if r.sel else None
                info = unit.payload["sources"][r.name]
                a = encodings.read(ckpt, info, r.index, sel if r.axis == 0 else None, sel if r.axis == 1 else None)
                a = a.T if r.transpose else a
                e = recipe.encode_source(proj, a, expert=True)
                f.pad_to(recipe.alignment)  # every projection segment starts on an aligned boundary
                blobs = {k: f.add(v, with_file=False) for k, v in e.parts.items()}
                tensors[proj] = TensorRecord(e.encoding, list(a.shape), e.dtype, blobs, e.bits, e.group_size,
                                             source_encoding=info.dtype, carried=e.carried)
            layout = ExpertLayout(length=0, tensors=tensors)
            result = {"layout": layout}
        entry = f.close()
    except BaseException:
        f.abort()
        raise
    if "layout" in result:
        result["layout"].length = entry["length"]
        result["layout"] = result["layout"].to_json()
    result["files"] = {unit.payload["file"]: entry}
    return result


TABLE_CHUNK_BYTES = 64 << 20  # a table is converted in chunks of rows: never the whole table in memory


def _write_table(ckpt: Checkpoint, recipe: Recipe, f: AlignedFile, p: dict) -> Table:
    """Encode a table row-wise as the dense recipe would encode the whole tensor, and write it in blocks."""
    info, name = p["source"], p["name"]
    rows = info.shape[0]
    first = recipe.encode_source(name, encodings.read(ckpt, info, None, slice(0, 1)), expert=False)  # the row layout
    blobs, off = {}, 0
    for k, v in first.parts.items():
        blobs[k] = Blob(off, v.nbytes, dtypes.name_of(v.dtype), list(v.shape[1:]))
        off += align_up(v.nbytes, BLOB_ALIGN)
    row = TensorRecord(first.encoding, list(info.shape[1:]), first.dtype, blobs, first.bits, first.group_size,
                       source_encoding=info.dtype, carried=first.carried)
    table = Table.layout(p["file"], rows, row, recipe.alignment)
    step = max(1, TABLE_CHUNK_BYTES // table.block_bytes) * table.rows_per_block
    for s in range(0, rows, step):
        e = recipe.encode_source(name, encodings.read(ckpt, info, None, slice(s, min(rows, s + step))), expert=False)
        add_table_rows(f, table, s, e.parts)
    return table


def _proj_order(p: str) -> tuple[int, str]:
    base = p.removesuffix("_bias")
    return (arch.EXPERT_PROJS.index(base) if base in arch.EXPERT_PROJS else 9, p)


_CKPTS: dict[str, Checkpoint] = {}


def _checkpoint(src_dir: str) -> Checkpoint:
    if src_dir not in _CKPTS:
        _CKPTS[src_dir] = Checkpoint(Path(src_dir))
    return _CKPTS[src_dir]


def _init_worker(ckpt: Checkpoint, parent: int) -> None:
    """A worker process starts with the driver's checkpoint index (a streamed source has no shards to read yet) and
    ends with the driver (``exit_with_parent``)."""
    exit_with_parent(parent)
    _CKPTS[str(ckpt.root)] = ckpt


# ---------------------------------------------------------------------------------------------
# the driver


class ConvertError(MoepackError):
    pass


def convert(
    src: str,
    out: str | os.PathLike,
    recipe: Recipe = Recipe(),
    revision: str | None = None,
    workers: int | None = None,
    force: bool = False,
    progress: bool = True,
    stream: bool | None = None,
    window: int = 2,
    say: Callable[[str], None] = log.info,
) -> Path:
    """Convert ``src`` (a checkpoint directory or a hub repo id) into a pack at ``out``. ``out`` must be new, empty,
    a pack or a partial conversion of ours; ``force`` replaces a pack or a partial run, removing only the files a
    pack consists of. ``say``: where to tell the user that a run resumes.

    ``stream``: fetch a hub repo's shards one at a time into ``out`` and delete each once converted, at most
    ``window`` on disk besides those a unit still needs (None: only when the disk cannot hold the whole download
    and the pack). The pack is the same byte for byte either way."""
    out = Path(out).expanduser()
    repo = None
    if is_repo_id(src):
        if stream is None:  # resume a streamed conversion as one; else stream only when the disk needs it
            stream = "hub" in _job_source(out / STATE_DIR) or choose_stream(src, revision, out, recipe, window)
        if stream:
            repo = HubRepo(src, revision)
    elif stream:
        raise ConvertError(f"--stream converts a hub repo id (owner/name) shard by shard; {src} is a local path")
    if repo is not None:
        source_id = {"hub": repo.repo_id, "commit": repo.sha, "files": repo.fingerprint()}
    else:
        root, provenance = resolve(src, revision)
        check_out(root, out)
        ckpt = Checkpoint(root)
        source_id = {f: file_fingerprint(ckpt.file_path(f)) for f in ckpt.source_files()}
    job = {"converter": __version__, "recipe": recipe.to_json(), "source": source_id}
    if (out / "manifest.json").exists() and not force:
        if _same_job(out / STATE_DIR, job):  # killed after writing the manifest, before tidying up: tidy up
            with _writable(out), _lock(out):
                _tidy(out / STATE_DIR)
            return out
        raise ConvertError(f"{out} already holds a finished pack; pass --force to convert again into it")
    state = out / STATE_DIR
    with _writable(out), _disk_full(out):  # ENOSPC anywhere (units, side files, manifest) reads the same
        out.mkdir(parents=True, exist_ok=True)
        with _lock(out):
            if force:
                remove_pack_files(out)
            resumed = _check_job(state, job)
            feed = None
            if repo is not None:
                ckpt = repo.checkpoint(state / "source")
                provenance = repo.provenance
            _CKPTS[str(ckpt.root)] = ckpt
            units, architecture = plan_units(ckpt, recipe)
            if resumed:
                done = sum(1 for u in units if (state / "done" / f"{u.id}.json").exists())
                say(f"resuming the conversion in {out}: {done} of {len(units)} parts already done")
            if repo is not None:
                check_stream_disk(out, ckpt, recipe, provenance, repo, window)
                feed = ShardFeed(repo, ckpt.root, [], window)
            results = _run_units(ckpt, out, recipe, units, workers, progress, feed)
            side = {name: PackWriter(out, recipe.alignment).copy_file(ckpt.file_path(name), name)
                    for name in ckpt.side_files()}
            manifest = assemble(recipe, architecture, provenance, units, results, side)
            manifest.save(out)
    _tidy(state)
    log.info("wrote %s", out)
    return out


# What a pack, or a partial conversion, consists of (and all --force may remove): the manifest, the resume state,
# dense shards and expert files (with their temporary .part names), side files copied from the source.
PACK_NAMES = {"manifest.json", "manifest.json.tmp", STATE_DIR, "heat.json", *SIDE_FILES,
              *(f"{n}.part" for n in SIDE_FILES)}
PACK_FILE = re.compile(r"(dense/dense-\d{5}|experts/\d{3}/\d{4}|tables/[\w.]+)\.bin(\.part)?")


def _inside(a: Path, b: Path) -> bool:
    """Whether ``a`` is ``b`` or lies inside it (real paths)."""
    a, b = Path(os.path.realpath(a)), Path(os.path.realpath(b))
    return a == b or b in a.parents


def check_out(src: Path, out: Path) -> None:
    """Refuse an OUT that would destroy data: the source itself, a folder inside the source or holding it, or a
    folder of other files (it must be new, empty, a pack or a partial conversion of ours)."""
    if _inside(out, src) or _inside(src, out):
        where = "is" if _inside(out, src) and _inside(src, out) else "is inside" if _inside(out, src) else "holds"
        raise ConvertError(f"OUT {out} {where} the source checkpoint {src}; choose a folder apart from the source")
    if not out.exists():
        return
    if not out.is_dir():
        raise ConvertError(f"OUT {out} is a file, not a folder; choose a new or empty folder")
    if (out / STATE_DIR).is_dir() or _is_pack(out):
        return  # a pack or a partial conversion of ours: resumed, refused or (--force) replaced
    try:
        entries = sorted(p.name for p in out.iterdir())
    except OSError as e:
        raise ConvertError(f"cannot read OUT {out} ({e.strerror})") from None
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ConvertError(f"OUT {out} already holds other files ({shown}) and is not a moepack pack; choose a new or "
                           "empty folder (moepack never deletes files it did not write)")


def _is_pack(out: Path) -> bool:
    """Whether ``out`` holds a moepack manifest (another tool's manifest.json does not make a folder ours)."""
    from moepack.formats.files import read_pack_file
    from moepack.formats.manifest import FORMAT_NAME
    from moepack.formats.validate import MAX_MANIFEST_BYTES

    try:
        return json.loads(read_pack_file(out, "manifest.json", MAX_MANIFEST_BYTES)).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError, MoepackError):
        return False


def remove_pack_files(out: Path) -> None:
    """--force: remove the pack (or partial conversion) in ``out`` and nothing else; other files stay."""
    for sub in ("dense", "experts", "tables"):
        base = out / sub
        if not base.is_dir() or base.is_symlink():
            continue
        for path in sorted(base.rglob("*"), reverse=True):  # files before their directories
            rel = path.relative_to(out).as_posix()
            if path.is_dir() and not path.is_symlink():
                if not any(path.iterdir()):
                    path.rmdir()
            elif PACK_FILE.fullmatch(rel):
                path.unlink()
        if not any(base.iterdir()):
            base.rmdir()
    for name in PACK_NAMES - {STATE_DIR}:
        p = out / name
        if p.is_file() or p.is_symlink():
            p.unlink()
    for sub in ("done", "source"):  # units done; a streamed conversion's shards on disk
        shutil.rmtree(out / STATE_DIR / sub, ignore_errors=True)
    (out / STATE_DIR / "job.json").unlink(missing_ok=True)


@contextmanager
def _writable(out: Path):
    """A read-only OUT (or one we may not write to) is one line that says so."""
    try:
        yield
    except OSError as e:
        ours = e.filename is None or _inside(Path(os.fsdecode(e.filename)), out)  # not a source file we read
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and ours:
            raise ConvertError(f"cannot write into {out} ({e.strerror}); choose a folder you can write to") from None
        raise


def _job_source(state: Path) -> dict:
    try:
        return json.loads((state / "job.json").read_text())["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _same_job(state: Path, job: dict) -> bool:
    try:
        return json.loads((state / "job.json").read_text()) == job
    except (OSError, ValueError):
        return False


def _tidy(state: Path) -> None:
    """Remove the resume state, job.json last: a kill part-way leaves it, so the same command still finishes."""
    shutil.rmtree(state / "done", ignore_errors=True)
    shutil.rmtree(state / "source", ignore_errors=True)
    (state / "lock").unlink(missing_ok=True)
    (state / "job.json").unlink(missing_ok=True)
    shutil.rmtree(state, ignore_errors=True)


class _lock:
    """An exclusive lock on OUT so two converters never interleave their writes."""

    def __init__(self, out: Path):
        self.path = out / STATE_DIR / "lock"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise ConvertError(f"another moepack convert is writing into {self.path.parent.parent}; wait for it to finish") from None
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def _check_job(state: Path, job: dict) -> bool:
    """Record the job, or check it is the one recorded; True when resuming a recorded one."""
    path = state / "job.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = None
        if old != job:
            raise ConvertError(
                f"{state.parent} holds a partial conversion made from another source or with other options; "
                "re-run with the same arguments to resume it, or pass --force to start over"
            )
        return True
    (state / "done").mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # a kill mid-write must not leave a job.json that refuses the re-run
    tmp.write_text(json.dumps(job))
    os.replace(tmp, path)
    return False


def _run_units(ckpt: Checkpoint, out: Path, recipe: Recipe, units: list[Unit], workers: int | None, progress: bool,
               feed: ShardFeed | None = None) -> dict[str, dict]:
    """Run every unit not yet done (its note in ``OUT/.moepack/done``). With a ``feed`` (a streamed source), a unit
    runs once the shards it reads are on disk, and a shard is released once every unit reading it is done."""
    done_dir = out / STATE_DIR / "done"
    done_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    todo = []
    for u in units:
        rec = done_dir / f"{u.id}.json"
        if rec.exists():
            r = json.loads(rec.read_text())
            if all((out / p).is_file() and (out / p).stat().st_size == e["length"] for p, e in r.get("files", {}).items()):
                results[u.id] = r
                continue
        todo.append(u)
    total = sum(u.cost for u in todo)
    if workers is None:
        workers = 1 if total < (256 << 20) else min(4, os.cpu_count() or 1)
    readers: dict[str, int] = {}  # shard -> units still to run that read it
    for u in todo:
        for f in u.reads:
            readers[f] = readers.get(f, 0) + 1
    download = 0
    if feed is not None:
        feed.needed = [s for s in ckpt.shards if readers.get(s)]  # shards whose units are all done: never again
        download = sum(feed.repo.files[s].size for s in feed.needed)
        feed.start()
    bar = tqdm(total=total + download, unit="B", unit_scale=True, unit_divisor=1024,
               desc="downloading and converting" if feed else "converting", disable=not progress)
    fetched = 0

    def finish(u: Unit, r: dict) -> None:
        tmp = done_dir / f"{u.id}.json.tmp"
        tmp.write_text(json.dumps(r))
        os.replace(tmp, done_dir / f"{u.id}.json")
        results[u.id] = r
        bar.update(u.cost)
        for f in u.reads:
            readers[f] -= 1
            if readers[f] == 0 and feed is not None and f in feed.present:
                feed.release(f, ckpt)

    def tick() -> None:
        nonlocal fetched
        if feed is not None and (now := feed.bytes_on_disk()) > fetched:
            bar.update(now - fetched)
            fetched = now

    args = (str(ckpt.root), str(out), recipe.to_json())
    waiting: dict[tuple[str, ...], list[Unit]] = {}  # units by the files they read, in plan order within
    for u in todo:
        waiting.setdefault(u.reads, []).append(u)

    def ready(n: int) -> list[Unit]:
        """Up to ``n`` units whose files are all on disk (a few hundred distinct read sets, not one per unit)."""
        batch = []
        for reads in list(waiting):
            if feed is None or feed.has(reads):
                while waiting[reads] and len(batch) < n:
                    batch.append(waiting[reads].pop(0))
                if not waiting[reads]:
                    del waiting[reads]
            if len(batch) >= n:
                break
        return batch

    pool = None
    try:
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                   initargs=(ckpt, os.getpid())) if workers > 1 else None
        inflight: dict = {}
        while waiting or inflight:
            if feed is not None and feed.error is not None:
                raise feed.error
            if pool is None:
                if batch := ready(1):
                    finish(batch[0], _guard(run_unit, *args, batch[0]))
                    tick()
                    continue
            else:
                with _children_block_sigint():  # submit starts workers on demand
                    for u in ready(max(0, 2 * workers - len(inflight))):
                        inflight[pool.submit(_guard, run_unit, *args, u)] = u
            if inflight:
                fin, _ = wait(inflight, timeout=0.5, return_when=FIRST_COMPLETED)
                for fut in fin:
                    finish(inflight.pop(fut), fut.result())
            elif waiting:  # every unit the shards on disk allow is done; the rest need more shards
                if feed.settled():
                    feed.grow()
                feed.wait(0.5)
            tick()
    except KeyboardInterrupt:  # stop now: units in flight are redone by the re-run
        if pool is not None:
            for proc in list((getattr(pool, "_processes", None) or {}).values()):  # no public kill
                proc.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            pool = None
        raise
    finally:
        if feed is not None:
            feed.stop()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        bar.close()
    return results


@contextmanager
def _children_block_sigint() -> Iterator[None]:
    """Start worker processes with Ctrl-C blocked from their first instruction: a SIGINT that reaches the group while
    a spawned worker is still importing (before its initializer ignores it) would otherwise print its traceback. A
    child inherits the forking thread's signal mask across exec; here a SIGINT stays pending (or goes to another
    thread) and still interrupts the converter."""
    import signal

    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def exit_with_parent(parent: int) -> None:
    """In a worker: end when the converter ends, even by ``kill -9`` (which runs no clean-up in the parent), so no
    worker keeps writing into OUT or holds the resource tracker open. Linux: the kernel sends SIGKILL when the
    parent dies (prctl PR_SET_PDEATHSIG); everywhere: a thread that notices the parent is gone (re-parented)."""
    import signal
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the converter decides, not us
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # died before the prctl took hold
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="moepack-exit-with-parent").start()


@contextmanager
def _disk_full(out):
    """Turn a full disk into an error that says what to do (the conversion resumes once space is freed)."""
    try:
        yield
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ConvertError(f"disk full while writing into {out}; free space and re-run the same command to resume") from e
        raise


def _guard(fn, *args):
    """Run a unit (in a worker process too) with the disk-full message; ``args[1]`` is OUT."""
    with _disk_full(args[1]):
        return fn(*args)


def assemble(recipe: Recipe, architecture: dict, provenance: dict, units: list[Unit], results: dict[str, dict],
             side: dict[str, dict]) -> Manifest:
    """The manifest from every unit's result and the side files' entries (``{name: {"length", "blake3"}}``)."""
    files: dict[str, dict] = dict(side)
    dense: dict[str, TensorRecord] = {}
    tables: dict[str, Table] = {}
    layouts: dict[str, ExpertLayout] = {}
    layout_keys: dict[str, str] = {}
    layer_layout: dict[int, str] = {}
    source_hashes: dict[str, str] = {}
    for u in units:
        r = results[u.id]
        files.update(r.get("files", {}))
        source_hashes.update(r.get("source_hash", {}))
        for name, rec in r.get("dense", {}).items():
            dense[name] = TensorRecord.from_json(rec)
        tables.update({name: Table.from_json(t) for name, t in r.get("tables", {}).items()})
        if "layout" in r:
            L = u.payload["layer"]
            key = json.dumps(r["layout"], sort_keys=True)
            if key not in layout_keys:
                layout_keys[key] = f"layout{len(layout_keys)}"
                layouts[layout_keys[key]] = ExpertLayout.from_json(r["layout"])
            if layer_layout.setdefault(L, layout_keys[key]) != layout_keys[key]:
                raise ConvertError(f"experts of layer {L} came out with different layouts; the source is inconsistent")
    experts = [
        ExpertLayer(L, layer_layout[L], [expert_relpath(L, e) for e in range(architecture["num_experts"])])
        for L in architecture["moe_layers"]
    ]
    provenance = {
        **provenance,
        "converter": f"moepack {__version__}",
        "source_files": source_hashes,  # in the order of the units: shards, then the index
    }
    return Manifest(
        architecture=architecture,
        alignment=recipe.alignment,
        recipe=recipe.to_json(),
        provenance=provenance,
        files=dict(sorted(files.items())),
        dense=dense,
        expert_layouts=layouts,
        experts=experts,
        tables=tables,
    )
