"""The runtime's contracts: budgets, direct I/O and its fallback, streaming a model several times its budget."""

from __future__ import annotations

import errno
import json
import mmap
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import moepack
from moepack.convert.pipeline import convert
from moepack.convert.recipe import Recipe
from moepack.demo import SyntheticSpec, write_checkpoint
from moepack.errors import BudgetError
from moepack.runtime import io as mio
from moepack.runtime.memory import parse_bytes

PROMPT = [5, 9, 200, 31, 77, 14, 3, 150]


def test_parse_bytes():
    assert parse_bytes("8GB") == 8 << 30
    assert parse_bytes("512 MiB") == 512 << 20
    assert parse_bytes("1.5G") == 3 << 29
    assert parse_bytes(12345) == 12345
    with pytest.raises(ValueError):
        parse_bytes("lots")


def test_budget_too_small_states_minimum_and_minimum_works(small_pack):
    with pytest.raises(BudgetError) as err:
        moepack.load(small_pack, memory_budget=1000)
    minimum = err.value.minimum
    assert isinstance(minimum, int) and str(minimum) in str(err.value)
    with pytest.raises(BudgetError):
        moepack.load(small_pack, memory_budget=minimum - 1)
    eng = moepack.load(small_pack, memory_budget=minimum)
    assert eng.plan.n_slots == 4  # exactly one layer's top-k
    assert eng.plan.dense_bytes + eng.plan.n_slots * eng.plan.slot_bytes <= minimum


def test_quantized_output_independent_of_budget(small_pack):
    big = moepack.load(small_pack, memory_budget="1GB")
    assert big.plan.n_slots == 3 * 16  # every expert fits
    small = moepack.load(small_pack, memory_budget=big.plan.minimum)
    np.testing.assert_array_equal(big.logits(PROMPT), small.logits(PROMPT))
    assert list(big.generate(PROMPT, 8)) == list(small.generate(PROMPT, 8))
    # the small pool really streamed: more misses, reads of whole aligned expert files
    s = small.stats()
    assert s["misses"] > big.stats()["misses"]
    assert s["bytes_read"] == s["reads"] * small.store.file_bytes
    assert s["bytes_read"] % 16384 == 0


def test_sampling_is_seeded(small_pack):
    eng = moepack.load(small_pack)
    a = list(eng.generate(PROMPT, 10, temperature=0.9, top_p=0.9, top_k=50, seed=7))
    b = list(eng.generate(PROMPT, 10, temperature=0.9, top_p=0.9, top_k=50, seed=7))
    assert a == b
    assert list(eng.generate(PROMPT, 5, stop_tokens={a[0]}, temperature=0.9, top_p=0.9, top_k=50, seed=7)) == a[:1]


def test_cached_generation_matches_full_forward(small_pack):
    eng = moepack.load(small_pack)
    toks = list(eng.generate(PROMPT, 6))
    full = eng.logits(PROMPT + toks[:-1])
    assert [int(np.argmax(r)) for r in full[len(PROMPT) - 1 :]] == toks


def direct_io_works(path: Path) -> bool:
    """The oracle, independent of moepack.runtime.io: whether this file system gives ``path`` to an O_DIRECT open
    and a page-aligned, page-sized read (an anonymous mmap is page-aligned). EINVAL is its refusal."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            with mmap.mmap(-1, mmap.PAGESIZE) as buf:
                os.preadv(fd, [buf], 0)
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return False
    return True


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="this OS has no O_DIRECT (macOS reads uncached through "
                                                          "F_NOCACHE: test_macos_reader_*)")
def test_direct_io_is_used_where_the_file_system_allows(small_pack):
    eng = moepack.load(small_pack, memory_budget="1GB")
    eng.logits(PROMPT)
    f = next((small_pack / "experts").rglob("*.bin"))
    assert eng.store.io.mode == ("O_DIRECT" if direct_io_works(f) else "buffered")


@pytest.mark.parametrize("stage", ["open", "read"])
def test_buffered_fallback_when_file_system_refuses_direct_io(small_pack, monkeypatch, caplog, stage):
    """Some file systems refuse O_DIRECT at open (EINVAL), others only at the read; both fall back with a notice."""
    real_open, real_preadv = os.open, os.preadv
    direct_fds = set()

    def fake_open(path, flags, *a):
        if flags & getattr(os, "O_DIRECT", 0):
            if stage == "open":
                raise OSError(22, "Invalid argument", path)
            fd = real_open(path, flags, *a)
            direct_fds.add(fd)
            return fd
        return real_open(path, flags, *a)

    def fake_preadv(fd, bufs, offset):
        if fd in direct_fds:
            direct_fds.discard(fd)
            raise OSError(22, "Invalid argument")
        return real_preadv(fd, bufs, offset)

    want = moepack.load(small_pack, memory_budget="1GB").logits(PROMPT)
    monkeypatch.setattr(mio.os, "open", fake_open)
    monkeypatch.setattr(mio.os, "preadv", fake_preadv)
    with caplog.at_level("WARNING", logger="moepack.runtime.io"):
        eng = moepack.load(small_pack, memory_budget="1GB")
        got = eng.logits(PROMPT)
    assert eng.store.io.mode == "buffered"
    assert caplog.text.count("falling back to buffered reads") == 1  # one notice, not one per read
    np.testing.assert_array_equal(got, want)


def test_forced_buffered_reads_give_same_output(small_pack):
    a = moepack.load(small_pack, direct_io=False)
    assert a.store.io.mode == "buffered"
    np.testing.assert_array_equal(a.logits(PROMPT), moepack.load(small_pack).logits(PROMPT))


def test_macos_reader_sets_nocache_and_no_readahead(small_pack):
    calls = []
    reader = mio.DirectReader(platform="darwin", fcntl_fn=lambda fd, cmd, arg: calls.append((cmd, arg)))
    f = str(next((small_pack / "experts").rglob("*.bin")))
    buf = mio.aligned_buffer(os.path.getsize(f))
    assert reader.read_into(f, buf) == buf.nbytes
    assert (mio.F_NOCACHE, 1) in calls and (mio.F_RDAHEAD, 0) in calls
    assert reader.mode == "F_NOCACHE"
    assert bytes(buf) == Path(f).read_bytes()


def test_macos_reader_falls_back_when_fcntl_refuses(small_pack, caplog):
    def refuse(fd, cmd, arg):
        raise OSError(22, "Invalid argument")

    reader = mio.DirectReader(platform="darwin", fcntl_fn=refuse)
    f = str(next((small_pack / "experts").rglob("*.bin")))
    buf = mio.aligned_buffer(os.path.getsize(f))
    with caplog.at_level("WARNING", logger="moepack.runtime.io"):
        reader.read_into(f, buf)
    assert reader.mode == "buffered" and bytes(buf) == Path(f).read_bytes()


def test_truncated_expert_file_is_a_clear_error(small_pack, tmp_path):
    import shutil

    dst = tmp_path / "pack"
    shutil.copytree(small_pack, dst)
    victim = dst / "experts" / "001" / "0003.bin"
    victim.write_bytes(victim.read_bytes()[:4096])
    eng = moepack.load(dst, memory_budget="1GB")
    with pytest.raises(OSError, match="0003.bin"):
        for L in eng.reader.moe_layers:
            eng.store.fetch(L, list(range(16)))


STREAM_SCRIPT = textwrap.dedent("""
    import json, sys
    import moepack
    from moepack.runtime.memory import peak_rss
    base = peak_rss()  # the high-water mark before loading: the imports' own
    eng = moepack.load(sys.argv[1], memory_budget=int(sys.argv[2]))
    toks = list(eng.generate([5, 9, 200, 31, 77, 14, 3, 150], 8))
    print(json.dumps({"base": base, "peak": peak_rss(), "tokens": toks, "stats": eng.stats(),
                      "plan": eng.plan.__dict__}))
""")


def test_model_three_times_larger_than_budget_streams_within_budget(tmp_path):
    """A pack of a few hundred MB runs under a budget of a third of its size; RSS stays within budget + overhead."""
    spec = SyntheticSpec(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2,
                         head_dim=64, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=512,
                         vocab_size=1024)
    ckpt = write_checkpoint(tmp_path / "ckpt", spec)
    pack = convert(str(ckpt), tmp_path / "pack", Recipe(quantize=False), progress=False)
    size = sum(p.stat().st_size for p in pack.rglob("*") if p.is_file())
    assert size > 250e6
    budget = size // 3
    out = subprocess.run([sys.executable, "-c", STREAM_SCRIPT, str(pack), str(budget)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(r["tokens"]) == 8
    assert r["plan"]["n_slots"] < 6 * 32  # not everything fits: experts were evicted and re-read
    assert r["stats"]["misses"] > r["plan"]["n_slots"]
    # the README's documented overhead: one staging buffer per I/O thread, plus 64 MiB for MLX, KV cache, activations
    overhead = r["stats"]["io_threads"] * r["stats"]["expert_file_bytes"] + (64 << 20)
    assert r["peak"] - r["base"] <= budget + overhead, (r["peak"] - r["base"], budget, overhead)
