"""ERNIE 4.5 MoE against transformers: the release's tensor names (moe_statics correction bias) and transformers 5's
fused save, both config spellings, tied embeddings (the family default); MoE layers by start, interval and end."""

import json

import numpy as np
import pytest
from checkpoints import build
from parity import check_parity
from safetensors.numpy import load_file, save_file

from moepack import arch


@pytest.mark.parametrize("fused,old,overrides", [(False, False, {}), (True, False, {}), (False, True, {}),
                                                  (False, False, {"tie_word_embeddings": True}),
                                                  (False, False, {"tie_word_embeddings": True, "use_bias": False})],
                         ids=["release", "fused", "old", "tied-biased-head", "tied-nobias"])
def test_ernie4_5_moe_parity(tmp_path, fused, old, overrides):
    check_parity("ernie4_5_moe", tmp_path, fused=fused, old_spelling=old, **overrides)


def test_ernie4_5_moe_layers():
    cfg = {"model_type": "ernie4_5_moe", "num_hidden_layers": 6, "moe_num_experts": 8}
    assert arch.moe_layers(cfg) == [1, 2, 3, 4, 5]  # defaults: start 1, interval 1, end -1 (the last layer)
    assert arch.moe_layers({**cfg, "moe_layer_start_index": 2, "moe_layer_end_index": 4}) == [2, 3, 4]
    assert arch.moe_layers({**cfg, "moe_layer_interval": 2}) == [1, 3, 5]


def test_ernie4_5_moe_mtp_tensors_are_dropped(tmp_path):
    # ERNIE-4.5-300B ships a multi-token-prediction block as model.mtp_*; transformers ignores it, so must the pack
    ckpt = build("ernie4_5_moe", tmp_path / "ckpt")
    tensors = load_file(ckpt / "model.safetensors")
    rng = np.random.default_rng(0)
    extra = {"model.mtp_block.0.mlp.experts.0.gate_proj.weight": (32, 64), "model.mtp_emb_norm.0.weight": (64,),
             "model.mtp_hidden_norm.0.weight": (64,), "model.mtp_linear_proj.0.weight": (64, 128),
             "model.mtp_block.0.self_attn.q_proj.weight": (64, 64)}
    tensors.update({k: rng.standard_normal(s).astype(np.float32) for k, s in extra.items()})
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    check_parity("ernie4_5_moe", tmp_path, ckpt=ckpt)
    assert not [n for n in json.loads((tmp_path / "pack" / "manifest.json").read_text())["dense"] if "mtp" in n]
