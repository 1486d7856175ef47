import pytest
from parity import check_parity


@pytest.mark.parametrize("fused,old", [(False, False), (True, False), (False, True)])
def test_olmoe_parity(tmp_path, fused, old):
    check_parity("olmoe", tmp_path, fused=fused, old_spelling=old)


def test_olmoe_clip_qkv_and_renormalised_topk(tmp_path):
    # clip_qkv small enough to clamp many q/k/v values; norm_topk_prob flips the routing weights
    check_parity("olmoe", tmp_path, clip_qkv=0.5, norm_topk_prob=True)
