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


def test_virtual_pack_sizes_match_a_conversion(tmp_path):
    """tools/virtual_pack.py sizes GLM-5.3's text model (no causal-LM class of its own in transformers) as the
    converter writes it: the same dense bytes (under transformers' names, not the release's: one stacked conv where
    the release has three) and expert files."""
    import json
    import sys
    from pathlib import Path

    from checkpoints import build
    from parity import EXACT

    from moepack.convert.pipeline import convert
    from moepack.convert.recipe import Recipe
    from moepack.formats.reader import PackReader

    sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
    from virtual_pack import virtual_pack

    ckpt = build("glm5_next", tmp_path / "ckpt")
    for recipe in (EXACT, Recipe()):
        real = PackReader(convert(str(ckpt), tmp_path / "real", recipe, progress=False, force=True)).manifest
        virt = PackReader(virtual_pack(json.loads((ckpt / "config.json").read_text()), tmp_path / "virtual", recipe,
                                       None)).manifest
        assert sum(r.nbytes for r in virt.dense.values()) == sum(r.nbytes for r in real.dense.values())
        def lengths(man):  # each expert file's length
            return [man.expert_layouts[e.layout].length for e in man.experts]

        assert lengths(virt) == lengths(real)
