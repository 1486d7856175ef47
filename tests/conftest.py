"""What several test modules share: the tiny pack and its in-process reference, a small synthetic pack, bit
flips, servers on loopback, and the opt-in ``load`` marker.

Fixtures are found by pytest; the plain helpers (``flip``, ``free_port``, ``wait_healthy``, ``run_app``, ``err``)
are imported by name: ``from conftest import ...`` (tests/ is on sys.path, see below).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
# Child processes (the CLI, pipeline ranks, scripts) import the moepack of this checkout, as this process does,
# not whichever one is installed: a script's own folder, not the working directory, heads its sys.path.
ROOT = Path(__file__).resolve().parent.parent
_paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, _paths)])
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TIMEOUT = 120.0  # how long a test waits for a server or a reply before calling it a hang
HELLO = [{"role": "user", "content": "Hello"}]


# ---- markers -------------------------------------------------------------------------------------

LOAD_ENV = "MOEPACK_LOAD_TEST"


def pytest_configure(config):
    config.addinivalue_line("markers", f"load: a timed load run; opt in with {LOAD_ENV}=1 or `-m load`")


def pytest_collection_modifyitems(config, items):
    if os.environ.get(LOAD_ENV) == "1" or "load" in (config.getoption("markexpr", "") or ""):
        return
    skip = pytest.mark.skip(reason=f"load test: opt in with {LOAD_ENV}=1 or `-m load`")
    for item in items:
        if item.get_closest_marker("load"):
            item.add_marker(skip)


# ---- packs ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pack(request, tmp_path_factory) -> Path:
    """The tiny Qwen3-MoE pack with a real tokenizer and tool-call template (tests/tiny_pack.py), one per module."""
    from tiny_pack import build_pack

    return build_pack(tmp_path_factory.mktemp(request.module.__name__))


@pytest.fixture(scope="module")
def ref(pack):
    """(engine, tokenizer) on ``pack``, in-process: where expected text comes from."""
    import moepack
    from moepack.runtime.tokenizer import Tokenizer

    engine = moepack.load(pack)
    yield engine, Tokenizer(pack)
    engine.close()


def small_pack_of(root: Path, num_hidden_layers: int) -> Path:
    """A synthetic Qwen3-MoE of 16 experts (top 4) per layer, quantized with group 32."""
    from moepack.convert.pipeline import convert
    from moepack.convert.recipe import Recipe
    from moepack.demo import SyntheticSpec, write_checkpoint

    spec = SyntheticSpec(hidden_size=128, num_hidden_layers=num_hidden_layers, num_experts=16, num_experts_per_tok=4,
                         moe_intermediate_size=64, vocab_size=512)
    ckpt = write_checkpoint(root / "ckpt", spec)
    return convert(str(ckpt), root / "pack", Recipe(expert_group_size=32, dense_group_size=32), progress=False)


@pytest.fixture(scope="module")
def small_pack(tmp_path_factory) -> Path:
    """``small_pack_of`` with 3 layers."""
    return small_pack_of(tmp_path_factory.mktemp("small"), 3)


def minimum_budget(pack: Path) -> int:
    """The smallest memory budget ``pack`` loads under (one layer's top-k expert slots), as BudgetError states it."""
    import moepack
    from moepack.errors import BudgetError

    with pytest.raises(BudgetError) as e:
        moepack.load(pack, memory_budget=1, heat=False)
    return e.value.minimum


# ---- files opened -------------------------------------------------------------------------------

# Every file this process opens while a list is set (sys.audit "open": builtins.open, os.open, np.memmap).
_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


def opening_nothing_under(outside: Path, fn):
    """``fn()``, failing the test if it opened any file under ``outside`` (real paths, so a symlink counts)."""
    global _OPENED
    _OPENED = []
    try:
        out = fn()
    finally:
        opened, _OPENED = _OPENED, None
    base = os.path.realpath(outside)
    stray = [p for p in opened if os.path.realpath(p).startswith(base + os.sep)]
    assert not stray, f"opened outside the pack: {stray}"
    return out


# ---- damage --------------------------------------------------------------------------------------


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    """XOR the byte at ``offset`` of ``path`` with ``mask``, in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


# ---- servers on loopback -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, proc: subprocess.Popen | None = None, timeout: float = TIMEOUT,
                 output=None) -> None:
    """Poll ``base``/health until 200. ``proc``: the server's process, whose exit ends the wait with its output
    (``output()``, or its stdout pipe)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            said = output() if output else proc.stdout.read() if proc.stdout else ""
            raise RuntimeError(f"server exited with {proc.returncode}: {said}")
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server did not become healthy within {timeout:g}s"
                       + (f": {output()}" if output else ""))


@contextmanager
def serve_pack(pack: Path, key: str, parallel: int, model_id: str = "tiny"):
    """`moepack serve` on ``pack`` in a subprocess bound to 127.0.0.1 with API key ``key``; yields its base URL."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moepack.cli", "serve", str(pack), "--port", str(port),
                             "--api-key", key, "--parallel", str(parallel), "--model-id", model_id],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "MOEPACK_API_KEY": ""})
    try:
        wait_healthy(base, proc)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def run_app(app):
    """A real uvicorn server for ``app`` on a loopback port, in a thread of this process."""
    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    try:
        end = time.monotonic() + TIMEOUT
        while not srv.started:
            assert time.monotonic() < end and t.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        t.join(30)


def err(r: httpx.Response) -> dict:
    """The OpenAI-style error object of ``r``, checked for exactly its four fields."""
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]
