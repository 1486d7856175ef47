"""The converter when things go wrong: corrupt packs, kill -9 and resume, refused re-runs, bad sources, a full disk."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import build
from conftest import flip
from moepack.convert.pipeline import ConvertError, convert
from moepack.convert.recipe import Recipe
from moepack.errors import MoepackError, SourceError, UnsupportedArchitecture
from moepack.formats import manifest, writer
from moepack.formats.reader import PackReader
from test_convert import EXACT, QUANT, check_pack, reshard, tree

SUPPORTED = ["deepseek_v2", "deepseek_v3", "glm4_moe", "kimi_k2", "minimax_m2", "mixtral", "olmoe", "qwen2_moe",
             "qwen3_moe"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return build("qwen3_moe", tmp_path_factory.mktemp("src") / "ckpt")


@pytest.fixture(scope="module")
def pack(ckpt, tmp_path_factory) -> Path:
    return convert(str(ckpt), tmp_path_factory.mktemp("pack") / "pack", QUANT, progress=False)


@pytest.fixture
def src(ckpt, tmp_path) -> Path:
    """A private copy of the source checkpoint that a test may damage."""
    return Path(shutil.copytree(ckpt, tmp_path / "src"))


# ---------------------------------------------------------------------------------------------
# verify


@pytest.mark.parametrize("damage", ["flip-expert", "flip-dense", "truncate", "missing"])
def test_verify_catches(pack, tmp_path, damage):
    p = Path(shutil.copytree(pack, tmp_path / "pack"))
    assert PackReader(p).verify().ok
    expert, dense = p / "experts/001/0005.bin", p / "dense/dense-00000.bin"
    target = {"flip-expert": expert, "flip-dense": dense, "truncate": expert, "missing": dense}[damage]
    if damage.startswith("flip"):
        flip(target, 1000)  # inside the first tensor's data
    elif damage == "truncate":
        os.truncate(target, target.stat().st_size - 4096)
    else:
        target.unlink()
    rep = PackReader(p).verify()
    assert not rep.ok
    assert len(rep.problems) == 1 and str(target.relative_to(p)) in rep.problems[0], rep.problems
    assert {"flip": "blake3", "trun": "size", "miss": "missing"}[damage[:4]] in rep.problems[0]


# ---------------------------------------------------------------------------------------------
# resume after kill -9, refused re-runs, the lock

# The child converts with workers=1; each output file is held open a moment before it is renamed into place, so the
# kill lands part-way through the conversion (and usually part-way through a file) on any machine.
CHILD = textwrap.dedent("""
    import json, sys, time
    from moepack.formats import writer
    close = writer.AlignedFile.close
    writer.AlignedFile.close = lambda self: (time.sleep(0.02), close(self))[1]
    from moepack.convert.pipeline import convert
    from moepack.convert.recipe import Recipe
    convert(sys.argv[1], sys.argv[2], Recipe(**json.loads(sys.argv[3])), workers=1, progress=False)
""")


def _done(out: Path) -> list[Path]:
    return sorted((out / ".moepack" / "done").glob("*.json"))


def test_kill_and_resume(tmp_path):
    # Bigger than the tiny config: 3 layers x 32 experts, hidden 128 (~100 units, a few MB).
    src = build("qwen3_moe", tmp_path / "src", hidden_size=128, num_hidden_layers=3, num_experts=32)
    out, ref = tmp_path / "out", tmp_path / "ref"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(src), str(out), json.dumps(QUANT.to_json())],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while len(_done(out)) < 10:
            assert child.poll() is None, f"converter exited early:\n{child.stdout.read().decode()}"
            assert time.monotonic() < deadline, "converter made no progress"
            time.sleep(0.005)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    done = _done(out)
    assert 10 <= len(done) < 3 * 32
    finished = {rel: (out / rel).stat().st_ino for d in done for rel in json.loads(d.read_text()).get("files", {})}
    assert finished

    # Other arguments on a partial output are refused, and touch nothing.
    with pytest.raises(ConvertError, match="partial conversion.*same arguments.*--force"):
        convert(str(src), out, Recipe(expert_group_size=32, dense_group_size=32, expert_bits=8), progress=False)
    assert _done(out) == done

    # A second converter into the same OUT is refused while the first holds the lock.
    fd = os.open(out / ".moepack" / "lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConvertError, match="another moepack convert"):
            convert(str(src), out, QUANT, workers=1, progress=False)
    finally:
        os.close(fd)

    # Same arguments resume: finished units are kept (same inodes), the rest is done, and the result is
    # byte-identical to an uninterrupted conversion (made here with two worker processes).
    convert(str(src), out, QUANT, workers=1, progress=False)
    assert {rel: (out / rel).stat().st_ino for rel in finished} == finished
    convert(str(src), ref, QUANT, workers=2, progress=False)
    got, want = tree(out), tree(ref)
    assert sorted(got) == sorted(want) and "manifest.json" in got
    assert [k for k in got if got[k] != want[k]] == []
    assert PackReader(out).verify().ok


# The child converts with workers=1 and, the N-th time it reaches POINT, SIGKILLs itself (ACTION "kill") or waits
# until OUT.go exists (ACTION "pause", after touching OUT.paused). Points: "blob" (an array written into a file not
# yet renamed into place), "file" (a file renamed into place, its unit not yet recorded), "unit" (a unit recorded),
# "side" (half of a side file's .part written), "manifest" (half of manifest.json.tmp written), "tidy" (manifest.json
# in place, the resume state not yet removed).
POINT_CHILD = textwrap.dedent("""
    import json, os, signal, sys, time
    from pathlib import Path
    from moepack.convert import pipeline
    from moepack.convert.recipe import Recipe
    from moepack.formats import manifest, writer
    src, out, recipe, point, n, action = sys.argv[1:7]
    seen = {}

    def reached(name):
        seen[name] = seen.get(name, 0) + 1
        if name != point or seen[name] != int(n):
            return
        if action == "pause":
            Path(out + ".paused").touch()
            while not Path(out + ".go").exists():
                time.sleep(0.01)
        else:
            os.kill(os.getpid(), signal.SIGKILL)

    add, close, save, write_bytes = writer.AlignedFile.add, writer.AlignedFile.close, manifest.Manifest.save, \\
        writer.PackWriter.write_bytes

    def add_(self, *a, **k):
        blob = add(self, *a, **k)
        self._f.flush()
        reached("blob")
        return blob

    def write_bytes_(self, relpath, data):
        dst = self.root / relpath
        dst.with_name(dst.name + ".part").write_bytes(data[: len(data) // 2])
        reached("side")
        return write_bytes(self, relpath, data)

    class Bar:
        def __init__(self, *a, **k): pass
        def update(self, n=1): reached("unit")
        def close(self): pass

    atomic_write = manifest.atomic_write

    def half_then_whole(path, data, suffix=".part"):  # manifest.json.tmp half written, then the real write
        path.with_name(path.name + suffix).write_bytes(data[: len(data) // 2])
        reached("manifest")
        return atomic_write(path, data, suffix)

    writer.AlignedFile.add = add_
    writer.AlignedFile.close = lambda self: (close(self), reached("file"))[0]
    writer.PackWriter.write_bytes = write_bytes_
    manifest.Manifest.save = lambda self, p: (save(self, p), reached("tidy"))[0]
    manifest.atomic_write = half_then_whole
    pipeline.tqdm = Bar
    pipeline.convert(src, out, Recipe(**json.loads(recipe)), workers=1, progress=False)
""")
POINTS = ("blob", "file", "unit", "side", "manifest", "tidy")
KILL_SEEDS = int(os.environ.get("MOEPACK_KILL_SEEDS", "1"))  # raise for a longer sweep of kill points


def _point_child(src: Path, out: Path, point: str, n: int, action: str = "kill") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", POINT_CHILD, str(src), str(out), json.dumps(QUANT.to_json()), point,
                             str(n), action], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _times_reached(pack: Path) -> dict[str, int]:
    """How often a whole conversion reaches each point, counted from the finished pack's manifest."""
    m = json.loads((pack / "manifest.json").read_text())
    layouts = {k: sum(len(t["parts"]) for t in v["tensors"].values()) for k, v in m["expert_layouts"].items()}
    written = [f for f in m["files"] if f.startswith(("dense/", "experts/", "tables/"))]
    return {"blob": sum(len(r["parts"]) for r in m["dense"].values()) +
                    sum(layouts[el["layout"]] * len(el["files"]) for el in m["experts"]),
            "file": len(written), "unit": len(written) + len(m["provenance"]["source_files"]),
            "side": len(m["files"]) - len(written), "manifest": 1, "tidy": 1}


@pytest.mark.parametrize("seed", range(KILL_SEEDS))
@pytest.mark.parametrize("point", POINTS)
def test_killed_at_any_point_resumes_identical(ckpt, pack, tmp_path, point, seed):
    """kill -9 at the n-th arrival at a point (n drawn at random), the resume killed again at a random point, then a
    final resume: the pack verifies and is byte-identical to an uninterrupted conversion."""
    rng = random.Random(f"{point}/{seed}")
    n = rng.randint(1, _times_reached(pack)[point])
    out = tmp_path / "out"
    child = _point_child(ckpt, out, point, n)
    log = child.communicate(timeout=300)[0].decode()
    assert child.returncode == -signal.SIGKILL, f"not killed at {point} #{n}:\n{log}"
    assert (out / "manifest.json").exists() == (point == "tidy")  # the manifest appears whole, and last
    again = _point_child(ckpt, out, rng.choice(POINTS), 1)  # killed again on the way (if it gets there)
    log = again.communicate(timeout=300)[0].decode()
    assert again.returncode in (0, -signal.SIGKILL), log
    if again.returncode:  # (a resume that finished leaves a finished pack, which a re-run refuses to overwrite)
        convert(str(ckpt), out, QUANT, workers=1, progress=False)
    assert tree(out) == tree(pack)
    assert PackReader(out).verify().ok


def test_second_converter_process_refused(ckpt, pack, tmp_path):
    """While one converter is part-way (paused after its third unit), a second process converting into the same
    OUT is refused with a clear error and touches nothing; the first then finishes the same pack as ever."""
    out = tmp_path / "out"
    first = _point_child(ckpt, out, "unit", 3, action="pause")
    try:
        deadline = time.monotonic() + 120
        while not Path(f"{out}.paused").exists():
            assert first.poll() is None, first.stdout.read().decode()
            assert time.monotonic() < deadline, "the first converter never got going"
            time.sleep(0.01)
        before = tree(out)
        second = subprocess.run([sys.executable, "-m", "moepack.cli", "convert", str(ckpt), str(out),
                                 "--q-group-size", "32", "--dense-group-size", "32"], capture_output=True, text=True)
        assert second.returncode == 1
        assert f"error: another moepack convert is writing into {out}" in second.stderr, second.stderr
        assert tree(out) == before
        Path(f"{out}.go").touch()
        assert first.wait(timeout=300) == 0, first.stdout.read().decode()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert tree(out) == tree(pack)


def test_bad_alignment_refused_up_front():
    """Refused when the recipe is made, not after a conversion has recorded it (which would block the fixed re-run)."""
    for bad in (1000, 2048, 12288):
        with pytest.raises(ValueError, match="power of two"):
            Recipe(alignment=bad)


def test_finished_pack_not_overwritten(ckpt, tmp_path):
    out = convert(str(ckpt), tmp_path / "out", QUANT, progress=False)
    before = tree(out)
    with pytest.raises(ConvertError, match="finished pack.*--force"):
        convert(str(ckpt), out, EXACT, progress=False)
    assert tree(out) == before
    # force=True converts again, leaving nothing of the old pack behind (an expert file of a layer the new pack
    # has not, say) and removing nothing else: a file the user put there stays (issue #12).
    (out / "experts" / "099").mkdir()
    (out / "experts" / "099" / "0000.bin").write_bytes(b"x")
    (out / "experts" / "notes.txt").write_bytes(b"mine")
    convert(str(ckpt), out, EXACT, force=True, progress=False)
    assert (out / "experts" / "notes.txt").read_bytes() == b"mine"
    (out / "experts" / "notes.txt").unlink()
    assert tree(out) == tree(convert(str(ckpt), tmp_path / "fresh", EXACT, progress=False))
    check_pack(out, ckpt, EXACT)


# ---------------------------------------------------------------------------------------------
# bad sources: a SourceError that names the file, and no manifest.json


def _rewrite(path: Path, **changes: torch.Tensor) -> None:
    tensors = load_file(path)
    tensors.update(changes)
    save_file(tensors, path, metadata={"format": "pt"})


def _refused(src: Path, out: Path, error=SourceError, match: str | None = None) -> str:
    with pytest.raises(error, match=match) as e:
        convert(str(src), out, QUANT, progress=False)
    assert not (out / "manifest.json").exists()
    return str(e.value)


def test_missing_shard(src, tmp_path):
    shards = reshard(src, 3)
    (src / shards[1]).unlink()
    msg = _refused(src, tmp_path / "out")
    assert shards[1] in msg and "model.safetensors.index.json" in msg


def test_truncated_shard(src, tmp_path):
    shards = reshard(src, 2)
    p = src / shards[1]
    os.truncate(p, p.stat().st_size - 100)
    msg = _refused(src, tmp_path / "out")
    assert str(p) in msg and "truncated" in msg


def test_expert_shape_mismatch(src, tmp_path):
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    _rewrite(src / "model.safetensors", **{name: torch.zeros(16, 64)})  # config says moe_intermediate_size=32
    msg = _refused(src, tmp_path / "out")
    assert str(src / "model.safetensors") in msg and name in msg and "(16, 64)" in msg and "(32, 64)" in msg


@pytest.mark.parametrize("dtype,spelled", [(torch.int64, "int64"), (torch.float8_e4m3fn, "float8")])
def test_unreadable_dtype(src, tmp_path, dtype, spelled):
    """int64 weights, and (for now) FP8 ones: once FP8 sources are supported, this case becomes an FP8 source
    without its weight_scale_inv tensors."""
    name = "model.layers.0.mlp.experts.2.gate_proj.weight"
    _rewrite(src / "model.safetensors", **{name: torch.ones(32, 64).to(dtype)})
    msg = _refused(src, tmp_path / "out")
    assert str(src / "model.safetensors") in msg and name in msg and spelled in msg


def test_unsupported_architecture(src, tmp_path):
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    msg = _refused(src, tmp_path / "out", UnsupportedArchitecture, "'llama' is not supported")
    assert all(t in msg for t in SUPPORTED)


# ---------------------------------------------------------------------------------------------
# a full disk


class _Full:
    """A file on a disk that fills up: the first write puts a few bytes down, then fails with ENOSPC."""

    def __init__(self, f):
        self._f = f

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def write(self, data):
        self._f.write(data[:10] if isinstance(data, str) else bytes(memoryview(data).cast("B")[:10]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("fills_at", ["experts/001/0002.bin", "config.json", "manifest.json"])
def test_disk_full_then_resume(src, tmp_path, monkeypatch, fills_at):
    """ENOSPC part-way (an expert file, a side file after every unit is done, or the manifest itself) gives an error
    that says to free space and re-run, leaves no half-written file; the re-run finishes the same pack."""
    out = tmp_path / "out"

    def open_on_full_disk(path, mode="r", *a, **k):
        f = open(path, mode, *a, **k)
        return _Full(f) if str(path).endswith((fills_at + ".part", fills_at + ".tmp")) else f

    for module in (writer, manifest):  # the writer's and the manifest's builtin open, nobody else's
        monkeypatch.setattr(module, "open", open_on_full_disk, raising=False)
    with pytest.raises(MoepackError, match="(?i)disk full.*free space.*re-run"):
        convert(str(src), out, QUANT, workers=1, progress=False)
    assert not (out / "manifest.json").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith((".part", ".tmp"))]
    assert _done(out)
    monkeypatch.undo()
    convert(str(src), out, QUANT, workers=1, progress=False)
    assert tree(out) == tree(convert(str(src), tmp_path / "ref", QUANT, progress=False))
