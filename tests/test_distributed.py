"""Pipeline-parallel runs over MLX distributed (ring backend on loopback, one local process per rank): the same
logits and greedy tokens as one process, each rank holding only its share; and failures that end in a clear error
instead of a hang (a rank's own error, a killed rank, a frozen rank, mismatched packs, the server's health)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

import mlx.core as mx

import moepack
from checkpoints import build
from conftest import wait_healthy
from moepack.convert.pipeline import convert
from moepack.convert.recipe import Recipe
from moepack.demo import SyntheticSpec, write_checkpoint
from moepack.formats.reader import PackReader
from moepack.runtime import distributed
from moepack.runtime.distributed import split_layers
from moepack.runtime.distributed import split_pack as plan
from pipeline_rank import PROMPT, conversation

pytestmark = pytest.mark.skipif(not mx.distributed.is_available("ring"), reason="this MLX build has no ring backend")

RANK = str(Path(__file__).with_name("pipeline_rank.py"))
EXACT = Recipe(quantize=False, dtype="float32")
SPEC = SyntheticSpec(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, vocab_size=512)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    """Qwen3-MoE, 4 MoE layers, with a tokenizer (for the CLI and the server)."""
    root = tmp_path_factory.mktemp("qwen")
    return convert(str(write_checkpoint(root / "ckpt", SPEC)), root / "pack", EXACT, progress=False)


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory) -> Path:
    """DeepSeek-V3: MLA's latent cache, a dense first layer (so a 3-way split leaves rank 0 no MoE layer) and tied
    embeddings (so the last rank needs the embedding matrix too)."""
    root = tmp_path_factory.mktemp("deepseek")
    return convert(str(build("deepseek_v3", root / "ckpt", tie_word_embeddings=True)), root / "pack", EXACT,
                   progress=False)


@pytest.fixture(scope="module")
def deepseek_v4(tmp_path_factory) -> Path:
    """DeepSeek V4: three hyper-connection streams between the stages, hash-routed layers on both sides of a 2-way
    split (the token ids travel with the hidden state), compressed caches on every rank."""
    root = tmp_path_factory.mktemp("deepseek_v4")
    ckpt = build("deepseek_v4", root / "ckpt", mlp_layer_types=["hash_moe"] * 3 + ["moe"])
    return convert(str(ckpt), root / "pack", EXACT, progress=False)


def reference(pack: Path) -> dict:
    """What one process computes."""
    engine = moepack.load(pack, heat=False)
    try:
        return {"logits": engine.logits(PROMPT), "greedy": list(engine.generate(PROMPT, 8)),
                "conversation": conversation(engine)}
    finally:
        engine.close()


class Ranks:
    """``n`` ranks of tests/pipeline_rank.py, their output in OUT/ranks.log; killed on the way out."""

    def __init__(self, n: int, scenarios: str, out: Path, *packs: Path):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.log = open(out / "ranks.log", "w")
        self.procs = distributed.spawn_local(n, [sys.executable, RANK, scenarios, str(out), *map(str, packs)],
                                             stdout=self.log, stderr=subprocess.STDOUT)

    def step(self, name: str, action=None) -> None:
        """Wait until rank 0 reaches ``name``, do ``action``, release it."""
        deadline = time.monotonic() + 60
        while not (self.out / f"{name}.ready").exists():
            assert self.procs[0].poll() is None, f"rank 0 stopped before step {name!r}:\n{self.output()}"
            assert time.monotonic() < deadline, f"rank 0 never reached step {name!r}:\n{self.output()}"
            time.sleep(0.02)
        if action:
            action()
        (self.out / f"{name}.go").touch()

    def finish(self, timeout: float = 60) -> list[int]:
        return distributed.wait_all(self.procs, timeout=timeout, grace=5)

    def result(self) -> dict:
        path = self.out / "result.json"
        assert path.exists(), f"rank 0 wrote no result:\n{self.output()}"
        return json.loads(path.read_text())

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return (self.out / "ranks.log").read_text()[-4000:]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()
        self.log.close()


def assert_same(res: dict, out: Path, ref: dict, rewinds: bool = True) -> None:
    """``rewinds``: the caches can be trimmed (False for linear-attention families, whose recurrent state cannot)."""
    got = np.load(out / "logits.npy")
    assert got.shape == ref["logits"].shape
    np.testing.assert_array_equal(got, ref["logits"])  # bitwise: the stages run the very same ops
    assert res["greedy"] == ref["greedy"]
    assert res["conversation"] == ref["conversation"]
    # the second turn trimmed the cache on every rank, then reused it; a recurrent state starts over
    assert res["conversation"][1]["reused"] == (8 if rewinds else 0)


# ---- the plan ------------------------------------------------------------------------------------


def test_split_layers_balances_contiguous_ranges():
    assert split_layers([1] * 8, 2) == [range(0, 4), range(4, 8)]
    assert split_layers([1] * 8, 2, first_extra=2) == [range(0, 3), range(3, 8)]  # the embeddings weigh on rank 0
    assert split_layers([5, 1, 1, 1, 1, 1], 2) == [range(0, 1), range(1, 6)]
    assert split_layers([1, 2, 3], 3) == [range(0, 1), range(1, 2), range(2, 3)]
    assert split_layers([3, 3, 3], 1) == [range(0, 3)]
    with pytest.raises(ValueError, match="at least one layer"):
        split_layers([1, 1], 3)


EMBED = "model.embed_tokens.weight"


@pytest.mark.parametrize("hosts", [1, 2, 3, 4])
def test_plan_gives_every_tensor_and_expert_one_host(qwen, hosts):
    reader = PackReader(qwen)
    p = plan(reader, hosts)
    stages = p.stages
    assert [s.index for s in stages] == list(range(hosts))
    assert stages[0].start == 0 and stages[-1].stop == SPEC.num_hidden_layers
    assert all(a.stop == b.start and a.start < a.stop for a, b in zip(stages, stages[1:]))
    assert reader.tables  # the embedding is streamed: the first stage's minimum holds one token's rows of it
    for name in [*reader.manifest.dense, *reader.tables]:
        assert sum(s.owns(name) for s in stages) == 1, name
    assert sorted(L for sh in p.shares for L in sh.moe_layers) == reader.moe_layers
    assert sum(sh.dense_bytes for sh in p.shares) == reader.dense_bytes
    for sh in p.shares:
        rows = sum(t.row_bytes for n, t in reader.tables.items() if sh.stage.owns(n))
        assert sh.minimum == sh.dense_bytes + 2 * sh.slot_bytes + rows
        assert sh.table_read_per_token == (reader.tables[EMBED].read_bytes() if sh.stage.first else 0)


def test_plan_of_tied_embeddings_and_dense_layers(deepseek):
    p = plan(PackReader(deepseek), 3)
    first, middle, last = p.shares
    assert first.moe_layers == [] and first.minimum == first.dense_bytes  # layer 0 is dense: no expert pool
    assert first.stage.owns("model.embed_tokens.weight") and last.stage.owns("model.embed_tokens.weight")
    assert not middle.stage.owns("model.embed_tokens.weight") and last.stage.owns("model.norm.weight")


def test_virtual_pack_sizes_match_a_conversion(deepseek, tmp_path):
    """tools/virtual_pack.py (how the README plans Kimi K2.5) sizes every tensor as the converter writes it."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
    from virtual_pack import virtual_pack

    ckpt = deepseek.parent / "ckpt"
    for recipe in (EXACT, Recipe()):
        real = PackReader(convert(str(ckpt), tmp_path / "real", recipe, progress=False, force=True))
        virt = PackReader(virtual_pack(json.loads((ckpt / "config.json").read_text()), tmp_path / "virtual", recipe, None))
        m, v = real.manifest, virt.manifest
        assert {k: (r.encoding, r.nbytes) for k, r in v.dense.items()} == {k: (r.encoding, r.nbytes) for k, r in m.dense.items()}
        def layouts(man):  # where every part of every expert tensor lies in its file (provenance aside)
            return [(lay.length, {t: (r.encoding, {k: (b.offset, b.length) for k, b in r.parts.items()})
                                  for t, r in lay.tensors.items()})
                    for lay in (man.expert_layouts[e.layout] for e in man.experts)]

        assert layouts(v) == layouts(m)
        assert plan(virt, 2).shares == plan(real, 2).shares


# ---- pipelines against one process ----------------------------------------------------------------


def test_two_ranks_match_one_process_and_fail_cleanly(qwen, tmp_path):
    pack = Path(shutil.copytree(qwen, tmp_path / "pack"))  # this test hides some of its files
    ref = reference(pack)
    p = plan(PackReader(pack), 2)
    layer = p.shares[1].moe_layers[-1]
    files = [pack / f for f in PackReader(pack).manifest.experts[layer].files]

    def hide():
        for f in files:
            f.rename(f.with_name(f.name + ".hidden"))

    def restore():
        for f in files:
            f.with_name(f.name + ".hidden").rename(f)

    with Ranks(2, "parity,faults", tmp_path / "out", pack) as ranks:
        ranks.step("break", hide)
        ranks.step("mend", restore)
        ranks.step("kill", lambda: (ranks.procs[1].kill(), ranks.procs[1].wait()))
        assert ranks.procs[0].wait(60) == 0, ranks.output()
        res = ranks.result()
    assert_same(res, tmp_path / "out", ref)
    # each rank loaded only its share, at its share's minimum budget: experts streamed on both hosts
    assert res["plan"] == {"dense_bytes": p.shares[0].dense_bytes, "n_slots": SPEC.num_experts_per_tok}
    assert res["plan"]["dense_bytes"] < PackReader(pack).dense_bytes
    s = res["stats"]
    assert s["ranks"] == 2 and s["misses"] > 0 and [r["tokens"] for r in s["per_rank"]] == [s["tokens"]] * 2
    # an expert file the last rank cannot read fails that request only, with the far rank's error...
    broken = res["broken"]
    assert broken["error"] == "RemoteError" and broken["healthy"], broken
    assert "rank 1" in broken["message"] and f"layer {layer}" in broken["message"], broken
    # ...and the pipeline goes on once the file is back
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "mended.npy"), ref["logits"])
    assert res["mended_healthy"]
    # a killed rank fails the request at once and leaves the engine unhealthy; later calls fail fast
    killed, after = res["killed"], res["after"]
    assert killed["error"] == "PipelineError" and not killed["healthy"], killed
    # the error path, not the rank timeout (60s here, whose message says "did not answer within")
    assert "lost a pipeline rank" in killed["message"] and "did not answer" not in killed["message"], killed
    # failing fast: the recorded error raised again, not a new attempt that ran into the dead rank
    assert after["error"] == "PipelineError" and after["message"] == killed["message"], after


def test_three_ranks_match_one_process(deepseek, tmp_path):
    ref = reference(deepseek)
    with Ranks(3, "parity", tmp_path, deepseek) as ranks:
        codes = ranks.finish()
        assert codes == [0, 0, 0], ranks.output()
        res = ranks.result()
    assert_same(res, tmp_path, ref)
    assert res["plan"]["n_slots"] == 0  # rank 0 holds the dense first layer only
    assert res["stats"]["ranks"] == 3


def test_two_ranks_match_one_process_deepseek_v4(deepseek_v4, tmp_path):
    ref = reference(deepseek_v4)
    assert [s.stage.layers for s in plan(PackReader(deepseek_v4), 2).shares] == [range(0, 2), range(2, 4)]  # layer 2: hashed
    with Ranks(2, "parity", tmp_path, deepseek_v4) as ranks:
        codes = ranks.finish()
        assert codes == [0, 0], ranks.output()
        res = ranks.result()
    got = np.load(tmp_path / "logits.npy")
    np.testing.assert_array_equal(got, ref["logits"])  # bitwise: the stages run the very same ops
    assert res["greedy"] == ref["greedy"] and res["conversation"] == ref["conversation"]
    assert res["stats"]["ranks"] == 2


def test_frozen_rank_times_out(qwen, tmp_path):
    with Ranks(2, "stall", tmp_path, qwen) as ranks:
        ranks.step("stall", lambda: ranks.procs[1].send_signal(signal.SIGSTOP))
        assert ranks.procs[0].wait(60) == 0, ranks.output()
        stalled = ranks.result()["stalled"]
    assert stalled["error"] == "PipelineError" and not stalled["healthy"], stalled
    assert "did not answer within 2s" in stalled["message"], stalled
    assert stalled["seconds"] >= 2, stalled  # the timeout fired, and not before its time


@pytest.mark.parametrize("other, says", [("deepseek", "different packs"), ("missing", "rank(s) 1 could not load")])
def test_ranks_refuse_to_start_on_different_packs(qwen, deepseek, tmp_path, other, says):
    second = deepseek if other == "deepseek" else tmp_path / "nowhere"
    with Ranks(2, "parity", tmp_path, qwen, second) as ranks:
        codes = ranks.finish()
    assert codes == [3, 3], ranks.output()
    assert says in (tmp_path / "error.0.txt").read_text()
    assert not (tmp_path / "result.json").exists()


# ---- the CLI and the server -----------------------------------------------------------------------


def test_cli_generate_over_two_hosts(qwen):
    def run(*extra):
        r = subprocess.run([sys.executable, "-m", "moepack.cli", "generate", str(qwen), "-p", "Hello, world!",
                            "--max-tokens", "8", *extra], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout

    assert run("--hosts", "2") == run()


def test_server_over_two_hosts_reports_a_lost_host(qwen, tmp_path):
    [port] = distributed.launcher._free_ports(1)
    base = f"http://127.0.0.1:{port}"
    with open(tmp_path / "serve.log", "w") as log:
        procs = distributed.spawn_local(2, [sys.executable, "-m", "moepack.cli", "serve", str(qwen), "--port",
                                            str(port)], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(base, procs[0], timeout=60, output=(tmp_path / "serve.log").read_text)
            body = {"prompt": "Hello", "max_tokens": 3000, "temperature": 0, "stream": True}
            events = []
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        events.append(json.loads(line[6:]))
                        if len(events) == 2:  # generating: now the second host goes away
                            procs[1].kill()
            assert "error" in events[-1], events[-1]
            assert "lost a pipeline rank" in events[-1]["error"]["message"]
            health = httpx.get(f"{base}/health", timeout=5)
            assert health.status_code == 503 and health.json()["error"]["code"] == "unhealthy"
        finally:
            for p in procs:
                p.kill()
                p.wait()


def test_ranks_run_this_moepack_from_any_directory(tmp_path, monkeypatch):
    """`--hosts N` from a folder holding a `moepack/` (a clone's parent, say): the ranks still import the moepack
    this process runs (`python -m` put the working directory first on their sys.path, and the ranks died)."""
    from moepack.runtime.distributed.launcher import launch

    (tmp_path / "moepack").mkdir()
    (tmp_path / "moepack" / "__init__.py").write_text("raise ImportError('the wrong moepack')\n")
    monkeypatch.chdir(tmp_path)
    assert launch(2, ["--version"]) == 0
