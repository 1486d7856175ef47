"""Hunyuan v3 against transformers: the release's tensor names (router.gate, expert_bias, shared_mlp) and transformers
5's fused save, both config spellings; the dense/sparse layer pattern from mlp_layer_types or its default."""

import pytest
from parity import check_parity

from moepack import arch


@pytest.mark.parametrize("fused,old", [(False, False), (True, False), (False, True)], ids=["release", "fused", "old"])
def test_hy_v3_parity(tmp_path, fused, old):
    check_parity("hy_v3", tmp_path, fused=fused, old_spelling=old)


def test_hy_v3_moe_layers_default_to_all_but_the_first():
    cfg = {"model_type": "hy_v3", "num_hidden_layers": 4, "num_experts": 8}
    assert arch.moe_layers(cfg) == [1, 2, 3]
    assert arch.moe_layers({**cfg, "mlp_layer_types": ["sparse", "dense", "dense", "sparse"]}) == [0, 3]
