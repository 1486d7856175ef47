"""Qwen3.8-Flash-Next (``qwen4_exp``): parity of the converted pack with transformers, every distinctive feature
acting on the test prompt (PROMPT holds the EOS token 5 that resets the n-grams; the QSA indexer's budget of 4 is
below its 12 tokens; each PLE table is saved as 3 shards), and the PLE tables streamed from the pack."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from checkpoints import TINY, build, build_multimodal, mtp_head, reference_logits
from parity import (
    EXACT,
    PROMPT,
    check_cached_decoding,
    check_parity,
    check_prefix_reuse,
    nmse,
)
from safetensors.torch import load_file

import moepack
from moepack.convert import pipeline
from moepack.convert.pipeline import convert
from moepack.convert.recipe import Recipe
from moepack.convert.source import Checkpoint
from moepack.formats.reader import PackReader
from moepack.runtime.models.dsa import QSAIndexer
from moepack.runtime.models.qwen4_exp import NGramEmbedding
from moepack.runtime.tables import StreamedEmbedding

PLE = "model.layers.{}.ple.ple_embedding.ngram_embedding.weight"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """(checkpoint, float32 pack, transformers' logits on PROMPT) of the tiny model with its PLE tables in shards."""
    tmp = tmp_path_factory.mktemp("qwen4_exp")
    ckpt = build("qwen4_exp", tmp / "ckpt")
    return ckpt, convert(str(ckpt), tmp / "pack", EXACT, progress=False), reference_logits(ckpt, PROMPT)[0]


def test_parity_tables_in_shards(sharded, tmp_path):
    """Per-expert tensors, each PLE table as ``ngram_embedding.shard_K`` tensors, the config as transformers 5 spells it."""
    assert 5 in PROMPT[1:-1] and TINY["qwen4_exp"][2]["eos_token_id"] == 5  # an EOS inside the prompt
    assert any(".ngram_embedding.shard_2." in k for k in load_file(sharded[0] / "model.safetensors"))
    check_parity("qwen4_exp", tmp_path, ckpt=sharded[0])


def test_parity_fused_old_spelling(tmp_path):
    """Fused experts, whole (unsharded) PLE tables, and the hub's older config spelling (rope_theta and a top-level
    partial_rotary_factor, the layer pattern as ``full_attention_interval``)."""
    check_parity("qwen4_exp", tmp_path, fused=True, old_spelling=True)


def test_multimodal_checkpoint(tmp_path):
    """The release layout: nested text_config whose layer_types say "full_attention" for the indexed layers,
    ``model.language_model.*`` names, a vision tower and a multi-token-prediction head, all but the text model left
    out."""
    ckpt = build_multimodal("qwen4_exp", "Qwen4Exp", tmp_path / "ckpt", extra=mtp_head)
    assert any(k.startswith("model.visual.") for k in load_file(ckpt / "model.safetensors"))
    p = ckpt / "config.json"
    c = json.loads(p.read_text())
    c["text_config"]["layer_types"] = ["linear_attention", "full_attention"] * 2
    p.write_text(json.dumps(c))
    check_parity("qwen4_exp", tmp_path, ckpt=ckpt)


def test_recurrent_and_ple_state_snapshot_for_prefix_reuse(tmp_path):
    """A prompt cache reused up to the EOS and past it: the DeltaNet state, PLE's conv and n-gram context come back
    with the snapshot."""
    check_prefix_reuse("qwen4_exp", tmp_path)


def test_each_feature_acts_on_the_prompt(sharded, monkeypatch):
    """Without the indexer's budget, or without the n-gram reset at the EOS, the logits leave transformers' exactly
    from the first position that feature changes: each is exercised by the parity tests above."""
    _, pack, ref = sharded
    engine = moepack.load(pack)
    assert nmse(engine.logits(PROMPT), ref) < 1e-5

    def moved_from(got: np.ndarray) -> int:
        far = [t for t in range(len(PROMPT)) if nmse(got[t], ref[t]) > 1e-4]
        assert far and all(nmse(got[t], ref[t]) < 1e-5 for t in range(far[0]))
        return far[0]

    with monkeypatch.context() as m:
        for _, mod in engine.model.named_modules():
            if isinstance(mod, QSAIndexer):
                m.setattr(mod, "budget", 1 << 20)  # every key seen
        assert moved_from(engine.logits(PROMPT)) == 5  # the first query with 3 complete blocks of 2 to choose from
    ids = NGramEmbedding.ids

    def no_reset(self, history):  # an EOS blocks nothing (the padding before the prompt still reads as EOS)
        eos, self.eos = self.eos, -1
        try:
            return ids(self, history)
        finally:
            self.eos = eos

    monkeypatch.setattr(NGramEmbedding, "ids", no_reset)
    assert moved_from(engine.logits(PROMPT)) == PROMPT.index(5) + 1  # the token after the EOS


def test_ple_tables_streamed_and_budget_independent(sharded):
    """The PLE tables are tables of the pack (not dense), stand in the model as StreamedEmbedding (no resident
    weight), are read row by row (bytes counted); a budget whose table cache holds a few rows of each gives the
    same logits and tokens as a full one."""
    _, pack, _ = sharded
    reader = PackReader(pack)
    for L in (0, 2):
        assert PLE.format(L) in reader.tables and PLE.format(L) not in reader.manifest.dense
    full = moepack.load(pack, heat=False)
    for L in (0, 2):
        emb = full.model.model.layers[L].ple.ple_embedding.ngram_embedding
        assert isinstance(emb, StreamedEmbedding) and "weight" not in emb.parameters()
    want_logits, want = full.logits(PROMPT), list(full.generate(PROMPT, 8))
    s = full.stats()
    assert s["table_bytes_read"] > 0 and s["table_misses"] > 0
    rows = reader.tables[PLE.format(0)].rows
    assert full.tables[PLE.format(0)].cached_rows == rows  # a full budget caches the whole table
    small = moepack.load(pack, memory_budget=full.plan.minimum, heat=False)
    cached = small.tables[PLE.format(0)].cached_rows
    assert cached == 4 and cached * 100 < rows  # one token's rows: one per n-gram head
    np.testing.assert_array_equal(small.logits(PROMPT), want_logits)
    assert list(small.generate(PROMPT, 8)) == want
    assert small.stats()["table_bytes_read"] > s["table_bytes_read"]  # rows evicted and read again


def test_sharded_table_converted_a_row_range_at_a_time(tmp_path, monkeypatch):
    """The table's shards are concatenated into the streamed layout from row ranges, never a whole table (nor a whole
    shard) read at once, and the stored rows are the shards' rows in order."""
    ckpt = build("qwen4_exp", tmp_path / "ckpt")
    shards = {k: v for k, v in load_file(ckpt / "model.safetensors").items() if "ngram_embedding.shard_" in k}
    assert len(shards) == 6
    reads: list[tuple[str, int]] = []
    orig = Checkpoint.read

    def spy(self, name, index=None, rows=None, cols=None):
        a = orig(self, name, index, rows, cols)
        reads.append((name, a.shape[0]))
        return a

    monkeypatch.setattr(Checkpoint, "read", spy)
    monkeypatch.setattr(pipeline, "TABLE_CHUNK_BYTES", 1)  # one block of rows at a time
    pack = convert(str(ckpt), tmp_path / "pack", EXACT, progress=False, workers=1)
    shard_rows = {k: v.shape[0] for k, v in shards.items()}
    got = [n for n in reads if n[0] in shard_rows]
    assert got and max(r for _, r in got) < min(shard_rows.values())
    engine = moepack.load(pack)
    for L in (0, 2):
        whole = torch.cat([shards[f"model.layers.{L}.ple.ple_embedding.ngram_embedding.shard_{k}.weight"]
                           for k in range(3)]).numpy()
        store = engine.tables[PLE.format(L)]
        ids = mx.array(np.arange(whole.shape[0]))
        np.testing.assert_array_equal(np.array(store(ids)), whole)


def test_hash_constants_derived_as_transformers_saves_them(sharded):
    """The pack leaves out the checkpoint's int64 hash buffers; the runtime derives the same ones."""
    ckpt, pack, _ = sharded
    tensors = load_file(ckpt / "model.safetensors")
    assert not [n for n in PackReader(pack).manifest.dense if "multipliers" in n or "ngram_heads" in n]
    engine = moepack.load(pack)
    for L in (0, 2):
        ngram: NGramEmbedding = engine.model.model.layers[L].ple.ple_embedding
        base = f"model.layers.{L}.ple.ple_embedding."
        assert ngram._mult.tolist() == tensors[base + "layer_multipliers"].tolist()
        assert ngram._sizes.tolist() == tensors[base + "ngram_heads_vocab_sizes"].tolist()
        assert ngram._offsets.tolist() == tensors[base + "ngram_heads_offsets"].tolist()


def test_cached_decoding_and_prompt_in_passes(tmp_path, monkeypatch):
    """Through the cache (a 5-token prefill, then a token at a time across the EOS), and in 4-token passes with
    attention scored a query at a time, the logits are the full pass's."""
    check_cached_decoding("qwen4_exp", tmp_path, monkeypatch)


def test_resident_tables_same_logits(sharded, tmp_path):
    """``--resident-embeddings``: the joined PLE tables are dense tensors of the pack (a version 1 pack), resident, and
    the logits are the streamed pack's."""
    ckpt, pack, _ = sharded
    resident = convert(str(ckpt), tmp_path / "resident", Recipe(quantize=False, dtype="float32", stream_tables=False),
                       progress=False)
    reader = PackReader(resident)
    assert not reader.tables and reader.manifest.format_version == 1
    assert reader.manifest.dense[PLE.format(0)].shape == PackReader(pack).tables[PLE.format(0)].shape
    np.testing.assert_array_equal(moepack.load(resident).logits(PROMPT), moepack.load(pack).logits(PROMPT))
