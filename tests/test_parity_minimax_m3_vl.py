"""MiniMax-M3 (``minimax_m3_vl``): the text model of the multimodal checkpoint against transformers, the indexer's
block selection acting on the 12-token prompt (3 blocks of 2 kept of 6), cached decoding equal to a full pass, and
the release's layout: ``language_model.*`` names, ``w1/w2/w3`` experts, ``self_attn.index_*``, a nested
``sparse_attention_config``, several shards, its vision tower and projector left out with a notice."""

import json
import logging

import pytest
from checkpoints import make_model, to_old_spelling
from parity import PROMPT, check_cached_decoding, check_parity, nmse

from moepack import arch
from moepack.runtime.models.dsa import BlockIndexer

VISION = ("vision_tower.", "multi_modal_projector.", "patch_merge_mlp.", "model.vision_tower.",
          "model.multi_modal_projector.")


@pytest.mark.parametrize("fused", [False, True])
def test_minimax_m3_vl_parity(tmp_path, fused):
    """The release's tensor names (save_original_format) and transformers 5's fused ones, transformers' config."""
    check_parity("minimax_m3_vl", tmp_path, fused=fused)


def test_minimax_m3_vl_release_checkpoint(tmp_path, caplog):
    """As the release ships: the release's config spelling, names and vision weights, split over several shards
    with an index; the converter leaves the vision tower and projectors out and says so."""
    ckpt = tmp_path / "ckpt"
    make_model("minimax_m3_vl").save_pretrained(ckpt, max_shard_size="100KB")
    (ckpt / "config.json").write_text(json.dumps(to_old_spelling(json.loads((ckpt / "config.json").read_text()))))
    weight_map = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 2 and "model-00001-of-" in min(weight_map.values())
    assert any(n.startswith("patch_merge_mlp.") for n in weight_map)  # the vision weights are there
    assert any(".self_attn.index_q_proj." in n for n in weight_map)
    assert "sparse_attention_config" in json.loads((ckpt / "config.json").read_text())["text_config"]
    with caplog.at_level(logging.WARNING):
        check_parity("minimax_m3_vl", tmp_path, ckpt=ckpt)
    assert "leaving out multi_modal_projector, patch_merge_mlp, vision_tower" in caplog.text
    dense = json.loads((tmp_path / "pack" / "manifest.json").read_text())["dense"]
    assert dense and not [n for n in dense if n.startswith(VISION)]


def test_minimax_m3_vl_selection_acts_and_caches(tmp_path, monkeypatch):
    """Cached decoding and a prompt split into passes give the full pass's logits; the selection matters on this
    prompt: keeping every block instead changes the logits."""
    engine, _ = check_cached_decoding("minimax_m3_vl", tmp_path, monkeypatch)
    indexers = [m for _, m in engine.model.named_modules() if isinstance(m, BlockIndexer)]
    assert len(indexers) == 2
    sparse = engine.logits(PROMPT)
    for m in indexers:
        monkeypatch.setattr(m, "topk", len(PROMPT))
    assert nmse(engine.logits(PROMPT), sparse) > 1e-3


def test_minimax_m3_vl_config_spellings():
    """transformers 5's flat keys and the release's nested ``sparse_attention_config`` / ``moe_layer_freq``."""
    release = {"model_type": "minimax_m3_vl_text", "num_hidden_layers": 3, "moe_layer_freq": [0, 1, 1],
               "index_topk_blocks": 99, "sparse_attention_config": {
                   "sparse_num_index_heads": 4, "sparse_index_dim": 128, "sparse_block_size": 128,
                   "sparse_topk_blocks": 16, "sparse_local_block": 1, "sparse_attention_freq": [0, 1, 1]}}
    flat = arch.flattened(release)
    assert flat["layer_types"] == ["full_attention", "minimax_m3_sparse", "minimax_m3_sparse"]
    assert flat["index_topk_blocks"] == 16  # the nested block wins, as transformers reads it
    assert (flat["index_n_heads"], flat["index_head_dim"], flat["index_block_size"]) == (4, 128, 128)
    assert arch.moe_layers(release) == [1, 2]
    assert arch.moe_layers({**release, "mlp_layer_types": ["sparse", "dense", "sparse"]}) == [0, 2]
    assert arch.moe_layers({"model_type": "minimax_m3_vl_text", "num_hidden_layers": 2}) == [0, 1]  # transformers' default
    multimodal = {"model_type": "minimax_m3_vl", "text_config": release}
    assert arch.family_for(multimodal).name == "minimax_m3_vl"
    # the release spells rotary_dim and partial_rotary_factor both; transformers reads the factor
    assert arch.rotary_dim({"rotary_dim": 64, "partial_rotary_factor": 0.5}, 128) == 64
    assert arch.rotary_dim({"rotary_dim": 64, "rope_parameters": {"partial_rotary_factor": 0.25}}, 128) == 32

