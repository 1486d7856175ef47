"""Gemma 4's MoE release: parity of the multimodal checkpoint's text model with transformers (sliding windows shorter
than the prompt, keys as values in the global layers, a dense MLP beside the MoE, per-layer embeddings, soft-capped
logits), in both config spellings; the per-layer embedding table streamed from the pack, with the same output at any
budget and as when resident."""

import json
import sys
from dataclasses import replace
from pathlib import Path

import mlx.utils
import numpy as np
import pytest
from checkpoints import build
from parity import EXACT, PROMPT, check_parity

import moepack
from moepack.convert.pipeline import convert
from moepack.formats.reader import PackReader
from moepack.runtime.tables import StreamedEmbedding

PLE = "model.embed_tokens_per_layer.weight"


# transformers 5's config spelling (per_layer_config) and the release's (global_head_dim, num_global_key_value_heads);
# seed 3: greedy tokens that vary (seed 0's repeat one token)
@pytest.mark.parametrize("old", [False, True])
def test_gemma4_parity(tmp_path, old):
    check_parity("gemma4", tmp_path, old_spelling=old, seed=3)


def test_per_layer_table_is_streamed(tmp_path):
    """The per-layer embedding table is a streamed table (SPEC 3.6) though the head is tied (the input embedding then
    stays dense): the model holds no copy of it, rows are read as tokens need them, and the logits and tokens are
    those of the same checkpoint converted with the table resident, with every row cached or only one."""
    ckpt = build("gemma4", tmp_path / "ckpt")
    streamed = convert(str(ckpt), tmp_path / "streamed", EXACT, progress=False)
    resident = convert(str(ckpt), tmp_path / "resident", replace(EXACT, stream_tables=False), progress=False)
    m, m1 = PackReader(streamed).manifest, PackReader(resident).manifest
    assert list(m.tables) == [PLE] and PLE not in m.dense and "model.embed_tokens.weight" in m.dense
    assert m.format_version == 2 and m1.format_version == 1 and PLE in m1.dense
    table = m.tables[PLE]

    def run(pack, budget=None):
        with moepack.load(pack, budget, heat=False) as e:
            return e.logits(PROMPT), list(e.generate(PROMPT, 8)), e.stats(), e

    want_logits, want_tokens, _, res = run(resident)
    full_logits, full_tokens, full, e = run(streamed)
    need = e.plan.minimum
    small_logits, small_tokens, small, s = run(streamed, need)
    assert isinstance(s.model.model.embed_tokens_per_layer, StreamedEmbedding)
    assert not any("per_layer" in k and "embed" in k for k, _ in mlx.utils.tree_flatten(s.model.parameters()))
    assert s.plan.dense_bytes == res.plan.dense_bytes - m1.dense[PLE].nbytes  # resident: the table's bytes besides
    np.testing.assert_array_equal(full_logits, want_logits)
    np.testing.assert_array_equal(small_logits, want_logits)
    assert full_tokens == small_tokens == want_tokens
    assert (full["table_cache_rows"], small["table_cache_rows"]) == (table.rows, 1)
    assert small["table_lookups"] == full["table_lookups"] == 2 * len(set(PROMPT)) + 7  # the prompt twice, then 7
    assert full["table_misses"] == len(set(PROMPT) | set(full_tokens[:-1]))  # each row read once
    assert small["table_misses"] > full["table_misses"]
    assert 0 < small["table_bytes_read"] <= small["table_misses"] * table.read_bytes()  # only the pages of missed rows
    # tools/virtual_pack.py (sizes a release from its config alone) lays the table out as the converter does
    sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
    from virtual_pack import virtual_pack

    virtual = PackReader(virtual_pack(json.loads((ckpt / "config.json").read_text()), tmp_path / "virtual", EXACT,
                                      None)).manifest
    assert list(virtual.tables) == [PLE]
    assert (replace(virtual.tables[PLE], row=None), virtual.tables[PLE].row.parts) == \
        (replace(table, row=None), table.row.parts)


def test_per_layer_inputs_keep_the_model_in_one_pipeline_stage():
    """Every layer's PLE input is made from the embedding, which only the first stage holds: a PLE model is not split
    (a clear refusal), one without PLE is split anywhere."""
    from moepack import arch
    from moepack.runtime.distributed.split import split_layers

    cfg = {"model_type": "gemma4_text", "num_hidden_layers": 4, "hidden_size_per_layer_input": 8}
    assert arch.stage_starts(cfg) == set() and arch.stage_starts({**cfg, "hidden_size_per_layer_input": 0}) is None
    assert arch.per_layer_width({k: v for k, v in cfg.items() if k != "hidden_size_per_layer_input"}) == 256
    with pytest.raises(ValueError, match="none but 0"):
        split_layers([1, 1, 1, 1], 2, starts=arch.stage_starts(cfg))
