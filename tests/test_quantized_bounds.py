"""Quantized packs against transformers' float32 logits: within the bounds README.md documents (CAP), and per
family within about 3x what was measured (BOUNDS); the measured NMSE is printed (`-s` shows it).

Tiny random models route on near-ties, so quantization noise flips some expert choices and the error is far
larger than on trained models; the bounds are for these checkpoints. A broken quantized path (wrong scales,
wrong packing, wrong group) gives NMSE of 1 or more.
"""

from __future__ import annotations

import pytest

import moepack
from checkpoints import TINY, build, reference_logits
from moepack.convert.pipeline import convert
from moepack.convert.recipe import Recipe
from parity import PROMPT, nmse

RECIPES = {  # group 32 so the tiny models' 32/64-wide matrices quantize
    "8bit": Recipe(dtype="float32", expert_bits=8, dense_bits=8, expert_group_size=32, dense_group_size=32),
    "default": Recipe(expert_bits=4, dense_bits=8, expert_group_size=32, dense_group_size=32),
}
CAP = {"8bit": 0.1, "default": 0.5}  # the bounds README.md documents for every family; none below is looser

# Per family, about 3x the NMSE measured on these checkpoints (in the comment: 8bit, default), never above CAP.
# A regression that leaves a family inside CAP but several times worse than it was still fails here.
BOUNDS = {
    "deepseek_v2": {"8bit": 0.0057, "default": 0.46},  # 1.90e-3, 0.152
    "deepseek_v3": {"8bit": 0.0038, "default": 0.044},  # 1.27e-3, 1.48e-2
    "glm4_moe": {"8bit": 0.05, "default": 0.066},  # 1.67e-2, 2.19e-2
    "gpt_oss": {"8bit": 0.1, "default": 0.16},  # 3.32e-2 (3x: 0.0996), 5.30e-2
    "minimax_m2": {"8bit": 0.00043, "default": 0.015},  # 1.42e-4, 4.89e-3
    "mixtral": {"8bit": 0.0007, "default": 0.039},  # 2.31e-4, 1.31e-2
    "olmoe": {"8bit": 0.00062, "default": 0.026},  # 2.07e-4, 8.58e-3
    "qwen2_moe": {"8bit": 0.00089, "default": 0.03},  # 2.96e-4, 9.89e-3
    "qwen3_5_moe": {"8bit": 0.1, "default": 0.5},  # 3.71e-2, 0.265: 3x is above CAP, CAP holds
    "qwen3_moe": {"8bit": 0.034, "default": 0.068},  # 1.12e-2, 2.27e-2
    "qwen3_next": {"8bit": 0.014, "default": 0.5},  # 4.82e-3, 0.300: 3x is above CAP, CAP holds
    "hy_v3": {"8bit": 0.0029, "default": 0.11},  # 9.79e-4, 3.51e-2
    "ernie4_5_moe": {"8bit": 0.014, "default": 0.026},  # 4.62e-3, 8.78e-3
    "dots1": {"8bit": 0.0021, "default": 0.41},  # 6.85e-4, 0.136
    "mistral4": {"8bit": 0.046, "default": 0.22},  # 1.54e-2, 7.24e-2
    "sarvam_moe": {"8bit": 0.062, "default": 0.16},  # 2.05e-2, 5.19e-2
    "afmoe": {"8bit": 0.0015, "default": 0.05},  # 5.08e-4, 1.65e-2
    "laguna": {"8bit": 0.002, "default": 0.33},  # 6.69e-4, 0.111
    "longcat_flash": {"8bit": 0.0012, "default": 0.0046},  # 4.02e-4, 1.54e-3
    "deepseek_v32": {"8bit": 0.1, "default": 0.5},  # 4.32e-2, 0.260: 3x is above CAP, CAP holds (indexer top-k flips)
    "glm_moe_dsa": {"8bit": 0.1, "default": 0.34},  # 4.24e-2 (3x: 0.127, above CAP), 0.113
    "mistral_large4": {"8bit": 0.004, "default": 0.052},  # 1.34e-3, 1.74e-2
    "deepseek_v4": {"8bit": 0.0031, "default": 0.2},  # 1.02e-3, 6.61e-2
    "llama4_text": {"8bit": 0.00081, "default": 0.019},  # 2.70e-4, 6.48e-3
    "step3p7": {"8bit": 0.011, "default": 0.12},  # 3.63e-3, 3.88e-2
    "hy_v4": {"8bit": 0.1, "default": 0.28},  # 3.37e-2 (3x: 0.101, above CAP), 9.30e-2
    "kimi_linear": {"8bit": 0.0043, "default": 0.23},  # 1.44e-3, 7.64e-2
    "glm5_next": {"8bit": 0.1, "default": 0.5},  # 4.29e-2, 0.277: 3x is above CAP, CAP holds
    "bailing_hybrid": {"8bit": 0.061, "default": 0.19},  # 2.04e-2, 6.38e-2
    # 8.52e-2 (3x above CAP, CAP holds: 8-bit noise flips near-tied experts on 4 tokens), 0.115
    "minimax_m3_vl": {"8bit": 0.1, "default": 0.34},
    "gemma4": {"8bit": 0.053, "default": 0.2},  # 1.75e-2 (one position's experts flip; experts alone: 1.4e-4), 6.60e-2
    "qwen4_exp": {"8bit": 0.066, "default": 0.076},  # 2.21e-2, 2.53e-2 (PLE tables quantized too, streamed)
}


def test_every_family_has_bounds_within_the_documented_ones():
    assert set(BOUNDS) == set(TINY)
    assert all(b[name] <= CAP[name] for b in BOUNDS.values() for name in CAP)


@pytest.mark.parametrize("kind", sorted(TINY))
def test_quantized_pack_within_bound(kind, tmp_path):
    ckpt = build(kind, tmp_path / "ckpt")
    ref, _ = reference_logits(ckpt, PROMPT)
    measured = {}
    for name, recipe in RECIPES.items():
        pack = convert(str(ckpt), tmp_path / name, recipe, progress=False)
        measured[name] = nmse(moepack.load(pack).logits(PROMPT), ref)
    print(f"{kind}: NMSE " + ", ".join(f"{name} {v:.3g} (bound {BOUNDS[kind][name]:g})" for name, v in measured.items()))
    for name, v in measured.items():
        assert v < BOUNDS[kind][name], f"{kind} {name}: NMSE {v:.3g} >= {BOUNDS[kind][name]:g}"
