import pytest
from parity import check_parity


# the release layout (text model at top level, experts stacked per projection) and transformers 5's fused one
@pytest.mark.parametrize("fused", [False, True])
def test_step3p7_parity(tmp_path, fused):
    check_parity("step3p7", tmp_path, fused=fused)
