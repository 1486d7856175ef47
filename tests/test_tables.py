"""Streamed tables (issue #17, SPEC 3.6): the input embedding stored row-addressable and read on demand.

Oracles: the same pack converted with the embedding resident (a version 1 pack) gives the same logits and tokens;
the engine's own counters say which rows were read and how many bytes; hostile table entries are PackErrors.
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
from moepack.errors import BudgetError, PackError
from moepack.formats.manifest import Table
from moepack.formats.reader import PackReader
from moepack.runtime.engine import Engine, Stage
from moepack.runtime.memory import compute_dtype_for, memory_need

EMBED = "model.embed_tokens.weight"
PROMPT = [3, 17, 17, 400, 9, 2047, 3, 1000, 5, 64, 1, 77]


def _convert(root: Path, out: str, stream: bool) -> Path:
    from moepack.convert.pipeline import convert
    from moepack.convert.recipe import Recipe
    from moepack.demo import SyntheticSpec, write_checkpoint

    ckpt = root / "ckpt"
    if not ckpt.exists():  # a vocabulary large next to the rest of the model: the table dominates the dense part
        write_checkpoint(ckpt, SyntheticSpec(hidden_size=128, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                                             moe_intermediate_size=64, vocab_size=4096))
    return convert(str(ckpt), root / out, Recipe(expert_group_size=32, dense_group_size=32, stream_tables=stream),
                   progress=False, workers=1)


@pytest.fixture(scope="module")
def packs(tmp_path_factory) -> tuple[Path, Path]:
    """(streamed, resident): one checkpoint converted with its embedding as a table, and without (version 1)."""
    root = tmp_path_factory.mktemp("tables")
    return _convert(root, "streamed", True), _convert(root, "resident", False)


def run(pack: Path, budget=None, **kw) -> tuple[list[int], np.ndarray, dict]:
    with moepack.load(pack, budget, heat=False, **kw) as e:
        logits = e.logits(PROMPT)
        tokens = list(e.generate(PROMPT, 8))
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
    assert small["table_bytes_read"] == small["table_misses"] * table.block_bytes < table.length  # one block a miss


def test_budget_split_and_refusal(packs):
    streamed, _ = packs
    reader = PackReader(streamed)
    need = memory_need(reader, compute_dtype_for(reader))
    assert need.row_bytes == reader.tables[EMBED].row_bytes and need.table_rows == 4096
    with pytest.raises(BudgetError) as e:
        moepack.load(streamed, need.minimum - 1, heat=False)
    assert e.value.minimum == need.minimum and "table rows" in str(e.value)
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
    assert s["bytes"]["table_per_token_uncached"] == reader.tables[EMBED].block_bytes
    assert s["tables"][EMBED]["shape"] == [4096, 128]
    with moepack.load(streamed, budget, heat=False) as e:  # the engine splits the same budget the same way
        assert (e.plan.n_slots, e.plan.table_rows) == (slots, rows)
