import pytest
from parity import check_parity


@pytest.mark.parametrize("fused,old", [(False, False), (True, False), (False, True)])
def test_mixtral_parity(tmp_path, fused, old):
    # per-expert saves name the block "block_sparse_moe" (w1/w2/w3), fused saves name it "mlp": both must load
    check_parity("mixtral", tmp_path, fused=fused, old_spelling=old)


def test_mixtral_sliding_window(tmp_path):
    # a window shorter than the 12-token prompt: prefill and every decode step must mask like transformers
    check_parity("mixtral", tmp_path, sliding_window=5)
