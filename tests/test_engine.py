"""The engine interface and the pieces around it: batch planning, options on every path, loading conveniences."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import moepack
from moepack.cli import main
from moepack.convert.pipeline import convert
from moepack.demo import SyntheticSpec, write_checkpoint
from moepack.runtime import distributed
from moepack.runtime.models.moe import plan_batches

SPEC = SyntheticSpec(hidden_size=64, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                     moe_intermediate_size=32, vocab_size=256)


@pytest.mark.parametrize("capacity", [1, 2, 3, 8, 100])
def test_batches_hold_whole_experts_and_every_pair_once(capacity):
    rng = np.random.default_rng(capacity)
    ids = rng.integers(0, 8, size=(37, 2)).reshape(-1)
    batches = plan_batches(ids, capacity)
    experts = np.concatenate([b.experts for b in batches])
    assert list(experts) == sorted(set(ids.tolist()))  # ascending, each expert in exactly one batch
    assert all(1 <= len(b.experts) <= capacity for b in batches)
    order = np.concatenate([b.pairs for b in batches])
    np.testing.assert_array_equal(order, np.argsort(ids, kind="stable"))  # every pair once, grouped by expert
    for b in batches:
        np.testing.assert_array_equal(ids[b.pairs], np.repeat(b.experts, b.rows))


def test_batches_do_not_depend_on_capacity_within_an_expert():
    ids = np.array([5, 1, 5, 5, 1, 0])
    rows = {int(e): list(p) for b in plan_batches(ids, 1) for e, p in zip(b.experts, np.split(b.pairs, np.cumsum(b.rows)[:-1]))}
    assert rows == {0: [5], 1: [1, 4], 5: [0, 2, 3]}


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("engine")
    return convert(str(write_checkpoint(root / "ckpt", SPEC)), root / "pack", progress=False)


def test_load_expands_home_and_closes_as_a_context_manager(pack, monkeypatch):
    monkeypatch.setenv("HOME", str(pack.parent))
    with moepack.load("~/pack") as eng:
        assert eng.path == pack
        assert eng.forward([1, 2, 3], eng.make_cache()).shape == (1, SPEC.vocab_size)
        assert eng.logits([1, 2, 3]).shape == (3, SPEC.vocab_size)
    assert eng.store._io._shutdown  # close() ran: the I/O threads are gone


def test_forward_splits_long_input_into_passes_with_the_same_result(pack):
    ids = list(range(1, 40))
    with moepack.load(pack) as eng:
        whole = eng.logits(ids)
        eng.max_pass = 16  # three passes, one cache
        np.testing.assert_allclose(eng.logits(ids), whole, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(eng.forward(ids)[0], whole[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_engine_options_reach_a_pipeline_rank_as_they_reach_a_local_engine(pack, monkeypatch, command):
    """--verify/--policy/--prefetch go to every rank of a pipeline exactly as to a local engine."""
    seen = {}

    class Stop(Exception):
        pass

    def start(pack_, memory_budget, timeout, **kwargs):
        seen["pipeline"] = kwargs
        raise Stop

    def load(pack_, memory_budget=None, **kwargs):
        seen["local"] = kwargs
        raise Stop

    monkeypatch.setattr(distributed, "start", start)
    monkeypatch.setattr(moepack, "load", load)
    import moepack.serve.app as app

    monkeypatch.setattr(app, "serve", lambda *a, load_kwargs, **k: load(None, **load_kwargs))
    args = [command, str(pack), "--verify", "--policy", "lfu", "--prefetch"]
    args += ["-p", "hi"] if command == "generate" else ["--port", "1"]
    CliRunner().invoke(main, args)
    monkeypatch.setenv("MOEPACK_PIPELINE", "1")
    CliRunner().invoke(main, args)
    assert seen["pipeline"] == seen["local"] == {"verify": True, "policy": "lfu", "prefetch": True}


PROMPT_SCRIPT = """
import json, sys
import numpy as np
from moepack.runtime.memory import current_rss, peak_rss, reset_peak_rss
import moepack
base = current_rss()
eng = moepack.load(sys.argv[1], memory_budget=int(sys.argv[2]), heat=False)
ids = np.random.default_rng(0).integers(0, 1000, size=int(sys.argv[3])).tolist()
cache = eng.make_cache()
logits = eng.forward(ids, cache)
print(json.dumps({"base": base, "peak": peak_rss(), "working": eng.working_memory(len(ids)), "shape": logits.shape,
                  "budget": eng.plan.budget, "passes": -(-len(ids) // eng.max_pass), "offset": cache[0].offset}))
"""


def test_long_prompt_stays_within_budget_plus_documented_working_memory(tmp_path):
    """A 3,000-token prompt on a model with a 32k vocabulary: the head runs on the last position only ([T, vocab]
    float32 logits would be 390 MB, more than the whole allowance) and peak RSS stays within budget + the README's
    working memory for that context."""
    import json
    import subprocess
    import sys

    spec = SyntheticSpec(hidden_size=128, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                         moe_intermediate_size=64, vocab_size=32768)
    pack = convert(str(write_checkpoint(tmp_path / "ckpt", spec)), tmp_path / "pack", progress=False)
    budget = 64 << 20
    out = subprocess.run([sys.executable, "-c", PROMPT_SCRIPT, str(pack), str(budget), "3000"], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["shape"] == [1, 32768] and r["offset"] == 3000 and r["passes"] == 1
    assert r["working"] < 3000 * 32768 * 4  # the allowance could not hold [T, vocab] logits
    assert r["peak"] - r["base"] <= r["budget"] + r["working"], (r["peak"] - r["base"], r["budget"], r["working"])


@pytest.mark.parametrize("length", [60, 300])
def test_long_prompt_same_at_minimum_and_full_budget_and_reads_each_expert_once(pack, length):
    """A prompt touches most experts of every layer: at the minimum budget (two slots, batches of one expert, the next
    read while one computes) logits equal the full budget's bitwise, and each expert is read exactly once. At 60
    tokens some experts get few rows (MLX) and others many (numpy's BLAS on the CPU): the sum order still holds."""
    ids = np.random.default_rng(1).integers(0, SPEC.vocab_size, size=length).tolist()
    with moepack.load(pack, heat=False) as full:
        want = full.logits(ids)
        tokens = list(full.generate(ids, 4))
        minimum = full.plan.minimum
    with moepack.load(pack, memory_budget=minimum, heat=False) as small:
        assert small.plan.n_slots == SPEC.num_experts_per_tok
        np.testing.assert_array_equal(small.logits(ids), want)
        s = small.stats()
        touched = len(small.store.heat)
        assert touched > 4 * small.plan.n_slots  # far more experts than the pool holds: batches streamed
        assert s["bytes_read"] == touched * small.store.file_bytes  # once per expert per layer, not per chunk
        assert list(small.generate(ids, 4)) == tokens


@pytest.mark.parametrize("v2", [True, False])
def test_default_budget_honours_the_cgroup_limit(tmp_path, v2):
    from moepack.runtime.memory import cgroup_available

    proc = tmp_path / "cgroup"
    if v2:
        proc.write_text("0::/box\n")
        (tmp_path / "fs" / "box").mkdir(parents=True)
        (tmp_path / "fs" / "box" / "memory.max").write_text(f"{3 << 30}\n")
        (tmp_path / "fs" / "box" / "memory.current").write_text(f"{1 << 30}\n")
    else:
        proc.write_text("5:devices:/\n4:memory:/box\n0::/\n")
        (tmp_path / "fs" / "memory" / "box").mkdir(parents=True)
        (tmp_path / "fs" / "memory" / "box" / "memory.limit_in_bytes").write_text(f"{3 << 30}\n")
        (tmp_path / "fs" / "memory" / "box" / "memory.usage_in_bytes").write_text(f"{1 << 30}\n")
    assert cgroup_available(tmp_path / "fs", proc) == 2 << 30
    name = "memory.max" if v2 else "memory/box/memory.limit_in_bytes"
    (tmp_path / "fs" / (("box/" + name) if v2 else name)).write_text("max\n" if v2 else f"{(1 << 63) - 4096}\n")
    assert cgroup_available(tmp_path / "fs", proc) is None  # no limit
