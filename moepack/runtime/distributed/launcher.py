"""Starting the ranks of a pipeline: local processes over loopback, or ``mlx.launch`` over a hostfile."""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from moepack.runtime.distributed.split import PipelineError

log = logging.getLogger(__name__)

PIPELINE_ENV = "MOEPACK_PIPELINE"  # set by the launchers: this process is one rank of a pipeline
BACKEND_ENV = "MOEPACK_BACKEND"


def read_hosts(hosts: str | int) -> tuple[int, list[str], str]:
    """``hosts``: a count (local processes on this machine) or mlx.launch's hostfile. -> (count, names, backend)."""
    if isinstance(hosts, int) or str(hosts).isdigit():
        n = int(hosts)
        if n < 1:
            raise PipelineError("--hosts needs at least 1 host")
        return n, ["local"] * n, "ring"
    path = Path(hosts)
    if not path.is_file():
        raise PipelineError(f"--hosts {hosts}: no such hostfile; give a number of local processes or mlx.launch's "
                            'hostfile, e.g. [{"ssh": "mac1.local", "ips": ["10.0.0.1"]}, {"ssh": "mac2.local", "ips": ["10.0.0.2"]}]')
    try:
        data = json.loads(path.read_text())
        entries = data["hosts"] if isinstance(data, dict) else data
        names = [h["ssh"] for h in entries]
    except (ValueError, KeyError, TypeError) as e:
        raise PipelineError(f"{hosts} is not an mlx.launch hostfile ({type(e).__name__}: {e}); expected a list of "
                            '{"ssh": host, "ips": [ip]} objects (or {"backend": ..., "hosts": [...]})') from e
    backend = (data.get("backend") if isinstance(data, dict) else None) or "ring"
    return len(names), names, backend


def in_pipeline() -> bool:
    """True in a process a launcher started as one rank of a pipeline."""
    return os.environ.get(PIPELINE_ENV) == "1"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def spawn_local(n: int, argv: Sequence[str], env: dict | None = None, **popen) -> list[subprocess.Popen]:
    """Start ``argv`` as ``n`` ranks on this machine, ring backend over loopback. Returns the processes unwaited."""
    hostfile = tempfile.NamedTemporaryFile("w", prefix="moepack-ring-", suffix=".json", delete=False)
    json.dump([[f"127.0.0.1:{p}"] for p in _free_ports(n)], hostfile)
    hostfile.close()
    atexit.register(Path(hostfile.name).unlink, missing_ok=True)  # the ranks read it once, at start-up
    base = {**os.environ, **(env or {}), PIPELINE_ENV: "1", BACKEND_ENV: "ring", "MLX_HOSTFILE": hostfile.name}
    return [subprocess.Popen(list(argv), env={**base, "MLX_RANK": str(r)}, **popen) for r in range(n)]


def wait_all(procs: Sequence[subprocess.Popen], timeout: float | None = None, grace: float = 10.0) -> list[int]:
    """Wait for every rank. Once one fails or rank 0 is done, the rest get ``grace`` seconds (to notice the lost
    peer, or rank 0's stop), then are killed, as mlx.launch does."""
    deadline = time.monotonic() + timeout if timeout else None
    failed_at = None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if failed_at is None and (procs[0].returncode is not None or any(p.returncode for p in procs)):
            failed_at = now
        if (deadline and now > deadline) or (failed_at and now > failed_at + grace):
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.05)
    return [p.wait() for p in procs]


def rank_command(args: Sequence[str]) -> list[str]:
    """``moepack ARGS`` for a rank: this Python running the moepack this process runs. Not ``python -m``, which
    puts the working directory first on sys.path, so that a folder named ``moepack/`` there (a clone's parent,
    say) would be imported instead."""
    root = str(Path(__file__).resolve().parents[3])  # the folder holding this moepack package
    boot = f"import sys; sys.path[0] = {root!r}; from moepack.cli import main; main(prog_name='moepack')"
    return [sys.executable, "-c", boot, *args]


def launch(hosts: str | int, args: Sequence[str]) -> int:
    """Run ``moepack ARGS`` once per host as a pipeline; returns the exit status.

    A count starts local processes (loopback ring: for trying the set-up on one machine); a hostfile goes to
    ``mlx.launch``, which starts rank i on host i over ssh (rank 0 first in the file) and relays their output.
    """
    n, _, backend = read_hosts(hosts)
    cmd = rank_command(args)
    if isinstance(hosts, int) or str(hosts).isdigit():
        procs = spawn_local(n, cmd)
        try:
            codes = wait_all(procs)
        except KeyboardInterrupt:
            for p in procs:
                p.send_signal(signal.SIGINT)
            codes = wait_all(procs, timeout=10)
        return next((c for c in codes if c), 0)
    exe = shutil.which("mlx.launch") or shutil.which("mlx.launch", path=str(Path(sys.executable).parent))
    launcher = [exe] if exe else [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()"]
    full = [*launcher, "--hostfile", str(hosts), "--backend", backend, "--env", f"{PIPELINE_ENV}=1",
            "--env", f"{BACKEND_ENV}={backend}", "--", *cmd]
    log.info("launching: %s", " ".join(full))
    return subprocess.run(full).returncode
