import pytest
from parity import check_parity


# the release layout (text model at top level, experts stacked per projection) and transformers 5's fused one;
# old: the release's config spelling (checkpoints.step3p7_release_text_config), lists padded with an MTP layer
@pytest.mark.parametrize("fused,old", [(False, False), (True, False), (False, True)])
def test_step3p7_parity(tmp_path, fused, old):
    check_parity("step3p7", tmp_path, fused=fused, old_spelling=old)
