"""Mistral 4 against transformers: MLA with YaRN, queries scaled by position (llama_4_scaling_beta, acting within the
prompt: the tiny config's original context is 4 tokens), softmax group-limited routing; per-expert (release) and
fused tensors, both config spellings; cached decoding equal to a full forward."""

import mlx.core as mx
import numpy as np
import pytest
import transformers
from checkpoints import COMMON, TINY, build, make_model
from parity import EXACT, PROMPT, check_parity

import moepack
from moepack.convert.pipeline import convert


@pytest.mark.parametrize("fused,old,overrides", [(False, False, {}), (True, False, {}), (False, True, {}),
                                                  (False, False, {"q_lora_rank": None, "rope_interleave": False})],
                         ids=["release", "fused", "old", "q_proj-halves"])
def test_mistral4_parity(tmp_path, fused, old, overrides):
    check_parity("mistral4", tmp_path, fused=fused, old_spelling=old, **overrides)


def test_mistral4_cached_decode_matches_full_forward(tmp_path):
    # the query scale follows the cache offset: one token at a time past the original context
    eng = moepack.load(convert(str(build("mistral4", tmp_path / "ckpt")), tmp_path / "pack", EXACT, progress=False))
    cache = eng.model.make_cache()
    steps = [eng.model(mx.array([PROMPT[:3]]), cache)[0]] + [eng.model(mx.array([[t]]), cache)[0] for t in PROMPT[3:]]
    np.testing.assert_allclose(np.array(mx.concatenate(steps, axis=0)), eng.logits(PROMPT), rtol=1e-4, atol=1e-4)


def test_mistral4_multimodal_checkpoint(tmp_path):
    """The release layout: Mistral3ForConditionalGeneration around a mistral4 text model (``language_model.model.*``,
    ``language_model.lm_head``), a Pixtral vision tower and projector, which the converter leaves out."""
    text = make_model("mistral4")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=4, head_dim=16)
    cfg = transformers.Mistral3Config(text_config={"model_type": "mistral4", **COMMON, **TINY["mistral4"][2]},
                                      vision_config=vision, tie_word_embeddings=False)
    vl = transformers.Mistral3ForConditionalGeneration(cfg).eval()
    vl.model.language_model.load_state_dict(text.model.state_dict())
    vl.lm_head.load_state_dict(text.lm_head.state_dict())
    ckpt = tmp_path / "ckpt"
    vl.save_pretrained(ckpt, save_original_format=True)
    check_parity("mistral4", tmp_path, ckpt=ckpt)
