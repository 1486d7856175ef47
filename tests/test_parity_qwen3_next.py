"""Qwen3-Next and Qwen3.5-MoE: parity of the converted pack with transformers, and the Gated DeltaNet's chunked
prefill against transformers' own recurrence over several chunks (the parity prompt fits in one)."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from checkpoints import build_multimodal, mtp_head
from parity import check_parity, check_prefix_reuse

from moepack.runtime.models.delta_rule import CHUNK, delta_rule_chunked, delta_rule_step


@pytest.mark.parametrize("fused,old", [(False, False), (True, False), (False, True)])
def test_qwen3_next_parity(tmp_path, fused, old):
    check_parity("qwen3_next", tmp_path, fused=fused, old_spelling=old)


@pytest.mark.parametrize("fused", [False, True])
def test_qwen3_5_moe_parity(tmp_path, fused):
    check_parity("qwen3_5_moe", tmp_path, fused=fused)


def test_qwen3_5_moe_multimodal_checkpoint(tmp_path):
    """The hub layout: nested text_config, ``model.language_model.*`` names, fused experts, a vision tower and a
    multi-token-prediction head (``mtp.layers.0...``, which must not be read as layer 0), all but the text model dropped."""
    ckpt = build_multimodal("qwen3_5_moe", "Qwen3_5Moe", tmp_path / "ckpt", extra=mtp_head, fused=True)
    check_parity("qwen3_5_moe", tmp_path, ckpt=ckpt)


def test_chunked_delta_rule_matches_transformers_recurrence():
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_recurrent_gated_delta_rule

    rng = np.random.default_rng(0)
    B, T, H, Dk, Dv = 1, 2 * CHUNK + 22, 2, 16, 8  # three chunks, the last one padded
    q, k = (rng.standard_normal((B, T, H, Dk)).astype(np.float32) for _ in range(2))
    v = rng.standard_normal((B, T, H, Dv)).astype(np.float32)
    g = -np.abs(rng.standard_normal((B, T, H))).astype(np.float32) * 0.1
    beta = rng.uniform(0, 1, (B, T, H)).astype(np.float32)
    s0 = rng.standard_normal((B, H, Dk, Dv)).astype(np.float32)
    want, want_state = torch_recurrent_gated_delta_rule(
        *(torch.tensor(t) for t in (q, k, v)), g=torch.tensor(g), beta=torch.tensor(beta),
        initial_state=torch.tensor(s0), output_final_state=True, use_qk_l2norm_in_kernel=True)

    def heads_first(t):  # [B, T, H, ...] -> [B, H, T, ...]
        return mx.array(t).swapaxes(1, 2)

    qn = mx.array(q) / mx.sqrt((mx.array(q) ** 2).sum(-1, keepdims=True) + 1e-6) * Dk**-0.5
    kn = mx.array(k) / mx.sqrt((mx.array(k) ** 2).sum(-1, keepdims=True) + 1e-6)
    args = [heads_first(qn), heads_first(kn), heads_first(v), heads_first(g), heads_first(beta)]
    got, state = delta_rule_chunked(*args, mx.array(s0))
    np.testing.assert_allclose(np.array(got.swapaxes(1, 2)), want.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.array(state), want_state.numpy(), rtol=1e-4, atol=1e-4)
    # and the one-token step the decoder uses, continuing from the chunked state
    o, _ = delta_rule_step(*(a[:, :, 0] for a in args), state)
    ref_o, _ = torch_recurrent_gated_delta_rule(
        *(torch.tensor(t[:, :1]) for t in (q, k, v)), g=torch.tensor(g[:, :1]), beta=torch.tensor(beta[:, :1]),
        initial_state=want_state, use_qk_l2norm_in_kernel=True)
    np.testing.assert_allclose(np.array(o), ref_o[:, 0].numpy(), rtol=1e-4, atol=1e-4)


def test_recurrent_cache_continues_and_is_never_rewound(tmp_path):
    check_prefix_reuse("qwen3_next", tmp_path)


def test_depthwise_conv_is_the_causal_sum_bit_for_bit():
    """MLX's grouped Conv1d, as the DeltaNet layers run it, equals Σ_j x[t+j]·w[:, j] exactly."""
    import mlx.nn as nn

    for C, K, T in ((96, 4, 37), (64, 4, 1), (130, 3, 200)):
        w = mx.random.normal((C, 1, K), key=mx.random.key(C))
        xp = mx.random.normal((2, K - 1 + T, C), key=mx.random.key(T))
        conv = nn.Conv1d(C, C, K, groups=C, bias=False)
        conv.weight = w.swapaxes(1, 2)
        want = sum(xp[:, j : j + T] * w[:, 0, j] for j in range(K))
        assert mx.array_equal(conv(xp), want)
