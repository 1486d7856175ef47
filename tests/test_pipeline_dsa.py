"""DSA families over a two-rank pipeline (GLM-5.3-Flash with its KDA layers too): the same logits, greedy tokens and
cached conversation as one process; a stage never begins at a layer that reuses an earlier layer's top-k selection or
latent KV (GLM-5's and Hunyuan v4's shared-indexer layers, Mistral Large 4's KV-sharing layers)."""

from __future__ import annotations

import mlx.core as mx
import pytest
from checkpoints import build
from parity import EXACT
from test_distributed import Ranks, assert_same, reference

from moepack import arch
from moepack.convert.pipeline import convert
from moepack.formats.reader import PackReader
from moepack.runtime.distributed import split_layers
from moepack.runtime.distributed import split_pack as plan

pytestmark = pytest.mark.skipif(not mx.distributed.is_available("ring"), reason="this MLX build has no ring backend")

# kind -> the layer the second of two stages must begin at (None: wherever the costs say)
SECOND_STAGE = {
    "deepseek_v32": None,
    "glm_moe_dsa": 3,  # indexer types full, shared, shared, full: only layer 3 selects for itself and those after
    "mistral_large4": 2,  # layer 1 reuses layer 0's KV and selection, layer 3 layer 2's KV
    "hy_v4": 2,  # full, shared, full, shared; and 3 hyper-connection streams handed between the stages
}


def test_split_layers_keeps_to_the_allowed_starts():
    assert split_layers([1] * 8, 2, starts={6}) == [range(0, 6), range(6, 8)]
    assert split_layers([1] * 8, 3, starts={2, 3, 7}) == [range(0, 3), range(3, 7), range(7, 8)]
    with pytest.raises(ValueError, match="only begin at layer 5"):
        split_layers([1] * 8, 3, starts={0, 5})


@pytest.mark.parametrize("kind", SECOND_STAGE)
def test_two_ranks_match_one_process(kind, tmp_path):
    pack = convert(str(build(kind, tmp_path / "ckpt")), tmp_path / "pack", EXACT, progress=False)
    cfg = arch.text_config(PackReader(pack).config)
    starts = arch.stage_starts(cfg)
    assert starts == (None if SECOND_STAGE[kind] is None else {0, SECOND_STAGE[kind]})
    stages = [s.stage for s in plan(PackReader(pack), 2).shares]
    if SECOND_STAGE[kind] is not None:
        assert stages[1].start == SECOND_STAGE[kind]
    two_ranks_match_one_process(pack, tmp_path)


def test_two_ranks_match_one_process_glm5_next(tmp_path):
    """GLM-5.3-Flash: KDA recurrent state, pooled-key selection and three hyper-connection streams between the ranks;
    no stage begins at layer 2, which reuses layer 1's selection."""
    pack = convert(str(build("glm5_next", tmp_path / "ckpt")), tmp_path / "pack", EXACT, progress=False)
    assert arch.stage_starts(arch.text_config(PackReader(pack).config)) == {0, 1, 3, 4}
    assert plan(PackReader(pack), 2).shares[1].stage.start in {1, 3, 4}
    two_ranks_match_one_process(pack, tmp_path, rewinds=False)


def two_ranks_match_one_process(pack, tmp_path, rewinds: bool = True) -> None:
    ref = reference(pack)
    with Ranks(2, "parity", tmp_path / "ranks", pack) as ranks:
        codes = ranks.finish()
        assert codes == [0, 0], ranks.output()
        res = ranks.result()
    assert_same(res, tmp_path / "ranks", ref, rewinds)
