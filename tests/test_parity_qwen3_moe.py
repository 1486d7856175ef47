import pytest
from parity import check_parity


@pytest.mark.parametrize("fused,old", [(False, False), (True, False), (False, True)])
def test_qwen3_moe_parity(tmp_path, fused, old):
    check_parity("qwen3_moe", tmp_path, fused=fused, old_spelling=old)
