"""Bailing hybrid: KDA (full-rank gates) + gated MLA groups, grouped routing; parity with transformers (release names,
fused experts), cached decoding equal to a full pass, prefix reuse restoring the recurrent state."""

import pytest
from parity import check_cached_decoding, check_parity, check_prefix_reuse

from moepack.runtime.models.cache import RecurrentCache


@pytest.mark.parametrize("fused,old", [(False, False), (True, False), (False, True)])
def test_bailing_hybrid_parity(tmp_path, fused, old):
    check_parity("bailing_hybrid", tmp_path, fused=fused, old_spelling=old)


def test_bailing_hybrid_cached_decoding(tmp_path, monkeypatch):
    _, cache = check_cached_decoding("bailing_hybrid", tmp_path, monkeypatch)
    assert [type(c) is RecurrentCache for c in cache] == [True, False, True, False]


def test_bailing_hybrid_prefix_reuse(tmp_path):
    check_prefix_reuse("bailing_hybrid", tmp_path)
