import pytest
from parity import check_parity

from moepack import arch


@pytest.mark.parametrize("fused,old", [(False, False), (True, False), (False, True)])
def test_minimax_m2_parity(tmp_path, fused, old):
    check_parity("minimax_m2", tmp_path, fused=fused, old_spelling=old)


def test_minimax_m2_rotary_dim_spellings():
    assert arch.rotary_dim({"rotary_dim": 64, "rope_theta": 5e6}, 128) == 64  # hub spelling
    assert arch.rotary_dim({"rope_parameters": {"rope_theta": 5e6, "partial_rotary_factor": 0.5}}, 128) == 64
    assert arch.rotary_dim({"rope_theta": 5e6}, 128) == 128  # no partial rotary unless spelled
