import numpy as np
import pytest
from checkpoints import YARN, build
from parity import EXACT, PROMPT, check_parity
from safetensors.numpy import load_file, save_file

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
    eng = moepack.load(pack, prefetch=True)
    assert {int(p.name.split(".")[0]) for p in (pack / "experts" / "000").iterdir()} == set(range(4))  # stored only
    chosen, acquired = [], []
    call, acquire, prefetch = StreamedExperts.__call__, eng.store.acquire, eng.store.prefetch
    monkeypatch.setattr(StreamedExperts, "__call__", lambda self, x, i, w: chosen.append(np.array(i)) or call(self, x, i, w))
    monkeypatch.setattr(eng.store, "acquire", lambda layer, experts, **kw: acquired.extend(experts) or acquire(layer, experts, **kw))
    monkeypatch.setattr(eng.store, "prefetch", lambda layer, experts: acquired.extend(experts) or prefetch(layer, experts))
    assert eng.store.prefetching  # decode guesses the next layer's experts: zero experts must not be read early either
    eng.logits(PROMPT)
    list(eng.generate(PROMPT, 4))
    ids = np.concatenate([c.reshape(-1) for c in chosen])
    assert (ids >= 4).sum() >= 4 and (ids < 4).sum() >= 4  # zero experts and stored ones both chosen
    assert any(((c >= 4).any(axis=1) & (c < 4).any(axis=1)).any() for c in chosen)  # also side by side in one token
    assert any(c.shape[0] == 1 and (c >= 4).all() for c in chosen)  # a decode step that needs no expert at all
    assert acquired and max(acquired) < 4  # a zero expert never reaches the store


def test_mtp_tensors_are_left_out(tmp_path):
    # LongCat-Flash releases carry a multi-token-prediction block as model.mtp.* (its layers would otherwise read as
    # layers 0...); transformers ignores it, so the converter must leave it out
    ckpt = build("longcat_flash", tmp_path / "ckpt")
    tensors = load_file(ckpt / "model.safetensors")
    rng = np.random.default_rng(0)
    extra = {"model.mtp.embed_tokens.weight": (256, 64), "model.mtp.layers.0.mlp.experts.0.gate_proj.weight": (32, 64),
             "model.mtp.layers.0.mlp.router.classifier.weight": (8, 64), "model.mtp.norm.weight": (64,)}
    tensors.update({k: rng.standard_normal(s).astype(np.float32) for k, s in extra.items()})
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    check_parity("longcat_flash", tmp_path, ckpt=ckpt)
