"""Kimi Linear: KDA layers mixed with NoPE MLA, grouped routing; parity with transformers in both config spellings
and with fused experts, cached decoding equal to a full pass, the KDA chunked rule against transformers' recurrence,
and prefix reuse restoring the recurrent state."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from parity import check_cached_decoding, check_parity, check_prefix_reuse

from moepack.runtime.models.cache import RecurrentCache
from moepack.runtime.models.delta_rule import CHUNK, delta_rule_chunked, delta_rule_step


@pytest.mark.parametrize("fused,old", [(False, False), (True, False), (False, True)])
def test_kimi_linear_parity(tmp_path, fused, old):
    check_parity("kimi_linear", tmp_path, fused=fused, old_spelling=old)


def test_kimi_linear_cached_decoding(tmp_path, monkeypatch):
    _, cache = check_cached_decoding("kimi_linear", tmp_path, monkeypatch)
    assert [type(c) is RecurrentCache for c in cache] == [False, True, False, True]


def test_kimi_linear_prefix_reuse(tmp_path):
    check_prefix_reuse("kimi_linear", tmp_path)


def test_per_channel_chunked_rule_matches_transformers_recurrence():
    """Several chunks (the last padded), a starting state, and the one-token step continuing from the chunked one."""
    from transformers.models.kimi_linear.modeling_kimi_linear import (
        recurrent_kimi_delta_attention,
    )

    rng = np.random.default_rng(0)
    B, T, H, Dk = 1, 2 * CHUNK + 22, 2, 16
    q, k, v = (rng.standard_normal((B, T, H, Dk)).astype(np.float32) for _ in range(3))
    g = -np.abs(rng.standard_normal((B, T, H, Dk))).astype(np.float32) * 0.3
    beta = rng.uniform(0, 1, (B, T, H)).astype(np.float32)
    s0 = rng.standard_normal((B, H, Dk, Dk)).astype(np.float32)
    want, want_state = recurrent_kimi_delta_attention(
        *(torch.tensor(t) for t in (q, k, v)), g=torch.tensor(g), beta=torch.tensor(beta),
        initial_state=torch.tensor(s0), output_final_state=True, use_qk_l2norm_in_kernel=True)

    def heads_first(t):  # [B, T, H, ...] -> [B, H, T, ...]
        return mx.array(t).swapaxes(1, 2)

    def norm(t):
        return mx.array(t) / mx.sqrt((mx.array(t) ** 2).sum(-1, keepdims=True) + 1e-6)

    args = [heads_first(norm(q) * Dk**-0.5), heads_first(norm(k)), heads_first(v), heads_first(g), heads_first(beta)]
    got, state = delta_rule_chunked(*args, mx.array(s0))
    np.testing.assert_allclose(np.array(got.swapaxes(1, 2)), want.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.array(state), want_state.numpy(), rtol=1e-4, atol=1e-4)
    o, _ = delta_rule_step(*(a[:, :, 0] for a in args), state)
    ref_o, _ = recurrent_kimi_delta_attention(
        *(torch.tensor(t[:, :1]) for t in (q, k, v)), g=torch.tensor(g[:, :1]), beta=torch.tensor(beta[:, :1]),
        initial_state=want_state, output_final_state=False, use_qk_l2norm_in_kernel=True)
    np.testing.assert_allclose(np.array(o), ref_o[:, 0].numpy(), rtol=1e-4, atol=1e-4)
