"""Packs as untrusted input, and expert files that fail while a model runs (RELIABILITY.md lists every case).

Oracles: a bad pack must raise a MoepackError that names the field or file, never another exception, hang or read
outside the pack (an audit hook records every file opened); a pack that loads must give the reference logits
whenever what it changed cannot matter. Crash-safety of the converter is in test_convert_faults.py.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import moepack
from moepack.cli import main
from moepack.convert.pipeline import convert
from moepack.convert.source import Checkpoint
from moepack.demo import SyntheticSpec, write_checkpoint
from moepack.errors import ExpertReadError, MoepackError, PackError, SourceError
from moepack.formats.reader import PackReader
from moepack.runtime import io as mio
from conftest import flip, minimum_budget, opening_nothing_under

SPEC = SyntheticSpec(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                     num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, vocab_size=512, seed=5)
PROMPT = [3, 17, 100, 42, 7, 250, 9, 64]
BUDGET = 64 << 20
EXAMPLES = int(os.environ.get("MOEPACK_FUZZ_EXAMPLES", "40"))  # raise for a longer fuzzing run
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reliability")
    ckpt = write_checkpoint(root / "ckpt", SPEC)
    return convert(str(ckpt), root / "pack", progress=False, workers=1)


@pytest.fixture(scope="module")
def ref(pack) -> np.ndarray:
    eng = moepack.load(pack, memory_budget=BUDGET, heat=False)
    try:
        return eng.logits(PROMPT)
    finally:
        eng.close()


@pytest.fixture(scope="module")
def work(pack, tmp_path_factory) -> Path:
    """A copy of the pack beside a secret file it must never read, with a symlink in the pack pointing at it."""
    root = tmp_path_factory.mktemp("work")
    (root / "outside").mkdir()
    (root / "outside" / "secret.bin").write_bytes(b"\x7f" * (1 << 16))
    dst = Path(shutil.copytree(pack, root / "pack"))
    os.symlink("../outside/secret.bin", dst / "link.bin")
    return dst


def run(path: Path, **kw) -> np.ndarray | MoepackError:
    """Load ``path`` and compute the prompt's logits; a MoepackError is returned, any other exception raised."""
    try:
        eng = moepack.load(path, memory_budget=BUDGET, heat=False, **kw)
    except MoepackError as e:
        return e
    try:
        return eng.logits(PROMPT)
    except MoepackError as e:
        return e
    finally:
        eng.close()


def run_audited(path: Path, outside: Path) -> np.ndarray | MoepackError:
    return opening_nothing_under(outside, lambda: run(path))


def manifest_of(pack: Path) -> dict:
    return json.loads((pack / "manifest.json").read_text())


def write_manifest(pack: Path, m) -> None:
    (pack / "manifest.json").write_text(json.dumps(m))


def refused(work: Path, m: dict) -> str:
    write_manifest(work, m)
    with pytest.raises(PackError) as e:
        PackReader(work)
    return str(e.value)


# ---------------------------------------------------------------------------------------------
# the manifest, field by field

def _expert_file(m: dict, layer_i: int = 0, e: int = 1) -> str:
    return m["experts"][layer_i]["files"][e]


def _first_dense(m: dict) -> tuple[str, dict]:
    name = "model.norm.weight"
    return name, m["dense"][name]


def _set(m: dict, path: tuple, value) -> dict:
    node = m
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return m


def _rename_file(m: dict, old: str, new: str) -> dict:
    m["files"][new] = m["files"].pop(old)
    for el in m["experts"]:
        el["files"] = [new if f == old else f for f in el["files"]]
    return m


CASES = {  # name -> (mutation of the manifest dict, what the error must say)
    "newer format": (lambda m: _set(m, ("format_version",), 3), r"format version 3 is not supported"),
    "bool version": (lambda m: _set(m, ("format_version",), True), r"format version True is not supported"),
    "not moepack": (lambda m: _set(m, ("format",), "gguf"), r"not a moepack manifest"),
    "dot-dot path": (lambda m: _rename_file(m, _expert_file(m), "../outside/secret.bin"),
                     r'files\["\.\./outside/secret\.bin"\]: .*outside itself'),
    "absolute path": (lambda m: _rename_file(m, _expert_file(m), "/etc/passwd"), r"absolute path"),
    "dense offset past end": (lambda m: _set(m, ("dense", "model.norm.weight", "parts", "data", "offset"), 1 << 40),
                              r'dense\["model\.norm\.weight"\]\.parts\.data\.offset: .*run past the end'),
    "length vs shape": (lambda m: _set(m, ("dense", "model.norm.weight", "parts", "data", "length"), 64),
                        r'dense\["model\.norm\.weight"\]\.parts\.data\.length: 64 bytes, but shape \[64\] of '
                        r'bfloat16 holds 128'),
    "unknown dtype": (lambda m: _set(m, ("dense", "model.norm.weight", "parts", "data", "dtype"), "float128"),
                      r"parts\.data\.dtype: unknown dtype 'float128'"),
    "negative dim": (lambda m: _set(m, ("dense", "model.norm.weight", "shape"), [-64]),
                     r'dense\["model\.norm\.weight"\]\.shape\[0\]: -64 is out of range'),
    "absurd shape": (lambda m: _set(m, ("dense", "model.norm.weight", "parts", "data", "shape"), [1 << 40, 1 << 40]),
                     r"holds 2417851639229258349412352"),
    "bad bits": (lambda m: _set(m, ("expert_layouts", "layout0", "tensors", "gate", "bits"), 7),
                 r'expert_layouts\["layout0"\]\.tensors\["gate"\]\.bits: 7 is not one of'),
    "part shape vs bits": (lambda m: _set(m, ("expert_layouts", "layout0", "tensors", "gate", "bits"), 8),
                           r'tensors\["gate"\]\.parts\.weight\.shape: is \[32, 8\]; .* stores \[32, 16\]'),
    "unaligned layout": (lambda m: _set(m, ("expert_layouts", "layout0", "length"), 16384 * 3 + 4096),
                         r'expert_layouts\["layout0"\]\.length: .*not a multiple of the alignment'),
    "oversized layout": (lambda m: _set(m, ("expert_layouts", "layout0", "length"), 16384 * 1000),
                         r'expert_layouts\["layout0"\]\.length: 16384000 bytes, but .* need at most 49152'),
    "layer twice": (lambda m: _set(m, ("experts", 1, "layer"), m["experts"][0]["layer"]), r"experts\[1\]\.layer: layer 0 is listed twice"),
    "too few files": (lambda m: _set(m, ("experts", 0, "files"), m["experts"][0]["files"][:3]),
                      r"experts\[0\]\.files: lists 3 files for architecture\.num_experts=4"),
    "shared file": (lambda m: _set(m, ("experts", 0, "files", 2), m["experts"][0]["files"][1]),
                    r"experts\[0\]\.files\[2\]: .* is the file of another expert too"),
    "unlisted file": (lambda m: _set(m, ("experts", 1, "files", 0), "experts/009/0000.bin"),
                      r"experts\[1\]\.files\[0\]: 'experts/009/0000.bin' is not a file listed in files"),
    "top_k > experts": (lambda m: _set(m, ("architecture", "top_k"), 5), r"architecture\.top_k: 5 is out of range \[1, 4\]"),
    "missing section": (lambda m: m.pop("expert_layouts") and m, r"expert_layouts: is missing"),
    "bad digest": (lambda m: _set(m, ("files", "config.json", "blake3"), "xyz"), r'files\["config\.json"\]\.blake3'),
    "wrong type": (lambda m: _set(m, ("experts",), {"0": 1}), r"experts: must be a list"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_manifest_field_is_named(work, pack, case):
    mutate, expect = CASES[case]
    msg = refused(work, mutate(manifest_of(pack)))
    assert re.search(expect, msg), msg
    write_manifest(work, manifest_of(pack))


@pytest.mark.parametrize("text,expect", [
    ('{"format": "moepack", "format": "moepack"}', r'key "format" appears twice'),
    ("[" * 100_000 + "]" * 100_000, r"far more than a manifest holds"),  # refused before parsing
    (" " * 8 * 100_000 + "[" * 100_000 + "]" * 100_000, r"not valid manifest JSON: RecursionError"),
    ('{"format": NaN}', r"NaN is not a JSON value"),
    (b"\xff\xfe garbage", r"not valid manifest JSON"),
    ("[1, 2]", r"must be a JSON object"),
])
def test_malformed_manifest_json(work, pack, text, expect):
    (work / "manifest.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(PackError, match=expect):
        PackReader(work)
    write_manifest(work, manifest_of(pack))


def test_config_must_agree_with_manifest(work, pack):
    cfg = json.loads((pack / "config.json").read_text())
    try:
        for bad, expect in [({**cfg, "num_experts": 8}, r"num_experts is 8 but manifest\.json's architecture"),
                            ({**cfg, "num_hidden_layers": 10**12}, r"num_hidden_layers 1000000000000 is out of range"),
                            ({**cfg, "num_experts_per_tok": "two"}, r"top_k is two, not a whole number"),
                            ({**cfg, "hidden_size": "64"}, r"hidden_size is 64, not a whole number"),
                            ([1, 2, 3], r"must be a JSON object")]:
            (work / "config.json").write_text(json.dumps(bad))
            with pytest.raises(PackError, match=expect):
                PackReader(work)
        (work / "config.json").unlink()
        with pytest.raises(PackError, match=r"config\.json: cannot read it"):
            PackReader(work)
    finally:
        shutil.copy(pack / "config.json", work / "config.json")
    assert PackReader(work).manifest


@pytest.mark.parametrize("kind", ["file-symlink", "dir-symlink", "fifo", "manifest-fifo", "manifest-symlink"])
def test_tree_escapes_and_special_files_refused(work, pack, kind):
    """Symlinks may not lead out of the pack; a FIFO in place of a file is refused, never opened (it would block)."""
    target = work / _expert_file(manifest_of(pack))
    layer_dir = target.parent
    saved = work.parent / "saved"
    try:
        if kind == "file-symlink":
            target.unlink()
            os.symlink(work.parent / "outside" / "secret.bin", target)
        elif kind == "dir-symlink":
            layer_dir.rename(saved)
            os.symlink(saved, layer_dir)  # the whole layer directory now lives outside the pack
        elif kind == "fifo":
            target.unlink()
            os.mkfifo(target)
        elif kind == "manifest-fifo":
            (work / "manifest.json").unlink()
            os.mkfifo(work / "manifest.json")
        else:
            (work.parent / "outside" / "manifest.json").write_text(json.dumps(manifest_of(pack)))
            (work / "manifest.json").unlink()
            os.symlink(work.parent / "outside" / "manifest.json", work / "manifest.json")
        expect = {"fifo": "not a regular file", "manifest-fifo": "not a regular file"}.get(kind, "leads outside the pack")
        with pytest.raises(PackError, match=expect):
            PackReader(work)
        assert isinstance(run_audited(work, work.parent / "outside"), PackError)
    finally:
        if kind == "dir-symlink":
            layer_dir.unlink()
            saved.rename(layer_dir)
        elif kind.startswith("manifest"):
            (work / "manifest.json").unlink()
            write_manifest(work, manifest_of(pack))
        else:
            target.unlink()
            shutil.copy(pack / target.relative_to(work), target)
    assert PackReader(work).verify().ok


def test_symlink_inside_pack_is_fine(work, pack, ref):
    rel = _expert_file(manifest_of(pack))
    target = work / rel
    moved = work / "elsewhere.bin"
    target.rename(moved)
    try:
        os.symlink(os.path.relpath(moved, target.parent), target)
        np.testing.assert_array_equal(run(work), ref)
    finally:
        target.unlink()
        moved.rename(target)


# ---- property-based: random mutations of a valid manifest ------------------------------------

def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


NASTY = st.one_of(
    st.integers(-(1 << 70), 1 << 70),
    st.sampled_from([0, 1, -1, 63, 64, 4096, 16384, 1 << 31, 1 << 32, 1 << 63, 1 << 64, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(), st.text(max_size=12),
    st.sampled_from(["../outside/secret.bin", "@SECRET", "link.bin", "experts/../../outside/secret.bin",
                     "experts//0000.bin", "./config.json", "a\x00b", "manifest.json", "", "uint32", "float64",
                     "affine", "mxfp4", "raw", "layout0", "config.json", "dense/dense-00000.bin"]),
    st.lists(st.integers(-3, 1 << 33), max_size=4),
    st.sampled_from([{}, {"x": 1}, {"offset": 0, "length": 0}]),
)
MUTATION = st.one_of(
    st.tuples(st.just("set"), st.floats(0, 1), NASTY),
    st.tuples(st.just("tweak"), st.floats(0, 1), st.integers(-70000, 70000)),
    st.tuples(st.just("delete"), st.floats(0, 1), st.none()),
    st.tuples(st.just("swap"), st.floats(0, 1), st.floats(0, 1)),
)
IGNORED = ("provenance", "extra", "blake3", "source_encoding", "carried", "model_type", "vocab_size")


def mutate(m: dict, mutations: list, secret: str) -> dict:
    m = copy.deepcopy(m)
    for op, where, arg in mutations:
        paths = [p for p in _paths(m) if p]
        if op == "tweak":
            paths = [p for p in paths if type(_get(m, p)) is int] or paths
        path = paths[int(where * (len(paths) - 1))]
        parent, key = _get(m, path[:-1]), path[-1]
        if op == "set":
            parent[key] = secret if arg == "@SECRET" else arg
        elif op == "tweak" and type(parent[key]) is int:
            parent[key] += arg
        elif op == "delete":
            del parent[key]
        elif op == "swap":
            other = paths[int(arg * (len(paths) - 1))]
            if other[: len(path)] != path and path[: len(other)] != other:  # neither inside the other
                op_parent, op_key = _get(m, other[:-1]), other[-1]
                parent[key], op_parent[op_key] = op_parent[op_key], parent[key]
    return m


def _get(m, path):
    for k in path:
        m = m[k]
    return m


def meaning(m) -> object:
    """What of a manifest can change the model's output: all but provenance, hashes and descriptive fields."""
    if isinstance(m, dict):
        return {k: meaning(v) for k, v in m.items() if k not in IGNORED}
    if isinstance(m, list):
        return [meaning(v) for v in m]
    return m


@FUZZ
@given(mutations=st.lists(MUTATION, min_size=1, max_size=3))
def test_mutated_manifest_refused_or_correct(work, pack, ref, mutations):
    original = manifest_of(pack)
    m = mutate(original, mutations, str(work.parent / "outside" / "secret.bin"))
    write_manifest(work, m)
    try:
        out = run_audited(work, work.parent / "outside")
    finally:
        write_manifest(work, original)
    event("refused" if isinstance(out, MoepackError) else "loaded, same meaning" if meaning(m) == meaning(original)
          else "loaded, other meaning")
    if isinstance(out, MoepackError):
        return
    assert out.shape == ref.shape
    if meaning(m) == meaning(original):
        np.testing.assert_array_equal(out, ref)


# ---- property-based: damaged pack files ------------------------------------------------------

DAMAGE = ["truncate", "extend", "delete", "zero", "symlink-out", "directory"]


@FUZZ
@given(which=st.floats(0, 1), how=st.sampled_from(DAMAGE), at=st.floats(0, 1))
def test_damaged_file_refused_or_correct(work, pack, ref, which, how, at):
    """Any one file of the pack damaged: a MoepackError naming it, or (it was not needed) the reference logits."""
    write_manifest(work, manifest_of(pack))
    files = sorted(manifest_of(pack)["files"])
    rel = files[int(which * (len(files) - 1))]
    path = work / rel
    size = path.stat().st_size
    try:
        if how == "truncate":
            os.truncate(path, int(at * size))
        elif how == "extend":
            with open(path, "ab") as f:
                f.write(b"\x01" * (1 + int(at * 20000)))
        elif how == "zero":
            with open(path, "r+b") as f:
                f.seek(int(at * max(size - 4096, 0)))
                f.write(bytes(4096))
        elif how in ("delete", "symlink-out", "directory"):
            path.unlink()
            if how == "symlink-out":
                os.symlink(work.parent / "outside" / "secret.bin", path)
            elif how == "directory":
                path.mkdir()
        out = run_audited(work, work.parent / "outside")
    finally:
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink(missing_ok=True)
        shutil.copy(pack / rel, path)
    if isinstance(out, MoepackError):
        assert rel in str(out), out
    elif how != "zero":  # zeroed bytes of a needed tensor change the output; only --verify notices
        np.testing.assert_array_equal(out, ref)


# ---- property-based: the converter's safetensors header parser -------------------------------

@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    import mlx.core as mx

    root = tmp_path_factory.mktemp("shard")
    (root / "config.json").write_text("{}")
    mx.save_safetensors(str(root / "model.safetensors"), {"a": mx.ones((4, 8)), "b": mx.zeros((3,), dtype=mx.int32),
                                                           "c": mx.ones((2, 2), dtype=mx.bfloat16)})
    return root / "model.safetensors"


@FUZZ
@given(mutations=st.lists(MUTATION, min_size=1, max_size=3), flips=st.lists(st.tuples(st.floats(0, 1),
       st.integers(0, 255)), max_size=3), prefix=st.one_of(st.none(), st.integers(0, (1 << 64) - 1)),
       cut=st.one_of(st.none(), st.floats(0, 1)))
def test_mutated_safetensors_header(shard, tmp_path_factory, mutations, flips, prefix, cut):
    """A mutated header (as JSON, as bytes, its length prefix, the file cut short): SourceError, or a parse that
    matches the header and lies within the file."""
    data = shard.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = mutate(json.loads(data[8 : 8 + n]), mutations, "x")
    body = json.dumps(header).encode()
    raw = bytearray(len(body).to_bytes(8, "little") + body + data[8 + n :])
    for where, byte in flips:
        raw[int(where * (8 + len(body) - 1))] = byte
    if prefix is not None:
        raw[:8] = prefix.to_bytes(8, "little")
    if cut is not None:
        raw = raw[: int(cut * len(raw))]
    root = tmp_path_factory.mktemp("fuzzed")
    (root / "config.json").write_text("{}")
    (root / "model.safetensors").write_bytes(bytes(raw))
    try:
        infos = Checkpoint(root).tensors
    except SourceError:
        return
    n = int.from_bytes(raw[:8], "little")
    parsed = json.loads(bytes(raw[8 : 8 + n]))
    assert set(infos) == set(parsed) - {"__metadata__"}
    for name, info in infos.items():
        begin, end = parsed[name]["data_offsets"]
        assert list(info.shape) == parsed[name]["shape"] and info.offset == 8 + n + begin
        assert 0 <= begin <= end and info.nbytes == end - begin and 8 + n + end <= len(raw)


# ---------------------------------------------------------------------------------------------
# faults while running: an expert file truncated, deleted, unreadable (EIO) or corrupt after load


class FlakyOs:
    """moepack.runtime.io's view of ``os``: reads of ``victim`` fail with EIO, like a dying disk."""

    def __init__(self, victim: str):
        self.victim, self.fds = victim, {}

    def __getattr__(self, name):
        return getattr(os, name)

    def open(self, path, flags, *args):
        fd = os.open(path, flags, *args)
        self.fds[fd] = str(path)
        return fd

    def preadv(self, fd, buffers, offset):
        if self.fds.get(fd) == self.victim:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return os.preadv(fd, buffers, offset)


@pytest.mark.parametrize("fault", ["truncated", "deleted", "eio", "corrupt-verify"])
def test_expert_fault_fails_one_call_and_store_recovers(pack, ref, tmp_path, monkeypatch, fault):
    p = Path(shutil.copytree(pack, tmp_path / "pack"))
    minimum = minimum_budget(p)
    eng = moepack.load(p, memory_budget=minimum, heat=False, verify=fault == "corrupt-verify")  # top_k slots
    try:
        tokens = list(eng.generate(PROMPT, 4))
        eng.store.heat.clear()
        np.testing.assert_array_equal(eng.logits(PROMPT), ref)
        # An expert this prompt needs that is not resident now, so the next pass must read it again.
        victim = next(k for k in sorted(eng.store.heat) if k not in eng.store.resident())
        path = eng.reader.expert_file(*victim)
        original = path.read_bytes()
        if fault == "truncated":
            path.write_bytes(original[:4096])
        elif fault == "deleted":
            path.unlink()
        elif fault == "eio":
            monkeypatch.setattr(mio, "os", FlakyOs(str(path)))
        else:  # verify checks a file the first time it is read: a fresh engine has not read this one yet
            flip(path, 100, 0x40)
            eng.close()
            eng = moepack.load(p, memory_budget=minimum, heat=False, verify=True)
        store = eng.store
        for _ in range(2):  # and again: the failed read left nothing behind that passes for the expert
            with pytest.raises(ExpertReadError, match=re.escape(str(path))) as e:
                eng.logits(PROMPT)
            assert isinstance(e.value, MoepackError) and e.value.filename == str(path)
            assert victim not in store.resident()
        # The store stays usable: a full pool's worth of other experts of that layer loads in one call.
        others = [x for x in range(SPEC.num_experts) if x != victim[1]][: store.n_slots]
        assert len(store.fetch(victim[0], others)) == len(others)
        # Repaired, the same engine gives the reference again.
        monkeypatch.undo()
        path.write_bytes(original)
        np.testing.assert_array_equal(eng.logits(PROMPT), ref)
        assert list(eng.generate(PROMPT, 4)) == tokens
    finally:
        eng.close()


def test_verify_checks_each_expert_once_and_dense_at_load(pack, ref, tmp_path):
    p = Path(shutil.copytree(pack, tmp_path / "pack"))
    eng = moepack.load(p, memory_budget=BUDGET, heat=False, verify=True)
    try:
        np.testing.assert_array_equal(eng.logits(PROMPT), ref)
        used = sorted(eng.store.heat)
        assert eng.store._verified == set(used)  # every expert read was checked
        victim = used[0]
        rel = str(eng.reader.expert_file(*victim).relative_to(p))
    finally:
        eng.close()
    # An expert the prompt needs, corrupted on disk: silently different without verify, a clear error with it.
    flip(p / rel, 100, 0x40)
    assert isinstance(run(p), np.ndarray)
    out = run(p, verify=True)
    assert isinstance(out, ExpertReadError) and rel in str(out) and "blake3 mismatch" in str(out), out
    # A dense file corrupted: refused at load with verify, naming the file.
    m = manifest_of(p)
    shutil.copy(pack / rel, p / rel)
    dense = next(f for f in m["files"] if f.startswith("dense/"))
    flip(p / dense, 10, 0x40)
    out = run(p, verify=True)
    assert isinstance(out, PackError) and dense in str(out) and "blake3" in str(out)


def test_cli_generate_verify(pack, tmp_path):
    p = Path(shutil.copytree(pack, tmp_path / "pack"))
    runner = CliRunner()
    ok = runner.invoke(main, ["generate", str(p), "-p", "Hello", "--max-tokens", "3", "--verify",
                              "--memory-budget", str(BUDGET)])
    assert ok.exit_code == 0, ok.output
    for rel in manifest_of(p)["files"]:
        if rel.startswith("experts/"):
            flip(p / rel, 100, 0x40)  # every expert corrupt: whatever the routing, the first read fails
    bad = runner.invoke(main, ["generate", str(p), "-p", "Hello", "--max-tokens", "3", "--verify",
                               "--memory-budget", str(BUDGET)])
    assert bad.exit_code == 1 and "error:" in bad.output and "blake3 mismatch" in bad.output, bad.output


def test_warm_start_skips_a_damaged_expert(pack, tmp_path):
    p = Path(shutil.copytree(pack, tmp_path / "pack"))
    eng = moepack.load(p, memory_budget=BUDGET, heat=False)
    try:
        eng.reader.expert_file(0, 1).unlink()
        assert eng.store.preload([(0, 1), (0, 2)]) == 1  # the heat profile's damaged expert is skipped, not fatal
        assert eng.store.resident() == {(0, 2)}
    finally:
        eng.close()
