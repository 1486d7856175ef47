"""Hub-native conversion against a local stand-in for the hub (tests/hubserver.py), offline: `moepack plan` from
headers alone, `convert --stream` shard by shard, resume after kill -9, disk checks, and a server that misbehaves.

Everything that talks to the hub runs in a child process: huggingface_hub reads HF_ENDPOINT and HF_HOME at import.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from checkpoints import build
from hubserver import HubServer, reshard
from moepack.convert.pipeline import convert
from moepack.convert.recipe import Recipe
from moepack.convert.source import Checkpoint
from moepack.convert.units import plan_units

# (kind, fused, shards): per-expert tensors over 4 shards, and fused [E, ...] tensors (whole layers) over 3
REPOS = {"acme/qwen3-moe": ("qwen3_moe", False, 4), "acme/mixtral-fused": ("mixtral", True, 3)}
RECIPE = Recipe()


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hubrepos")
    out = {}
    for rid, (kind, fused, n) in REPOS.items():
        src = build(kind, root / "build" / kind, fused=fused)
        out[rid] = reshard(src, root / rid, n)
    return out


@pytest.fixture(scope="module")
def local_packs(repos, tmp_path_factory) -> dict[str, Path]:
    """Each repo converted from its local directory: the reference every hub conversion must equal."""
    root = tmp_path_factory.mktemp("local")
    return {rid: convert(str(d), root / rid.replace("/", "_"), RECIPE, progress=False) for rid, d in repos.items()}


@pytest.fixture
def hub(repos):
    with HubServer(repos) as h:
        yield h


def child_env(hub: HubServer, home: Path) -> dict:
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5"}
    env.pop("HF_HUB_OFFLINE", None)
    return env


RUN = r"""
import json, sys
from moepack.convert.pipeline import convert
from moepack.convert.recipe import Recipe
if __name__ == "__main__":
    kw = {"workers": 1, **json.loads(sys.argv[3])}
    convert(sys.argv[1], sys.argv[2], Recipe(), progress=False, **kw)
"""


def run_convert(hub, home, rid, out, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN, rid, str(out), json.dumps(kw)], env=child_env(hub, home),
                          capture_output=True, text=True, timeout=300)


def du(d: Path) -> int:
    """Bytes of the regular files under ``d`` now (files may vanish while it counts)."""
    total = 0
    for root, _, files in os.walk(d):
        for f in files:
            try:
                st = os.lstat(os.path.join(root, f))
            except FileNotFoundError:
                continue
            total += st.st_size if not os.path.islink(os.path.join(root, f)) else 0
    return total


def tree(d: Path, skip=()) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.relative_to(d).as_posix() not in skip}


def same_pack(a: Path, b: Path) -> None:
    """Every file byte-identical, the manifest too but for where the source came from."""
    ta, tb = tree(a, {"manifest.json"}), tree(b, {"manifest.json"})
    assert ta.keys() == tb.keys()
    assert [k for k in ta if ta[k] != tb[k]] == []
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    for m in (ma, mb):
        m["provenance"].pop("source")
        m["provenance"].pop("revision")
    assert ma == mb


@pytest.mark.parametrize("rid", REPOS)
def test_plan_predicts_every_size_byte_for_byte(hub, repos, local_packs, rid, tmp_path):
    """`moepack plan REPO` reads config, index and headers only (no shard is downloaded) and its sizes equal the
    converted pack's, every file and manifest.json."""
    res = subprocess.run([sys.executable, "-m", "moepack.cli", "plan", rid, "--json", "--disk-gbps", "2",
                          "--out", str(tmp_path)], env=child_env(hub, tmp_path / "home"), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    p = json.loads(res.stdout)
    assert not [r for r in hub.log if r[0] == "GET" and r[1].endswith(".safetensors") and not r[2]]  # ranges only
    # the hub conversion's manifest names the repo and commit; the local one a path of another length
    local = local_packs[rid]
    real = {f: (local / f).stat().st_size for f in p["files"] if f != "manifest.json"}
    assert {f: n for f, n in p["files"].items() if f != "manifest.json"} == real
    assert sorted(p["files"]) == sorted(f.relative_to(local).as_posix() for f in local.rglob("*") if f.is_file())
    hub_pack = tmp_path / "hubpack"
    assert run_convert(hub, tmp_path / "home", rid, hub_pack, stream=True).returncode == 0
    assert p["files"]["manifest.json"] == (hub_pack / "manifest.json").stat().st_size
    assert p["recipes"]["chosen"]["pack_bytes"] == sum(f.stat().st_size for f in hub_pack.rglob("*") if f.is_file())
    res = subprocess.run([sys.executable, "-m", "moepack.cli", "plan", str(repos[rid]), "--json", "--disk-gbps", "2"],
                         capture_output=True, text=True, timeout=300)  # the same from the checkpoint directory
    assert json.loads(res.stdout)["files"] == {**p["files"], "manifest.json": (local / "manifest.json").stat().st_size}
    res = subprocess.run([sys.executable, "-m", "moepack.cli", "plan", str(local), "--json", "--disk-gbps", "2"],
                         capture_output=True, text=True, timeout=300)  # and from the pack itself
    assert json.loads(res.stdout)["recipes"]["chosen"]["pack_bytes"] == sum(
        f.stat().st_size for f in local.rglob("*") if f.is_file())
    m = p["memory"]
    assert m["minimum_budget"] == m["dense_resident_bytes"] + m["top_k"] * m["slot_bytes"] + m["table_row_bytes_per_token"]
    assert m["table_row_bytes_per_token"] > 0  # the embedding streams from its table
    assert m["bytes_per_token_cold"] > 0 and p["speed"]["decode_tok_s_cold"] > 0
    d = p["disk"]
    assert d["without_stream"] == d["pack"] + d["source"] > d["with_stream"] == d["pack"] + d["stream_source_peak"]


@pytest.mark.parametrize("rid", REPOS)
def test_stream_equals_download_and_local_within_disk_bound(hub, repos, local_packs, rid, tmp_path):
    """Streamed, with the disk under OUT sampled throughout: the same bytes as a full download's conversion (the
    manifest too) and as a local conversion; the peak stays within plan's bound; provenance has the commit and
    every source file's hash."""
    full = tmp_path / "full"
    res = run_convert(hub, tmp_path / "home-full", rid, full, stream=False)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "stream"
    hub.rate = 2e6  # slow enough that the sampler sees shards come and go
    kw = {"stream": True, "window": 1, "workers": 2 if "mixtral" in rid else 1}  # worker processes too
    proc = subprocess.Popen([sys.executable, "-c", RUN, rid, str(out), json.dumps(kw)],
                            env=child_env(hub, tmp_path / "home-stream"), stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, du(out))
        time.sleep(0.01)
    assert proc.returncode == 0, proc.stderr.read()
    assert tree(out) == tree(full)
    same_pack(out, local_packs[rid])
    assert not (out / ".moepack").exists()
    prov = json.loads((out / "manifest.json").read_text())["provenance"]
    assert prov["source"] == rid and prov["revision"] == hub.repos[rid].sha
    assert set(prov["source_files"]) == {n for n in hub.repos[rid].files if "safetensors" in n}
    assert all(len(v["blake3"]) == 64 for v in prov["source_files"].values())
    res = subprocess.run([sys.executable, "-m", "moepack.cli", "plan", rid, "--json", "--disk-gbps", "2", "--window",
                          "1", "--out", str(tmp_path)], env=child_env(hub, tmp_path / "home-plan"),
                         capture_output=True, text=True, timeout=300)
    bound = json.loads(res.stdout)["disk"]
    source = sum(f["size"] for n, f in hub.repos[rid].files.items() if n.endswith(".safetensors"))
    # bound: pack + at most the shards plan says, plus the hub's small side files staged before conversion
    assert peak <= bound["with_stream"] + (64 << 10), (peak, bound)
    assert bound["stream_source_peak"] < source  # and streaming holds less than the whole download


KILL_CHILD = r"""
import json, os, signal, sys, threading, time
from pathlib import Path
from moepack.convert import hub, pipeline
from moepack.convert.recipe import Recipe
point, n = sys.argv[3], int(sys.argv[4])
count = 0

def reached(p):
    global count
    if p == point:
        count += 1
        if count == n:
            os.kill(os.getpid(), signal.SIGKILL)

fetch, release, run_unit = hub.ShardFeed._fetch, hub.ShardFeed.release, pipeline.run_unit
hub.ShardFeed._fetch = lambda self, name: (reached("fetch"), fetch(self, name), reached("fetched"))[1]
hub.ShardFeed.release = lambda self, name, ckpt: (release(self, name, ckpt), reached("release"))[0]
pipeline.run_unit = lambda *a: (run_unit(*a), reached("unit"))[0]

def watch():  # kill mid-download: once a partial file has bytes in it
    while point == "partial":
        for p in Path(sys.argv[2]).glob(".moepack/source/*.part"):
            try:
                if p.stat().st_size > 0:
                    os.kill(os.getpid(), signal.SIGKILL)
            except FileNotFoundError:  # renamed into place meanwhile
                pass
        time.sleep(0.005)

if __name__ == "__main__":
    threading.Thread(target=watch, daemon=True).start()
    pipeline.convert(sys.argv[1], sys.argv[2], Recipe(), progress=False, workers=1, stream=True, window=1)
"""
KILL_POINTS = {"fetch": 4, "fetched": 4, "unit": 20, "release": 4, "partial": 1}


@pytest.mark.parametrize("first", KILL_POINTS)
def test_stream_killed_at_random_points_resumes_identical(hub, repos, local_packs, first, tmp_path):
    """kill -9 at a point (before or after a shard arrives, after a unit, after a shard is deleted, in the middle
    of a download), the n-th time it is reached (n random), then at random points again, then the same command:
    a pack equal to a local conversion; a shard whose units were all written before a kill is not downloaded
    again, and a partial download continues where it stopped."""
    rid = "acme/qwen3-moe"
    rng = random.Random(first)
    out, home = tmp_path / "out", tmp_path / "home"
    hub.rate = 1e6
    env = child_env(hub, home)
    resumed = None
    for i, point in enumerate((first, rng.choice(list(KILL_POINTS)), rng.choice(list(KILL_POINTS)))):
        n = rng.randint(1, KILL_POINTS[point])
        child = subprocess.run([sys.executable, "-c", KILL_CHILD, rid, str(out), point, str(n)], env=env,
                               capture_output=True, text=True, timeout=300)
        if child.returncode == 0 and i > 0:
            break  # the conversion finished before reaching the point
        assert child.returncode == -signal.SIGKILL, child.stderr
        assert not (out / "manifest.json").exists()
        resumed = len(hub.log) if resumed is None else resumed
    if first == "partial":  # the next run asked for the rest of the partial shard, not all of it
        assert any(r[0] == "GET" and r[1].endswith(".safetensors") and r[2] and not r[2].startswith("bytes=0-")
                   for r in hub.log[resumed:]), hub.log[resumed:]
    done = {p.stem for p in (out / ".moepack" / "done").glob("*.json")} if (out / ".moepack").exists() else set()
    before = len(hub.log)
    if not (out / "manifest.json").exists():
        res = run_convert(hub, home, rid, out, stream=True, window=1)
        assert res.returncode == 0, res.stderr
    same_pack(out, local_packs[rid])
    fetched = {r[1].rsplit("/", 1)[1] for r in hub.log[before:] if r[0] == "GET" and not r[2]
               and r[1].endswith(".safetensors")}
    units = plan_units(Checkpoint(repos[rid]), RECIPE)[0]
    finished = {s for s in {f for u in units for f in u.reads} if all(u.id in done for u in units if s in u.reads)}
    assert not fetched & finished


@pytest.mark.parametrize("kind,times,ok", [("drop", 1, True), ("corrupt", 1, True), ("truncate", 99, False),
                                           ("corrupt", 99, False), ("drop", 99, False)])
def test_server_faults_retry_or_fail_clearly(hub, repos, local_packs, tmp_path, kind, times, ok):
    """A connection dropped mid-shard, a truncated shard or one whose sha256 is wrong: retried, and when it keeps
    happening a one-line error that says to re-run; never a pack that looks complete."""
    rid = "acme/qwen3-moe"
    shard = sorted(n for n in hub.repos[rid].files if n.endswith(".safetensors"))[1]
    hub.faults[shard] = {"kind": kind, "times": times}
    out = tmp_path / "out"
    res = run_convert(hub, tmp_path / "home", rid, out, stream=True)
    if ok:
        assert res.returncode == 0, res.stderr
        same_pack(out, local_packs[rid])
        return
    assert res.returncode != 0
    assert not (out / "manifest.json").exists()
    last = res.stderr.strip().splitlines()[-1]
    assert "SourceError" in last and shard in last and "re-run" in last, last
    if kind == "corrupt":
        assert "sha256" in last


def test_read_speed_measures_and_cleans_up(tmp_path):
    """The disk test behind plan's speed bound reads expert-sized blocks of a scratch file it then removes."""
    from moepack.convert.plan import read_speed

    bps, mode = read_speed(tmp_path, 16384, seconds=0.05, threads=2, size=4 << 20)
    assert bps > 0 and mode in ("O_DIRECT", "F_NOCACHE", "buffered")
    assert list(tmp_path.iterdir()) == []


def test_stream_sends_token_and_pins_revision(hub, repos, local_packs, tmp_path):
    """HF_TOKEN goes with every request (a gated repo refuses requests without it); --revision pins the commit,
    and an unknown revision is a one-line error before anything is written."""
    rid = "acme/mixtral-fused"
    hub.token = "hf_test_token"
    env = {**child_env(hub, tmp_path / "home"), "HF_TOKEN": hub.token}
    res = subprocess.run([sys.executable, "-c", RUN, rid, str(tmp_path / "out"),
                          json.dumps({"stream": True, "revision": hub.repos[rid].sha})], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    same_pack(tmp_path / "out", local_packs[rid])
    assert set(hub.auth) == {f"Bearer {hub.token}"}
    res = subprocess.run([sys.executable, "-c", RUN, rid, str(tmp_path / "out2"),
                          json.dumps({"stream": True, "revision": "no-such-branch"})], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode != 0 and "SourceError" in res.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out2" / "manifest.json").exists()
    res = subprocess.run([sys.executable, "-c", RUN, rid, str(tmp_path / "out3"), json.dumps({"stream": True})],
                         env={k: v for k, v in env.items() if k != "HF_TOKEN"}, capture_output=True, text=True,
                         timeout=300)  # no token: refused with a message that names HF_TOKEN
    assert res.returncode != 0 and "HF_TOKEN" in res.stderr.strip().splitlines()[-1]


CHECK = r"""
import json, sys
from moepack.convert import plan, pipeline
from moepack.convert.recipe import Recipe
if __name__ == "__main__":
    free = int(sys.argv[3])
    plan.free_bytes = lambda path: free
    try:
        pipeline.convert(sys.argv[1], sys.argv[2], Recipe(), progress=False, workers=1)
        print(json.dumps({"ok": True}))
    except Exception as e:
        print(json.dumps({"ok": False, "type": type(e).__name__, "msg": str(e)}))
"""


def test_disk_check_picks_stream_or_refuses(hub, repos, tmp_path):
    """With room for the pack and a few shards but not the download: streams, saying so; with room for neither:
    refuses before downloading a shard, giving both figures and the option that fits."""
    rid = "acme/qwen3-moe"
    res = subprocess.run([sys.executable, "-m", "moepack.cli", "plan", rid, "--json", "--disk-gbps", "2"],
                         env=child_env(hub, tmp_path / "h0"), capture_output=True, text=True, timeout=300)
    d = json.loads(res.stdout)["disk"]
    between = (d["with_stream"] + d["without_stream"]) // 2
    env = child_env(hub, tmp_path / "h1")
    r = subprocess.run([sys.executable, "-c", CHECK, rid, str(tmp_path / "a"), str(between)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert json.loads(r.stdout.splitlines()[-1]) == {"ok": True}
    assert "--stream" in r.stderr and "cannot hold the download" in r.stderr
    before = len(hub.log)
    r = subprocess.run([sys.executable, "-c", CHECK, rid, str(tmp_path / "b"), str(d["pack"] // 2)],
                       env=child_env(hub, tmp_path / "h2"), capture_output=True, text=True, timeout=300)
    res = json.loads(r.stdout.splitlines()[-1])
    assert res["type"] == "DiskSpaceError", res
    assert "streamed" in res["msg"] and "full" in res["msg"] and "larger disk" in res["msg"]
    assert not [x for x in hub.log[before:] if x[0] == "GET" and x[1].endswith(".safetensors") and not x[2]]
