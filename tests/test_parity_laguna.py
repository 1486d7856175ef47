import pytest
from parity import check_parity

from moepack.runtime.models.rope import ropes_by_layer_type


# Laguna has one config spelling (rope_parameters keyed by layer type); release layout and transformers 5's fused one,
# then per-element gates and YaRN on the full layers
@pytest.mark.parametrize("fused,overrides", [
    (False, {}), (True, {}),
    (False, dict(gating="per-element", rope_parameters={
        "full_attention": {"rope_type": "yarn", "rope_theta": 5e5, "partial_rotary_factor": 0.5, "factor": 4.0,
                           "original_max_position_embeddings": 64},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
])
def test_laguna_parity(tmp_path, fused, overrides):
    check_parity("laguna", tmp_path, fused=fused, **overrides)


def test_laguna_rope_defaults_per_layer_type():
    from moepack.runtime.models.laguna import ROPE_DEFAULTS
    ropes = ropes_by_layer_type({}, 128, ROPE_DEFAULTS)
    assert ropes["full_attention"].dims == 64 and ropes["sliding_attention"].dims == 128
