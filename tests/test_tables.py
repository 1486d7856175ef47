"""Streamed tables (issue #17, SPEC 3.6): the input embedding stored row-addressable and read on demand.

Oracles: the same pack converted with the embedding resident (a version 1 pack) gives the same logits and tokens;
the engine's own counters say which rows were read and how many bytes, checked against the pages holding the rows a
step needs; hostile table entries are PackErrors.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import moepack
from moepack.demo import SyntheticSpec, write_checkpoint
from moepack.errors import BudgetError, PackError
from moepack.formats.manifest import Table
from moepack.formats.reader import PackReader
from moepack.runtime.bench import _run
from moepack.runtime.engine import Engine, Stage
from moepack.runtime.io import PAGE, cover
from moepack.runtime.memory import compute_dtype_for, memory_need

EMBED = "model.embed_tokens.weight"
PROMPT = [3, 17, 17, 400, 9, 2047, 3, 1000, 5, 64, 1, 77]


def _convert(root: Path, spec: SyntheticSpec, **recipe) -> tuple[Path, Path]:
    """(streamed, resident): one checkpoint converted with its embedding as a table, and without (version 1)."""
    from moepack.convert.pipeline import convert
    from moepack.convert.recipe import Recipe

    write_checkpoint(root / "ckpt", spec)
    return tuple(convert(str(root / "ckpt"), root / out, Recipe(**recipe, stream_tables=stream), progress=False,
                         workers=1) for out, stream in (("streamed", True), ("resident", False)))


@pytest.fixture(scope="module")
def packs(tmp_path_factory) -> tuple[Path, Path]:
    """A vocabulary large next to the rest of the model: the table dominates the dense part."""
    spec = SyntheticSpec(hidden_size=128, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                         moe_intermediate_size=64, vocab_size=4096)
    return _convert(tmp_path_factory.mktemp("tables"), spec, expert_group_size=32, dense_group_size=32)


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, Path]:
    """A table more than 3x the smallest budget: a 32,768 x 64 float32 embedding beside an int4 head, carried as the
    release ships it (as n-gram and per-layer tables outweigh the rest of a model)."""
    spec = SyntheticSpec(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                         num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, vocab_size=32768,
                         int4_head=True)
    return _convert(tmp_path_factory.mktemp("big"), spec, quantize=False, dtype="float32")


def pages(table: Table, rows) -> int:
    """Bytes of the distinct 4 KiB pages holding ``rows``: what reading them needs, no more."""
    return PAGE * len({p for r in set(rows) for p in range(table.row_offset(r) // PAGE,
                                                            (table.row_offset(r) + table.row_bytes - 1) // PAGE + 1)})


def run(pack: Path, budget=None, prompt=PROMPT, **kw) -> tuple[list[int], np.ndarray, dict]:
    with moepack.load(pack, budget, heat=False, **kw) as e:
        logits = e.logits(prompt)
        tokens = list(e.generate(prompt, 8))
        return tokens, logits, e.stats()


def test_versions_and_layout(packs):
    streamed, resident = packs
    m, m1 = PackReader(streamed).manifest, PackReader(resident).manifest
    assert (m.format_version, m1.format_version) == (2, 1)
    assert EMBED in m.tables and EMBED not in m.dense and "tables" not in json.loads((resident / "manifest.json").read_text())
    t = m.tables[EMBED]
    assert t.shape == [4096, 128] and t.block_bytes % m.alignment == 0
    ends = [t.row_offset(r) + t.row_bytes for r in range(t.rows)]
    assert all(t.block_offset(r) <= t.row_offset(r) and ends[r] <= t.block_offset(r) + t.block_bytes for r in range(t.rows))
    # a row decodes to the same values as that row of the resident tensor
    rows = [0, 5, 4095, 1234]
    assert mx.array_equal(PackReader(streamed).table_rows(EMBED, rows),
                          PackReader(resident).dense_tensor(EMBED)[mx.array(rows)]).item()


def test_small_budget_reads_only_the_rows_it_needs_and_generates_the_same(packs):
    streamed, resident = packs
    need = memory_need(PackReader(streamed), compute_dtype_for(PackReader(streamed)))
    table = PackReader(streamed).tables[EMBED]
    assert table.length > 3 * (need.minimum - need.dense_bytes)  # the table is far larger than what is left for it
    old_tokens, old_logits, _ = run(resident)
    full_tokens, full_logits, full = run(streamed)
    min_tokens, min_logits, small = run(streamed, need.minimum)
    assert full_tokens == min_tokens == old_tokens
    assert np.array_equal(full_logits, old_logits) and np.array_equal(min_logits, old_logits)
    assert full["table_cache_rows"] == table.rows and small["table_cache_rows"] == 1
    # the rows looked up: each pass's distinct tokens (the prompt twice, then one per generated token but the last)
    looked = 2 * len(set(PROMPT)) + 7
    assert small["table_lookups"] == full["table_lookups"] == looked
    assert small["table_hits"] + small["table_misses"] == looked and small["table_misses"] > full["table_misses"]
    assert full["table_misses"] == len(set(PROMPT) | set(full_tokens[:-1]))  # a whole table cached: each row once
    assert 0 < small["table_bytes_read"] <= small["table_misses"] * table.read_bytes() < table.length  # a row's page


def test_tables_three_times_the_budget_generate_the_same_reading_only_the_rows_needed(big):
    """Issue 17's figure: a pack whose table is over 3x the memory budget generates the tokens it generates at full
    budget, each step reading the pages of the rows it needs and nothing more (counted as `moepack bench` counts)."""
    streamed, resident = big
    reader = PackReader(streamed)
    need, table = memory_need(reader, compute_dtype_for(reader)), reader.tables[EMBED]
    assert need.table_bytes == table.length >= 3 * need.minimum
    prompt = [*PROMPT, 30000, 32767, 16, 31]  # 16 and 31 share a page with each other and with row 17
    old_tokens, old_logits, _ = run(resident, prompt=prompt)
    full_tokens, full_logits, full = run(streamed, prompt=prompt)
    min_tokens, min_logits, small = run(streamed, need.minimum, prompt=prompt)
    assert full_tokens == min_tokens == old_tokens
    assert np.array_equal(full_logits, old_logits) and np.array_equal(min_logits, old_logits)
    assert (full["table_cache_rows"], small["table_cache_rows"]) == (table.rows, 1)
    assert full["table_misses"] == len(set(prompt) | set(full_tokens[:-1]))  # each row read once, then cached

    with moepack.load(streamed, need.minimum, heat=False) as e:
        rep = _run(e, prompt, 8, "minimum")
        total, experts = e.table_counters(), e.store.counters
        summary = rep.summary(e.store.payload[e.reader.moe_layers[0]])
    dec = rep.tokens  # the 7 decode steps; step j embeds token j
    assert len(dec) == 7 and all(t.table_lookups == 1 for t in dec)
    for t, token in zip(dec, min_tokens):
        assert t.table_bytes == (0 if t.table_hits else pages(table, [token])) <= table.read_bytes()
    assert total.bytes_read - sum(t.table_bytes for t in dec) == pages(table, prompt)  # the prompt's one pass
    assert pages(table, prompt) < len(set(prompt)) * PAGE  # rows sharing a page cost one page
    assert total.bytes_read < table.length / 50
    # bench keeps tables apart from experts: expert bytes are whole expert files, table bytes these pages
    assert summary["table_bytes_per_token"] == sum(t.table_bytes for t in dec) / 7
    assert summary["table_rows_per_token"] == 1.0 and summary["table_hit_rate"] == total.hits / total.lookups
    assert summary["bytes_read_per_token"] == sum(t.bytes_read for t in dec) / 7
    assert experts.bytes_read == experts.reads * e.store.file_bytes


def test_a_steps_missing_rows_are_read_together_in_batches(big):
    """Rows whose pages touch go in one read; a step larger than the staging buffer goes in several batches, each
    handed to the I/O threads at once; the rows equal the slow reader's (PackReader.table_rows)."""
    from moepack.runtime.io import DirectReader
    from moepack.runtime.memory import table_staging
    from moepack.runtime.tables import TableStore

    class Pool:  # records each batch the store hands over
        def __init__(self):
            self.batches = []

        def map(self, fn, items):
            items = list(items)
            self.batches.append(len(items))
            return map(fn, items)

    reader = PackReader(big[0])
    table, pool = reader.tables[EMBED], Pool()
    run_of_rows = list(range(64))  # 4 adjacent pages: one read
    spread = [32 * k + 5 for k in range(4, 604)]  # every other page: 600 reads of a page each
    ids = run_of_rows + spread
    assert pages(table, spread) > 2 * table_staging(table)
    store = TableStore(reader, EMBED, 1, mx.float32, DirectReader(), pool=pool)
    got = store(mx.array(ids))
    assert mx.array_equal(got, reader.table_rows(EMBED, ids)).item()
    c = store.counters
    assert (c.misses, c.reads, c.bytes_read) == (len(ids), 601, pages(table, ids))
    assert len(pool.batches) >= 3 and sum(pool.batches) == 601
    store(mx.array([63, spread[-1]]))  # the one cached row (the last read) is a hit, the other read again
    assert (c.hits, c.misses, c.reads) == (1, len(ids) + 1, 602)


def test_cover_merges_rows_whose_pages_touch():
    ranges = [(0, 100), (100, 200), (5000, 5100), (8192, 8200), (20000, 20100)]
    assert cover(ranges, 8192) == ([(0, 8192), (8192, 4096), (16384, 4096)], [0, 0, 0, 1, 2])
    assert cover(ranges, 1 << 20)[0] == [(0, 12288), (16384, 4096)]


def test_budget_split_and_refusal(packs):
    streamed, _ = packs
    reader = PackReader(streamed)
    need = memory_need(reader, compute_dtype_for(reader))
    assert need.row_bytes == reader.tables[EMBED].row_bytes and need.table_rows == 4096
    with pytest.raises(BudgetError) as e:
        moepack.load(streamed, need.minimum - 1, heat=False)
    assert e.value.minimum == need.minimum and "table rows" in str(e.value) and f"{need.minimum} bytes" in str(e.value)
    slots, rows = need.split(need.minimum + 64 * need.slot_bytes)
    assert 1 < rows < 4096 and slots > need.top_k
    assert need.split(need.minimum + need.experts * need.slot_bytes + 4096 * need.row_bytes) == (need.experts, 4096)


def test_only_the_first_pipeline_stage_embeds(packs):
    streamed, _ = packs
    first, second = (Engine(streamed, stage=Stage(i, 2, i, i + 1), heat=False) for i in (0, 1))
    try:
        assert list(first.tables) == [EMBED] and second.tables == {}
        assert second.plan.table_rows == second.plan.row_bytes == 0  # no table in its budget
    finally:
        first.close()
        second.close()


def test_token_outside_the_table_is_refused(packs):
    with moepack.load(packs[0], heat=False) as e, pytest.raises(ValueError, match="outside"):
        e.logits([1, 4096])


def test_verify_covers_the_table_file(packs, tmp_path):
    from conftest import flip

    copy = Path(shutil.copytree(packs[0], tmp_path / "pack"))
    table = PackReader(copy).tables[EMBED]
    flip(copy / table.file, table.row_offset(7) + 3)
    assert any(table.file in p for p in PackReader(copy).verify().problems)
    with pytest.raises(PackError, match="blake3 mismatch"):
        moepack.load(copy, heat=False, verify=True)


def _edit(pack: Path, fn) -> None:
    m = json.loads((pack / "manifest.json").read_text())
    fn(m, m["tables"][EMBED])
    (pack / "manifest.json").write_text(json.dumps(m))


HOSTILE = {
    "rows out of range": (lambda m, t: t.update(rows=t["rows"] + t["rows_per_block"]), "rows take"),
    "misaligned blocks": (lambda m, t: t.update(block_bytes=t["block_bytes"] - 4096), "block_bytes"),
    "rows per block": (lambda m, t: t.update(rows_per_block=t["rows_per_block"] + 1), "rows_per_block"),
    "misaligned row part": (lambda m, t: t["row"]["parts"]["scales"].update(offset=t["row"]["parts"]["scales"]["offset"] + 8),
                            "multiple of 64"),
    "wrong row size": (lambda m, t: t.update(row_bytes=t["row_bytes"] + 64), "row_bytes"),
    "wrong file size": (lambda m, t: m["files"][t["file"]].update(length=m["files"][t["file"]]["length"] + 16384), "rows take"),
    "part past the row": (lambda m, t: t["row"]["parts"]["biases"].update(offset=t["row_bytes"]), "run past"),
    "two-dimensional row": (lambda m, t: t["row"].update(shape=[1, 128]), "one row's shape"),
    "empty row": (lambda m, t: t["row"].update(shape=[0]), "out of range"),
    "a dense file": (lambda m, t: t.update(file=next(iter(m["dense"].values()))["parts"]["weight"]["file"]), "also holds"),
    "unlisted file": (lambda m, t: t.update(file="tables/other.bin"), "not a file listed"),
    "in a version 1 pack": (lambda m, t: m.update(format_version=1), "version 2 addition"),
    "version 3": (lambda m, t: m.update(format_version=3), "reads versions 1, 2"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_table_entries_are_refused(packs, tmp_path, case):
    copy = Path(shutil.copytree(packs[0], tmp_path / "pack"))
    fn, msg = HOSTILE[case]
    _edit(copy, fn)
    with pytest.raises(PackError, match=msg):
        PackReader(copy)


def test_table_symlinked_out_of_the_pack_is_refused(packs, tmp_path):
    copy = Path(shutil.copytree(packs[0], tmp_path / "pack"))
    rel = PackReader(copy).tables[EMBED].file
    outside = tmp_path / "outside.bin"
    shutil.move(copy / rel, outside)
    os.symlink(outside, copy / rel)
    with pytest.raises(PackError, match="leads outside the pack"):
        moepack.load(copy, heat=False)


def test_table_geometry_follows_the_spec():
    from moepack.formats.manifest import Blob, TensorRecord

    row = TensorRecord("raw", [2048], "float32", {"data": Blob(0, 8192, "float32", [2048])})
    t = Table.layout("t.bin", 129280, row, 16384)
    assert (t.row_bytes, t.rows_per_block, t.block_bytes, t.length) == (8192, 2, 16384, 64640 * 16384)
    big = Table.layout("t.bin", 10, TensorRecord("raw", [5000], "float32", {"data": Blob(0, 20000, "float32", [5000])}),
                       16384)
    assert (big.rows_per_block, big.block_bytes, big.row_offset(3)) == (1, 32768, 3 * 32768)
    # what a missing row costs to read: the pages of the worst-placed row (2,176-byte rows straddle a page boundary)
    odd = Table.layout("t.bin", 100, TensorRecord("raw", [1088], "bfloat16", {"data": Blob(0, 2176, "bfloat16", [1088])}),
                       16384)
    assert (t.read_bytes(), big.read_bytes(), odd.read_bytes(), odd.rows_per_block) == (8192, 20480, 8192, 7)
    assert Table.layout("t.bin", 1, odd.row, 16384).read_bytes() == 4096  # one row: never at a straddling place


def test_inspect_reports_the_table_and_the_budget_split(packs):
    from click.testing import CliRunner

    from moepack.cli import main

    streamed = packs[0]
    reader = PackReader(streamed)
    need = memory_need(reader, compute_dtype_for(reader))
    budget = need.minimum + 16 * need.slot_bytes
    r = CliRunner().invoke(main, ["inspect", str(streamed), "--json", "--memory-budget", str(budget)])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    slots, rows = need.split(budget)
    assert s["memory"]["expert_slots"] == slots and s["memory"]["table_cache_rows"] == rows > 1
    assert s["bytes"]["table_per_token_uncached"] == reader.tables[EMBED].read_bytes() == PAGE  # 256-byte rows
    assert s["tables"][EMBED]["shape"] == [4096, 128]
    with moepack.load(streamed, budget, heat=False) as e:  # the engine splits the same budget the same way
        assert (e.plan.n_slots, e.plan.table_rows) == (slots, rows)


def test_plan_and_stats_account_for_tables(big):
    """`plan` (a pack, or tools/virtual_pack.py's manifest-only one) counts the tables' bytes, a token's table reads
    at 0% hits and the recommended budget's split; `generate --stats` reports the split and the table reads."""
    from click.testing import CliRunner

    from moepack.cli import main

    streamed = big[0]
    reader = PackReader(streamed)
    table = reader.tables[EMBED]
    r = CliRunner().invoke(main, ["plan", str(streamed), "--disk-gbps", "1", "--json"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.output)
    m, speed = p["memory"], p["speed"]
    need = memory_need(reader, mx.bfloat16)  # plan sizes as stored
    assert (m["table_bytes"], m["table_bytes_per_token_cold"], m["table_rows"]) == (table.length, PAGE, table.rows)
    assert (m["recommended_split"]["expert_slots"], m["recommended_split"]["table_cache_rows"]) == \
        need.split(m["recommended_budget"])
    assert speed["decode_tok_s_cold"] == pytest.approx(1e9 / (m["bytes_per_token_cold"] + PAGE))

    need = memory_need(reader, compute_dtype_for(reader))
    budget = need.minimum + 64 * need.row_bytes
    r = CliRunner().invoke(main, ["generate", str(streamed), "-p", "hello", "--max-tokens", "3", "--stats",
                                  "--memory-budget", str(budget)])
    assert r.exit_code == 0, r.output
    slots, rows = need.split(budget)
    assert f"budget: {slots} expert slots" in r.output and f"table cache {rows} rows" in r.output
    assert "/token from tables, row hit rate" in r.output
