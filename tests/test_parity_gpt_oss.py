import pytest
from parity import check_parity


# gpt-oss checkpoints have one expert format (fused, transposed, gate/up interleaved, with biases) whatever
# save_original_format says, so `fused` changes nothing on disk; `old` is the hub's rope_theta/rope_scaling spelling.
@pytest.mark.parametrize("old", [False, True])
def test_gpt_oss_parity(tmp_path, old):
    check_parity("gpt_oss", tmp_path, fused=True, old_spelling=old)
