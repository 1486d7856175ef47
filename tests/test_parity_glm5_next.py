"""GLM-5.3-Flash: KDA layers mixed with NoPE MLA whose DSA indexer scores pooled keys, hyper-connection streams;
parity of the multimodal checkpoint's text model with transformers, cached decoding equal to a full pass (the
pooled selection and the recurrent state carried token by token), and prefix reuse restoring the recurrent state."""

import pytest
from checkpoints import TINY
from parity import check_cached_decoding, check_parity, check_prefix_reuse

from moepack.runtime.models.cache import RecurrentCache


@pytest.mark.parametrize("fused,old", [(False, False), (True, False), (False, True)])
def test_glm5_next_parity(tmp_path, fused, old):
    check_parity("glm5_next", tmp_path, fused=fused, old_spelling=old)


def test_glm5_next_cached_decoding(tmp_path, monkeypatch):
    _, cache = check_cached_decoding("glm5_next", tmp_path, monkeypatch)
    types = TINY["glm5_next"][2]["text_config"]["layer_types"]
    assert [type(c) is RecurrentCache for c in cache] == [t == "linear_attention" for t in types]


def test_glm5_next_prefix_reuse(tmp_path):
    check_prefix_reuse("glm5_next", tmp_path)
