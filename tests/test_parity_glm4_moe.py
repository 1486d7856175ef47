import pytest
from checkpoints import YARN
from parity import check_parity

from moepack import arch

# The tiny config has n_group=1, qk-norm and q/k/v bias; this variant covers grouped routing, neither option, YaRN.
VARIANT = dict(n_group=4, topk_group=2, use_qk_norm=False, attention_bias=False,
               rope_parameters={**YARN, "partial_rotary_factor": 0.5})


@pytest.mark.parametrize("fused,old,overrides", [(False, False, {}), (True, False, {}), (False, True, {}),
                                                  (False, False, VARIANT)])
def test_glm4_moe_parity(tmp_path, fused, old, overrides):
    check_parity("glm4_moe", tmp_path, fused=fused, old_spelling=old, **overrides)


def test_glm4_moe_rotary_default_is_half():
    # transformers' Glm4MoeConfig defaults partial_rotary_factor to 0.5 when a config does not spell it
    assert arch.rotary_dim({"rope_theta": 1e6, "rope_scaling": None}, 128, default_factor=0.5) == 64
    assert arch.rotary_dim({"rope_parameters": {"rope_theta": 1e6, "partial_rotary_factor": 1.0}}, 128, 0.5) == 128
