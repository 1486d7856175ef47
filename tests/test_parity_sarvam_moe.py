import json

import pytest
from checkpoints import build
from safetensors import safe_open
from parity import check_parity

from moepack import arch


# release layout (word_embeddings, fused query_key_value, expert_bias; legacy config keys) and transformers 5's own
@pytest.mark.parametrize("fused,old", [(False, False), (True, False), (False, True)])
def test_sarvam_moe_parity(tmp_path, fused, old):
    check_parity("sarvam_moe", tmp_path, fused=fused, old_spelling=old)


def test_sarvam_moe_release_names_and_legacy_config(tmp_path):
    ckpt = build("sarvam_moe", tmp_path / "ckpt", old_spelling=True)
    cfg = json.loads((ckpt / "config.json").read_text())
    with safe_open(ckpt / "model.safetensors", "np") as f:
        names = set(f.keys())
    assert {"num_experts", "num_shared_experts", "use_qkv_bias"} <= set(cfg) and "partial_rotary_factor" not in cfg
    assert arch.family_for(cfg).name == "sarvam_moe" and arch.get(cfg, "n_shared_experts") == 1
    # the parity runs above read the release's own tensor names
    assert "model.word_embeddings.weight" in names and "model.layers.1.attention.query_key_value.bias" in names
    assert "model.layers.1.mlp.gate.expert_bias" in names
