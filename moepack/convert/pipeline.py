"""The conversion pipeline: plan units of work from shard headers, run them (in parallel), write the manifest last.

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
import shutil
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

from moepack import __version__, arch
from moepack.convert import encodings
from moepack.convert.recipe import Recipe
from moepack.convert.source import Checkpoint, file_fingerprint, resolve
from moepack.errors import MoepackError, SourceError
from moepack.formats import dtypes
from moepack.formats.manifest import ExpertLayer, ExpertLayout, Manifest, TensorRecord
from moepack.formats.writer import PackWriter, hash_file

log = logging.getLogger(__name__)

STATE_DIR = ".moepack"
DENSE_SHARD_BYTES = 2 << 30


@dataclass
class Unit:
    """One independent piece of output: a dense shard, one expert file, or the hash of one source file."""

    id: str
    kind: str  # "dense" | "expert" | "hash"
    cost: int  # source bytes, for the progress bar
    payload: dict = field(default_factory=dict)


def expert_relpath(layer: int, expert: int) -> str:
    return f"experts/{layer:03d}/{expert:04d}.bin"


class Read(NamedTuple):
    """Where one expert projection comes from: tensor ``name``, ``[index]`` of a fused tensor's expert axis (None
    for a per-expert tensor), then ``sel`` = (start, stop, step) along ``axis`` of what remains, then a transpose
    to the pack's [out, in] orientation."""

    name: str
    index: int | None = None
    sel: tuple[int, int, int] | None = None
    axis: int = 0
    transpose: bool = False

    def shape(self, src: tuple[int, ...]) -> tuple[int, ...]:
        s = list(src[(0 if self.index is None else 1):])
        if self.sel is not None:
            s[self.axis] = len(range(*self.sel))
        return tuple(reversed(s)) if self.transpose else tuple(s)


def _fused_reads(name: str, e: int, proj: str, bias: str, shape: tuple[int, ...], layout: arch.FusedLayout) -> dict:
    """Expert ``e``'s projections in one fused tensor ``[E, ...]``: {"gate", "up"} or {"down"} (+ ``bias`` suffix)."""
    transpose = layout.transposed and not bias  # a bias [E, D] has one axis: nothing to transpose
    if proj == "down_proj":
        return {"down" + bias: Read(name, e, transpose=transpose)}
    axis = 1 if transpose else 0  # the 2I axis: [H, 2I] when transposed, else [2I, H] (or a bias's only axis)
    return {p + bias: Read(name, e, sel, axis, transpose) for p, sel in layout.split(shape[1 + axis]).items()}


# ---------------------------------------------------------------------------------------------
# planning


def plan_units(ckpt: Checkpoint, recipe: Recipe) -> tuple[list[Unit], dict]:
    """The units of work that convert ``ckpt`` and the manifest's ``architecture``, from shard headers alone; a
    source that cannot make a whole pack (a missing expert, a wrong shape) is refused here, before anything is
    written."""
    cfg = arch.text_config(ckpt.config)
    fam = arch.family_for(cfg)
    n_layers = arch.num_layers(cfg)
    n_experts = int(arch.get(cfg, "num_experts"))
    moe_layers = arch.moe_layers(cfg)
    hidden, width = int(cfg["hidden_size"]), arch.expert_width(cfg)

    dense: list[str] = []
    # experts[(layer, expert)][proj] = where to read it
    experts: dict[tuple[int, int], dict[str, Read]] = {}
    dropped = 0
    tensors = encodings.logical_tensors(ckpt)  # quantized weights grouped with their scales, under pack names
    for name, info in tensors.items():
        layer = arch.layer_of(name)
        if arch.SKIPPED.match(name):
            dropped += 1  # multi-token-prediction heads, vision towers
            continue
        if layer is not None and layer >= n_layers:
            dropped += 1  # multi-token-prediction layers beyond num_hidden_layers
            continue
        quantized = encodings.is_quantized(info)
        if not quantized and info.dtype not in dtypes.FLOATS:
            raise SourceError(
                f"{ckpt.root / info.file}: tensor {name} has dtype {info.dtype}; this converter reads "
                f"float32/float16/bfloat16 tensors and the quantized formats {', '.join(encodings.FORMATS)}"
            )
        if m := arch.EXPERT_TENSOR.match(name):
            proj = arch.PROJ_ALIASES[m["proj"]] + ("_bias" if m["part"] == "bias" else "")
            experts.setdefault((int(m["layer"]), int(m["expert"])), {})[proj] = Read(name)
        elif m := arch.FUSED_EXPERT_TENSOR.match(name):
            L, bias = int(m["layer"]), "_bias" if m["bias"] else ""
            if info.shape[0] != n_experts:
                raise SourceError(f"{ckpt.root / info.file}: {name} has {info.shape[0]} experts, config says {n_experts}")
            for e in range(n_experts):
                # quantized tensors are [out, in] whatever the family's float layout (gpt-oss: [in, out])
                layout = replace(fam.fused, transposed=False) if quantized else fam.fused
                experts.setdefault((L, e), {}).update(_fused_reads(name, e, m["proj"], bias, info.shape, layout))
        else:
            dense.append(name)
    if dropped:
        log.info("dropped %d tensors of multi-token prediction (or layers beyond num_hidden_layers=%d) and vision "
                 "towers", dropped, n_layers)

    # Every MoE layer must have every expert, with the shapes the config promises.
    expect = {"gate": (width, hidden), "up": (width, hidden), "down": (hidden, width)}
    biases = {"gate_bias": (width,), "up_bias": (width,), "down_bias": (hidden,)}  # checked where present
    for L in moe_layers:
        for e in range(n_experts):
            projs = experts.get((L, e), {})
            for p, shape in {**expect, **{b: s for b, s in biases.items() if b in projs}}.items():
                if p not in projs:
                    raise SourceError(f"{ckpt.root}: layer {L} expert {e} has no {p} projection; is a shard missing?")
                r = projs[p]
                src_shape = r.shape(tensors[r.name].shape)
                if src_shape != shape:
                    raise SourceError(
                        f"{ckpt.root / tensors[r.name].file}: {r.name} has shape {src_shape} for layer {L} "
                        f"expert {e} {p}, expected {shape} from config.json"
                    )
    stray = sorted({L for (L, _) in experts} - set(moe_layers))
    if stray:
        raise SourceError(f"{ckpt.root}: expert tensors found in layers {stray}, which config.json says are dense")

    units: list[Unit] = []
    # Dense tensors in a stable order, split into shards of bounded size.
    dense.sort(key=lambda n: (arch.layer_of(n) if arch.layer_of(n) is not None else -1, n))
    shard, size, shards = [], 0, []
    for name in dense:
        nb = tensors[name].nbytes
        if shard and size + nb > DENSE_SHARD_BYTES:
            shards.append(shard)
            shard, size = [], 0
        shard.append(name)
        size += nb
    if shard:
        shards.append(shard)
    for i, names in enumerate(shards):
        units.append(Unit(f"dense-{i:05d}", "dense", sum(tensors[n].nbytes for n in names),
                          {"file": f"dense/dense-{i:05d}.bin", "names": names, "sources": {n: tensors[n] for n in names}}))
    for (L, e) in sorted(experts):
        projs = experts[(L, e)]
        cost = sum(tensors[r.name].nbytes // (tensors[r.name].shape[0] if r.index is not None else 1)
                   for r in projs.values())
        units.append(Unit(f"expert-{L:03d}-{e:04d}", "expert", cost,
                          {"file": expert_relpath(L, e), "layer": L, "expert": e, "projs": projs,
                           "sources": {r.name: tensors[r.name] for r in projs.values()}}))
    for f in ckpt.source_files():
        units.append(Unit(f"hash-{f}", "hash", 0, {"file": f}))

    top_k = int(arch.get(cfg, "top_k"))
    architecture = {
        "family": fam.name,
        "model_type": cfg.get("model_type"),
        "num_layers": n_layers,
        "moe_layers": moe_layers,
        "num_experts": n_experts,
        "top_k": top_k,
        "hidden_size": hidden,
        "expert_width": width,
        "vocab_size": cfg.get("vocab_size"),
    }
    return units, architecture


# ---------------------------------------------------------------------------------------------
# running one unit (top level so worker processes can run it)


def run_unit(src_dir: str, out: str, recipe_json: dict, unit: Unit) -> dict:
    """Write one unit's output file (or hash one source file); returns what the manifest records of it."""
    recipe = Recipe(**recipe_json)
    writer = PackWriter(out, recipe.alignment)
    if unit.kind == "hash":
        return {"source_hash": {unit.payload["file"]: hash_file(Path(src_dir) / unit.payload["file"])}}
    ckpt = _checkpoint(src_dir)
    f = writer.open(unit.payload["file"])
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


def _proj_order(p: str) -> tuple[int, str]:
    base = p.removesuffix("_bias")
    return (arch.EXPERT_PROJS.index(base) if base in arch.EXPERT_PROJS else 9, p)


_CKPTS: dict[str, Checkpoint] = {}


def _checkpoint(src_dir: str) -> Checkpoint:
    if src_dir not in _CKPTS:
        _CKPTS[src_dir] = Checkpoint(Path(src_dir))
    return _CKPTS[src_dir]


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
) -> Path:
    out = Path(out)
    root, provenance = resolve(src, revision)
    ckpt = Checkpoint(root)
    _CKPTS[str(root)] = ckpt
    units, architecture = plan_units(ckpt, recipe)

    job = {
        "converter": __version__,
        "recipe": recipe.to_json(),
        "source": {f: file_fingerprint(ckpt.file_path(f)) for f in ckpt.source_files()},
    }
    if (out / "manifest.json").exists() and not force:
        if _same_job(out / STATE_DIR, job):  # killed after writing the manifest, before tidying up: tidy up
            with _lock(out):
                _tidy(out / STATE_DIR)
            return out
        raise ConvertError(f"{out} already holds a finished pack; pass --force to convert again into it")
    out.mkdir(parents=True, exist_ok=True)
    state = out / STATE_DIR
    with _disk_full(out), _lock(out):  # ENOSPC anywhere (units, side files, manifest) reads the same
        if force and out.exists():
            for child in out.iterdir():
                if child.name != STATE_DIR:
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
            shutil.rmtree(state / "done", ignore_errors=True)
            (state / "job.json").unlink(missing_ok=True)
        _check_job(state, job)
        results = _run_units(str(root), out, recipe, units, workers, progress)
        manifest = _assemble(out, ckpt, recipe, architecture, provenance, units, results)
        manifest.save(out)
    _tidy(state)
    log.info("wrote %s", out)
    return out


def _same_job(state: Path, job: dict) -> bool:
    try:
        return json.loads((state / "job.json").read_text()) == job
    except (OSError, ValueError):
        return False


def _tidy(state: Path) -> None:
    """Remove the resume state, job.json last: a kill part-way leaves it, so the same command still finishes."""
    shutil.rmtree(state / "done", ignore_errors=True)
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


def _check_job(state: Path, job: dict) -> None:
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
        log.info("resuming the conversion in %s", state.parent)
        return
    (state / "done").mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # a kill mid-write must not leave a job.json that refuses the re-run
    tmp.write_text(json.dumps(job))
    os.replace(tmp, path)


def _run_units(src_dir: str, out: Path, recipe: Recipe, units: list[Unit], workers: int | None, progress: bool) -> dict[str, dict]:
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
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="converting", disable=not progress)

    def finish(u: Unit, r: dict) -> None:
        tmp = done_dir / f"{u.id}.json.tmp"
        tmp.write_text(json.dumps(r))
        os.replace(tmp, done_dir / f"{u.id}.json")
        results[u.id] = r
        bar.update(u.cost)

    try:
        if workers <= 1:
            for u in todo:
                finish(u, _guard(run_unit, src_dir, str(out), recipe.to_json(), u))
        else:
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
                pending = {}
                it = iter(todo)
                for u in it:  # keep a bounded number of units in flight
                    pending[pool.submit(_guard, run_unit, src_dir, str(out), recipe.to_json(), u)] = u
                    if len(pending) >= 2 * workers:
                        break
                while pending:
                    fin, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in fin:
                        finish(pending.pop(fut), fut.result())
                    for u in it:
                        pending[pool.submit(_guard, run_unit, src_dir, str(out), recipe.to_json(), u)] = u
                        if len(pending) >= 2 * workers:
                            break
    finally:
        bar.close()
    return results


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


def _assemble(out: Path, ckpt: Checkpoint, recipe: Recipe, architecture: dict, provenance: dict,
              units: list[Unit], results: dict[str, dict]) -> Manifest:
    writer = PackWriter(out, recipe.alignment)
    files: dict[str, dict] = {}
    dense: dict[str, TensorRecord] = {}
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
        if "layout" in r:
            L = u.payload["layer"]
            key = json.dumps(r["layout"], sort_keys=True)
            if key not in layout_keys:
                layout_keys[key] = f"layout{len(layout_keys)}"
                layouts[layout_keys[key]] = ExpertLayout.from_json(r["layout"])
            if layer_layout.setdefault(L, layout_keys[key]) != layout_keys[key]:
                raise ConvertError(f"experts of layer {L} came out with different layouts; the source is inconsistent")
    for name in ckpt.side_files():
        files[name] = writer.copy_file(ckpt.file_path(name), name)
    experts = [
        ExpertLayer(L, layer_layout[L], [expert_relpath(L, e) for e in range(architecture["num_experts"])])
        for L in architecture["moe_layers"]
    ]
    provenance = {
        **provenance,
        "converter": f"moepack {__version__}",
        "source_files": {f: {"size": ckpt.file_path(f).stat().st_size, "blake3": source_hashes[f]} for f in ckpt.source_files()},
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
    )
