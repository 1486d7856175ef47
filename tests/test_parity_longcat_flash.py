import numpy as np
import pytest
from checkpoints import YARN, build
from parity import EXACT, PROMPT, check_parity

import moepack
from moepack.convert.pipeline import convert
from moepack.runtime.models.moe import StreamedExperts


@pytest.mark.parametrize("fused,old", [(False, False), (True, False), (False, True)])
def test_longcat_flash_parity(tmp_path, fused, old):
    check_parity("longcat_flash", tmp_path, fused=fused, old_spelling=old)


def test_longcat_flash_parity_yarn(tmp_path):
    check_parity("longcat_flash", tmp_path, rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0})


def test_zero_experts_are_chosen_and_never_read(tmp_path, monkeypatch):
    ckpt = build("longcat_flash", tmp_path / "ckpt")
    pack = convert(str(ckpt), tmp_path / "pack", EXACT, progress=False)
    eng = moepack.load(pack)
    assert {int(p.name.split(".")[0]) for p in (pack / "experts" / "000").iterdir()} == set(range(4))  # stored only
    chosen, acquired = [], []
    call, acquire = StreamedExperts.__call__, eng.store.acquire
    monkeypatch.setattr(StreamedExperts, "__call__", lambda self, x, i, w: chosen.append(np.array(i)) or call(self, x, i, w))
    monkeypatch.setattr(eng.store, "acquire", lambda layer, experts, **kw: acquired.extend(experts) or acquire(layer, experts, **kw))
    eng.logits(PROMPT)
    list(eng.generate(PROMPT, 4))
    ids = np.concatenate([c.reshape(-1) for c in chosen])
    assert (ids >= 4).sum() >= 4 and (ids < 4).sum() >= 4  # zero experts and stored ones both chosen
    assert any(((c >= 4).any(axis=1) & (c < 4).any(axis=1)).any() for c in chosen)  # also side by side in one token
    assert any(c.shape[0] == 1 and (c >= 4).all() for c in chosen)  # a decode step that needs no expert at all
    assert acquired and max(acquired) < 4  # a zero expert never reaches the store
