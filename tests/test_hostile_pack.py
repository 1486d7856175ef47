"""Side files of a pack as untrusted input (issue #12): every file opened from a pack goes through
formats/files.py (no symlink out, regular files only, bounded size), --verify covers each of them, strange JSON
and templates are one-line errors, and the manifest's cost in time and memory is bounded.

Oracle: a MoepackError naming the file (the CLI: one line, exit 1, no traceback), and an audit hook that records
every file this process opens, so "refused before opening anything outside the pack" is checked, not assumed.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import tracemalloc
from pathlib import Path

import pytest
from click.testing import CliRunner

from moepack.cli import main
from moepack.errors import MoepackError, PackError
from moepack.formats.files import read_pack_file
from moepack.formats.reader import PackReader
from moepack.runtime import heat
from moepack.runtime.tokenizer import Tokenizer
from conftest import opening_nothing_under

SIDE_FILES = ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "heat.json"]


@pytest.fixture
def copy(pack, tmp_path) -> Path:
    """A private copy of the tiny pack, beside a secret it must never read."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("MOEPACK_API_KEY=hunter2\n")
    return Path(shutil.copytree(pack, tmp_path / "pack"))


def audited(fn, outside: Path):
    """Run ``fn``; fail if it opened anything under ``outside``. Returns its result or the MoepackError it raised."""
    def run():
        try:
            return fn()
        except MoepackError as e:
            return e

    return opening_nothing_under(outside, run)


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.mark.parametrize("name", SIDE_FILES)
def test_side_file_symlinked_out_of_the_pack_is_never_opened(copy, name):
    target = copy / name
    target.unlink(missing_ok=True)
    os.symlink("../outside/secret", target)
    if name == "heat.json":
        got = audited(lambda: heat.load(PackReader(copy)), copy.parent / "outside")
        assert got == []  # skipped with a warning: a profile only warms the pool
        return
    got = audited(lambda: Tokenizer(copy), copy.parent / "outside")
    assert isinstance(got, PackError) and "leads outside the pack" in str(got), got


@pytest.mark.parametrize("name", ["chat_template.jinja", "tokenizer.json", "config.json"])
def test_generate_refuses_a_side_file_leading_out_in_one_line(copy, name):
    (copy / name).unlink(missing_ok=True)
    os.symlink("../outside/secret", copy / name)
    r = audited(lambda: CliRunner().invoke(main, ["generate", str(copy), "-p", "hi", "--max-tokens", "2"]),
                copy.parent / "outside")
    assert "leads outside the pack" in one_line_error(r)


@pytest.mark.parametrize("name", ["chat_template.jinja", "tokenizer_config.json"])
def test_a_fifo_side_file_is_refused_without_blocking(copy, name):
    (copy / name).unlink(missing_ok=True)
    os.mkfifo(copy / name)
    out: list = []
    t = threading.Thread(target=lambda: out.append(audited(lambda: Tokenizer(copy), copy.parent / "outside")),
                         daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "opening a FIFO side file blocked"
    assert isinstance(out[0], PackError) and "not a regular file" in str(out[0])


def test_oversized_side_file_refused(copy):
    (copy / "chat_template.jinja").write_text("{{ 'x' }}" * (1 << 18))  # 2.25 MiB > 1 MiB
    with pytest.raises(PackError, match="implausibly large"):
        Tokenizer(copy)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"])
def test_verify_covers_every_file_the_run_opens(copy, name):
    path = copy / name
    path.write_text(json.dumps(json.loads(path.read_text()), separators=(",", ":")))  # same JSON, other bytes
    assert PackReader(copy).verify().problems  # `moepack verify` reported it before; --verify now does too
    with pytest.raises(PackError, match="blake3 mismatch"):
        Tokenizer(copy, verify=True)
    r = CliRunner().invoke(main, ["generate", str(copy), "-p", "hi", "--max-tokens", "2", "--verify"])
    assert "blake3 mismatch" in one_line_error(r)


def test_verify_covers_the_template(pack, tmp_path):
    """A pack converted with a chat_template.jinja: that file is in the manifest and --verify checks it."""
    from moepack.convert.pipeline import convert
    from moepack.demo import SyntheticSpec, write_checkpoint

    ckpt = write_checkpoint(tmp_path / "ckpt", SyntheticSpec(hidden_size=64, num_hidden_layers=1, num_experts=4,
                                                            num_experts_per_tok=2, moe_intermediate_size=32,
                                                            num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                                            vocab_size=512))
    (ckpt / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    out = convert(str(ckpt), tmp_path / "p", progress=False, workers=1)
    assert "chat_template.jinja" in PackReader(out).manifest.files
    Tokenizer(out, verify=True)
    (out / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}!")
    with pytest.raises(PackError, match="blake3 mismatch"):
        Tokenizer(out, verify=True)


@pytest.mark.parametrize("name,text,expect", [
    ("tokenizer_config.json", "[1, 2]", "must be a JSON object"),
    ("tokenizer_config.json", '"text"', "must be a JSON object"),
    ("generation_config.json", "[]", "must be a JSON object"),
    ("generation_config.json", '{"eos_token_id": "x"}', "is not a token id"),
    ("generation_config.json", '{"eos_token_id": NaN}', "NaN is not a JSON value"),
    ("tokenizer_config.json", '{"chat_template": [1, 2]}', "chat_template must be text or a list"),
    ("tokenizer_config.json", '{"chat_template": 42}', "chat_template must be text or a list"),
    ("chat_template.jinja", "{% for m in messages %}", "chat template does not compile"),
    ("chat_template.jinja", b"\xff\xfe", "not UTF-8"),
    ("tokenizer.json", "{}", "not a tokenizer the tokenizers library can load"),
])
def test_strange_tokenizer_files_are_one_line_errors(copy, name, text, expect):
    (copy / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(PackError, match=expect):
        Tokenizer(copy)
    r = CliRunner().invoke(main, ["generate", str(copy), "-p", "hi", "--chat", "--max-tokens", "2"])
    assert expect.split()[0] in one_line_error(r)


def test_template_raise_exception_is_one_line(copy):
    (copy / "chat_template.jinja").write_text("{{ raise_exception('system messages are not supported') }}")
    r = CliRunner().invoke(main, ["generate", str(copy), "-p", "hi", "--chat", "--max-tokens", "2"])
    assert "system messages are not supported" in one_line_error(r)


@pytest.mark.parametrize("profile", [
    b"not json", b"[1, 2]", b'{"experts": [[0, 99, 1]]}', b'{"experts": [[0, -1, 1]]}', b'{"experts": [["a", 0, 1]]}',
    b'{"experts": [[7, 0, 1]]}', b'{"experts": {}}',
])
def test_malformed_heat_profile_skipped_with_a_warning(copy, profile, caplog):
    import moepack

    (copy / "heat.json").write_bytes(profile)
    with caplog.at_level("WARNING"):
        assert heat.load(PackReader(copy), copy / "heat.json") == []
        with moepack.load(copy, heat=copy / "heat.json") as eng:
            assert eng.store.resident() == set()
    assert "heat profile" in caplog.text and "skipped" in caplog.text


def test_heat_profile_of_this_pack_still_warms(copy):
    import moepack

    (copy / "heat.json").write_text(json.dumps({"experts": [[0, 1, 5], [1, 2, 3]]}))
    with moepack.load(copy, heat=copy / "heat.json") as eng:
        assert eng.store.resident() == {(0, 1), (1, 2)}


# ---- the manifest's cost ------------------------------------------------------------------------


def test_duplicate_keys_refused_in_linear_time(copy):
    """200,000 keys with the repeat at the end: the old quadratic search would take hours, the set a blink."""
    keys = ", ".join(f'"k{i}": 0' for i in range(200_000))
    (copy / "manifest.json").write_text('{"format": "moepack", "x": {' + keys + ', "k199999": 1}}')
    done: list = []
    t = threading.Thread(target=lambda: done.append(pytest.raises(PackError, PackReader, copy)), daemon=True)
    t.start()
    t.join(60)
    assert done and 'key "k199999" appears twice' in str(done[0].value)


def test_manifest_of_empty_lists_refused_before_it_is_parsed(copy):
    """[[],[],...] costs ~20x its size once parsed (the 255 MB case took 6.3 GB); refused from a count of its
    separators, so parsing never starts."""
    (copy / "manifest.json").write_bytes(b"[" + b"[]," * (8 << 20) + b"[]]")  # 24 MiB, under the byte cap
    tracemalloc.start()
    try:
        with pytest.raises(PackError, match="far more than a manifest holds"):
            PackReader(copy)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak  # the file's bytes once (24 MiB), not ~500 MB of list objects


def test_manifest_over_the_byte_cap_refused_without_reading(copy):
    with open(copy / "manifest.json", "wb") as f:
        f.truncate(33 << 20)  # sparse: nothing to read, only its size
    with pytest.raises(PackError, match="implausibly large"):
        PackReader(copy)


@pytest.mark.parametrize("alignment", [1 << 22, 1 << 30])
def test_alignment_above_two_mib_refused(copy, alignment):
    m = json.loads((copy / "manifest.json").read_text())
    m["alignment"] = alignment
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackError, match=r"alignment: \d+ is out of range \[4096, 2097152\]"):
        PackReader(copy)


def test_read_pack_file_refuses_escaping_names(copy):
    for rel in ("../outside/secret", "/etc/passwd", "a/../../outside/secret"):
        with pytest.raises(PackError):
            read_pack_file(copy, rel, 1 << 20)


# ---- expert files that are not files --------------------------------------------------------------


def in_thread(fn, timeout: float = 60):
    """``fn()`` in a daemon thread; fails if it is still running after ``timeout`` (a hang), else its outcome."""
    out: list = []

    def run():
        try:
            out.append(fn())
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{fn} hung"
    return out[0]


def test_expert_file_replaced_by_a_fifo_fails_the_read_and_shutdown_works(copy):
    import moepack
    from moepack.errors import ExpertReadError

    eng = moepack.load(copy, heat=False)
    path = eng.reader.expert_file(0, 1)
    saved = path.read_bytes()
    path.unlink()
    os.mkfifo(path)  # after load: the tree check has passed, the read must still not block
    got = in_thread(lambda: eng.store.fetch(0, [1]))
    assert isinstance(got, ExpertReadError) and "not a regular file" in str(got), got
    path.unlink()
    path.write_bytes(saved)
    assert in_thread(lambda: eng.store.fetch(0, [1])) is not None  # the store recovers once the file is back
    eng.store.acquire(0, [2, 3])  # reads in flight at shutdown
    in_thread(eng.close)


# ---- hostile checkpoints (convert) -----------------------------------------------------------------

TINY = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, vocab_size=512)


@pytest.fixture
def ckpt(tmp_path) -> Path:
    from moepack.demo import SyntheticSpec, write_checkpoint

    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.safetensors").write_bytes(b"\0" * 64)
    return write_checkpoint(tmp_path / "ckpt", SyntheticSpec(**TINY))


def convert_cli(ckpt: Path, out: Path):
    return CliRunner().invoke(main, ["convert", str(ckpt), str(out), "--workers", "1"])


def _index(ckpt: Path) -> Path:
    return next(ckpt.glob("*.index.json"))


@pytest.mark.parametrize("index,expect", [
    ("[1, 2]", "not a safetensors index"),
    ('{"weight_map": [1, 2]}', "not a safetensors index"),
    ('{"weight_map": {"a": 3}}', "not a safetensors index"),
    ("[" * 100_000 + "]" * 100_000, "not valid safetensors index JSON"),
    ('{"weight_map": {"a": "../outside/secret.safetensors"}}', "'..' component"),
    ('{"weight_map": {"a": "/etc/passwd"}}', "absolute path"),
    ('{"weight_map": {"a": "sub/x.safetensors"}}', "another directory"),
])
def test_malformed_or_escaping_index_is_one_line(ckpt, tmp_path, index, expect):
    _index(ckpt).write_text(index)
    r = audited(lambda: convert_cli(ckpt, tmp_path / "out"), tmp_path / "outside")
    assert expect in one_line_error(r)


def test_symlink_loop_and_fifo_shards_are_one_line(ckpt, tmp_path):
    _index(ckpt).unlink()
    os.symlink("loop.safetensors", ckpt / "loop.safetensors")
    assert "Too many levels of symbolic links" in one_line_error(convert_cli(ckpt, tmp_path / "out"))
    (ckpt / "loop.safetensors").unlink()
    os.mkfifo(ckpt / "pipe.safetensors")
    r = in_thread(lambda: convert_cli(ckpt, tmp_path / "out2"))
    assert "not a regular file" in one_line_error(r)


@pytest.mark.parametrize("edit,expect", [
    (lambda c: [1, 2], "must be a JSON object"),
    (lambda c: {**c, "vocab_size": 10**12}, "vocab_size 1000000000000 is out of range"),
    (lambda c: {**c, "num_experts_per_tok": 2.5}, "top_k is 2.5, not a whole number"),
    (lambda c: {**c, "rope_theta": float("nan")}, "NaN is not a JSON value"),
    (lambda c: {**c, "rope_theta": -1.0}, "rope_theta is -1.0; it must be a finite number above 0"),
    (lambda c: {**c, "rms_norm_eps": -1e-6}, "rms_norm_eps is -1e-06"),
    (lambda c: {**c, "max_position_embeddings": -5}, "max_position_embeddings -5 is out of range"),
    (lambda c: {**c, "num_experts_per_tok": 9}, "top_k 9 is more than num_experts 4"),
])
def test_absurd_config_values_refused(ckpt, tmp_path, edit, expect):
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(edit(cfg)))
    assert expect in one_line_error(convert_cli(ckpt, tmp_path / "out"))


@pytest.mark.parametrize("key,value,expect", [
    ("vocab_size", 10**12, "vocab_size 1000000000000 is out of range"),
    ("rms_norm_eps", -1.0, "rms_norm_eps is -1.0"),
    ("rope_theta", 0, "rope_theta is 0"),
    ("max_position_embeddings", -5, "max_position_embeddings -5 is out of range"),
])
def test_absurd_config_values_in_a_pack_refused(copy, key, value, expect):
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(PackError, match=expect):
        PackReader(copy)


# ---- convert never destroys what it did not write ------------------------------------------------


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["same", "src-inside-out", "out-inside-src"])
def test_convert_refuses_an_out_that_is_or_holds_the_source(ckpt, where):
    out = {"same": ckpt, "src-inside-out": ckpt.parent, "out-inside-src": ckpt / "pack"}[where]
    before = snapshot(ckpt.parent)
    for force in ([], ["--force"]):
        r = CliRunner().invoke(main, ["convert", str(ckpt), str(out), "--workers", "1", *force])
        assert "source checkpoint" in one_line_error(r)
    assert snapshot(ckpt.parent) == before


@pytest.mark.parametrize("files", [{"thesis.tex": b"years of work"},
                                   {"manifest.json": b'{"name": "my-web-app"}', "config.json": b"{}"}])
def test_convert_refuses_a_folder_of_other_files(ckpt, tmp_path, files):
    """Another tool's manifest.json and config.json do not make a folder a pack: nothing is removed."""
    out = tmp_path / "mine"
    out.mkdir()
    for name, data in files.items():
        (out / name).write_bytes(data)
    for force in ([], ["--force"]):
        r = CliRunner().invoke(main, ["convert", str(ckpt), str(out), "--workers", "1", *force])
        assert f"holds other files ({', '.join(sorted(files))})" in one_line_error(r)
    assert snapshot(out) == files


def test_force_removes_only_what_a_pack_consists_of(ckpt, tmp_path):
    from moepack.convert.pipeline import convert

    out = convert(str(ckpt), tmp_path / "out", progress=False, workers=1)
    (out / "README.txt").write_text("notes about this pack")
    (out / "experts" / "mine.txt").write_text("kept")
    (out / "experts" / "000" / "0000.bin").write_bytes(b"stale")  # a pack file: replaced
    r = CliRunner().invoke(main, ["convert", str(ckpt), str(out), "--workers", "1", "--force"])
    assert r.exit_code == 0, r.output
    assert (out / "README.txt").read_text() == "notes about this pack"
    assert (out / "experts" / "mine.txt").read_text() == "kept"
    assert PackReader(out).verify().ok


def test_read_only_out_is_one_line(ckpt, tmp_path, monkeypatch):
    real = Path.mkdir

    def refuse(self, *a, **k):
        if self == tmp_path / "ro" / "out":
            raise OSError(30, "Read-only file system", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", refuse)
    r = convert_cli(ckpt, tmp_path / "ro" / "out")
    assert "cannot write into" in one_line_error(r) and "Read-only file system" in r.output


def test_ctrl_c_says_how_to_resume_and_the_resumed_run_says_so(ckpt, tmp_path, monkeypatch):
    from moepack.convert import pipeline

    real, calls = pipeline.run_unit, []

    def interrupt_after_two(*a):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(pipeline, "run_unit", interrupt_after_two)
    r = convert_cli(ckpt, tmp_path / "out")
    assert r.exit_code == 130 and "interrupted; re-run the same command to resume" in r.output, r.output
    monkeypatch.setattr(pipeline, "run_unit", real)
    r = convert_cli(ckpt, tmp_path / "out")
    assert r.exit_code == 0 and "resuming the conversion" in r.output and "2 of " in r.output, r.output
    assert PackReader(tmp_path / "out").verify().ok


def _descendants(pid: int) -> set[int]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int(next(l for l in (d / "status").read_text().splitlines() if l.startswith("PPid:")).split()[1])
            except (OSError, StopIteration):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, stack = set(), [pid]
    while stack:
        for k in kids.get(stack.pop(), []):
            out.add(k)
            stack.append(k)
    return out


def _alive(pid: int) -> bool:
    try:
        state = next(l for l in Path(f"/proc/{pid}/status").read_text().splitlines() if l.startswith("State:"))
    except (OSError, StopIteration):
        return False
    return "Z" not in state  # a zombie has exited


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_convert_leaves_no_worker_or_tracker(tmp_path):
    import signal
    import subprocess
    import time

    from moepack.demo import SyntheticSpec, write_checkpoint

    src = write_checkpoint(tmp_path / "src", SyntheticSpec(hidden_size=128, num_hidden_layers=3, num_experts=32,
                                                           num_experts_per_tok=2, moe_intermediate_size=64,
                                                           vocab_size=512))
    child = subprocess.Popen([sys.executable, "-m", "moepack", "convert", str(src), str(tmp_path / "out"),
                              "--workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(_descendants(child.pid)) < 3:  # two workers and the resource tracker
            assert child.poll() is None and time.monotonic() < deadline, "convert did not start its workers"
            time.sleep(0.05)
        procs = _descendants(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in procs if _alive(p)], "processes outlived the killed converter"
    finally:
        if child.poll() is None:
            child.kill()


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_inspect_json_is_strict_json(copy, value):
    """A non-finite number anywhere in the manifest is refused, so `inspect --json` never prints NaN."""
    text = (copy / "manifest.json").read_text().replace('"provenance": {', f'"provenance": {{"x": {value}, ', 1)
    (copy / "manifest.json").write_text(text)
    r = CliRunner().invoke(main, ["inspect", "--json", str(copy)])
    line = one_line_error(r)
    assert "not a JSON value" in line or "out of the range of a number" in line


def test_inspect_json_parses_strictly(pack):
    r = CliRunner().invoke(main, ["inspect", "--json", str(pack)])
    assert r.exit_code == 0
    json.loads(r.output, parse_constant=lambda c: pytest.fail(f"{c} in inspect --json"))


def test_serve_validates_the_pack_before_the_tokenizer(copy):
    """serve builds its tokenizer first: a side file leading out is refused there, before anything binds."""
    from moepack.serve.app import serve

    os.unlink(copy / "tokenizer.json")
    os.symlink("../outside/secret", copy / "tokenizer.json")
    got = audited(lambda: serve(copy, port=1), copy.parent / "outside")
    assert isinstance(got, PackError) and "leads outside the pack" in str(got)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_of_a_parallel_convert_is_quiet_and_resumes(tmp_path):
    """A real Ctrl-C reaches the whole process group: the workers ignore it, the converter stops them and says how
    to resume (no traceback from any process), and the same command finishes the pack."""
    import signal
    import subprocess
    import time

    from moepack.demo import SyntheticSpec, write_checkpoint

    src = write_checkpoint(tmp_path / "src", SyntheticSpec(hidden_size=128, num_hidden_layers=3, num_experts=32,
                                                           num_experts_per_tok=2, moe_intermediate_size=64,
                                                           vocab_size=512))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "moepack", "convert", str(src), str(out), "--workers", "2"]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(list((out / ".moepack" / "done").glob("*.json"))) < 5:
            assert child.poll() is None and time.monotonic() < deadline, "convert made no progress"
            time.sleep(0.01)
        procs = _descendants(child.pid)
        os.killpg(child.pid, signal.SIGINT)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 130 and "interrupted; re-run the same command to resume" in err, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in procs if _alive(p)]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "resuming the conversion" in again.stderr, again.stderr
    assert PackReader(out).verify().ok
