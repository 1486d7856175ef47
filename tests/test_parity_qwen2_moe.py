import pytest
from parity import check_parity


@pytest.mark.parametrize("fused,old", [(False, False), (True, False), (False, True)])
def test_qwen2_moe_parity(tmp_path, fused, old):
    # the tiny config has a dense layer (mlp_only_layers=[2]) and a sigmoid-gated shared expert
    check_parity("qwen2_moe", tmp_path, fused=fused, old_spelling=old)


def test_qwen2_moe_sliding_window_and_sparse_step(tmp_path):
    # old spelling has no layer_types: sliding layers are derived from use_sliding_window/max_window_layers;
    # decoder_sparse_step=2 makes layer 0 dense as well, norm_topk_prob renormalises the top-k weights
    check_parity("qwen2_moe", tmp_path, old_spelling=True, use_sliding_window=True, sliding_window=5,
                 max_window_layers=2, decoder_sparse_step=2, mlp_only_layers=[], norm_topk_prob=True)
