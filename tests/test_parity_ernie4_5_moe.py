"""ERNIE 4.5 MoE against transformers: the release's tensor names (moe_statics correction bias) and transformers 5's
fused save, both config spellings, tied embeddings (the family default); MoE layers by start, interval and end."""

import pytest
from parity import check_parity

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
