"""dots.llm1 against transformers: grouped sigmoid routing with correction bias, q/k norm, leading dense layer, a
sliding-window layer; per-expert (release) and fused tensors, both config spellings."""

import pytest
from parity import check_parity


@pytest.mark.parametrize("fused,old,overrides", [(False, False, {}), (True, False, {}), (False, True, {}),
                                                  (False, False, {"n_group": 1, "topk_group": 1,
                                                                  "norm_topk_prob": False, "attention_bias": True})],
                         ids=["release", "fused", "old", "ungrouped-biased"])
def test_dots1_parity(tmp_path, fused, old, overrides):
    check_parity("dots1", tmp_path, fused=fused, old_spelling=old, **overrides)
