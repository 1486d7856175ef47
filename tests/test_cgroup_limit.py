"""A real container memory limit: ``moepack generate`` with no budget flag runs inside it (cgroup v1 or v2).

Needs root and a writable memory cgroup hierarchy (as in a privileged container or a CI VM); skipped otherwise.
The pack is larger than the limit, so a budget taken from the host's memory would be OOM-killed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup")
LIMIT = 160 << 20


def _cgroup() -> tuple[Path, str] | None:
    """A fresh memory cgroup (its folder, "v1"/"v2"), or None where this machine does not let us make one."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return None
    name = f"moepack-test-{uuid.uuid4().hex[:8]}"
    controllers = V2 / "cgroup.subtree_control"
    if (V1 / "memory.limit_in_bytes").exists():
        base, kind = V1, "v1"
    elif controllers.exists() and "memory" in controllers.read_text(errors="replace").split():
        base, kind = V2, "v2"
    else:
        return None
    try:
        (base / name).mkdir()
        (base / name / ("memory.limit_in_bytes" if kind == "v1" else "memory.max")).write_text(str(LIMIT))
    except OSError:
        return None
    return base / name, kind


def _write_pack(root: Path) -> Path:
    from moepack.convert.pipeline import convert
    from moepack.convert.recipe import Recipe
    from moepack.demo import SyntheticSpec, write_checkpoint

    spec = SyntheticSpec(hidden_size=512, num_hidden_layers=4, num_experts=32, num_experts_per_tok=4,
                         moe_intermediate_size=512, vocab_size=2048)  # 200 MB of bf16 experts
    ckpt = write_checkpoint(root / "ckpt", spec)
    return convert(str(ckpt), root / "pack", Recipe(quantize=False, dtype="bfloat16"), progress=False, workers=1)


def test_generate_without_budget_flag_fits_a_cgroup_limit(tmp_path):
    group = _cgroup()
    if group is None:
        pytest.skip("needs root and a writable memory cgroup (v1 or v2)")
    folder, kind = group
    try:
        pack = _write_pack(tmp_path)
        size = sum(f.stat().st_size for f in pack.rglob("*") if f.is_file())
        assert size > LIMIT  # the whole pack cannot be resident
        # the child joins the cgroup before it starts: all its memory counts
        cmd = (f"echo $$ > {folder}/cgroup.procs && exec {sys.executable} -m moepack generate {pack} "
               "-p 'hello there' --max-tokens 8 --stats")
        r = subprocess.run(["bash", "-c", cmd], check=False, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
        events = (folder / ("memory.oom_control" if kind == "v1" else "memory.events")).read_text()
        assert "oom_kill 0" in events, events
        assert r.returncode == 0, r.stderr[-2000:]
        assert "generation: 8 tokens" in r.stderr + r.stdout
    finally:
        for _ in range(50):  # the cgroup can be removed once its last process has gone
            try:
                folder.rmdir()
                break
            except OSError:
                time.sleep(0.1)
