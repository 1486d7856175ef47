import pytest
from parity import check_parity


# old spelling: rope_theta, and no layer_types (derived from global_attn_every_n_layers, as Trinity-Nano's config)
@pytest.mark.parametrize("fused,old", [(False, False), (True, False), (False, True)])
def test_afmoe_parity(tmp_path, fused, old):
    check_parity("afmoe", tmp_path, fused=fused, old_spelling=old)


def test_afmoe_parity_without_mup(tmp_path):
    check_parity("afmoe", tmp_path, mup_enabled=False)
