"""Rotary position embeddings with the scalings transformers implements (default, linear, YaRN, llama3), computed from
explicit inverse frequencies so every family's variant (partial rotary, interleaved pairs, attention factor) is one module."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from moepack import arch
from moepack.errors import UnsupportedArchitecture


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1·mscale·ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(inv: np.ndarray, dim: int, theta: float, s: dict, max_pos: int | None) -> tuple[np.ndarray, float]:
    # transformers' _compute_yarn_parameters, step for step
    orig = s.get("original_max_position_embeddings") or max_pos
    factor = s.get("factor") or max_pos / orig
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attention_factor = yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if m and m_all else yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = np.clip((np.arange(dim // 2) - low) / ((high + 0.001 if low == high else high) - low), 0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate (divide by factor)
    return inv / factor * (1 - extrapolate) + inv * extrapolate, float(attention_factor)


def _llama3(inv: np.ndarray, dim: int, theta: float, s: dict, max_pos: int | None) -> tuple[np.ndarray, float]:
    # transformers' _compute_llama3_parameters: long wavelengths divided by factor, short ones kept, a smooth ramp between
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    orig = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > orig / low, inv / factor, inv)
    smooth = (orig / wavelen - low) / (high - low)
    medium = (wavelen >= orig / high) & (wavelen <= orig / low)
    return np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled), 1.0


def _proportional(inv: np.ndarray, dim: int, theta: float, s: dict, max_pos: int | None) -> tuple[np.ndarray, float]:
    # transformers' _compute_proportional_rope_parameters (Gemma 4): a RoPE over the whole head whose first
    # partial_rotary_factor share of frequencies is kept and the rest zeroed (those pairs are not rotated), / factor
    kept = int(s.get("partial_rotary_factor", 1.0) * dim // 2)
    return np.where(np.arange(dim // 2) < kept, inv, 0.0) / s.get("factor", 1.0), 1.0


# rope_type -> (inverse frequencies, rope dims, theta, scaling dict, max_position_embeddings) -> (inv_freq, cos/sin factor)
ROPE_TYPES = {
    "default": lambda inv, dim, theta, s, max_pos: (inv, 1.0),
    "linear": lambda inv, dim, theta, s, max_pos: (inv / s["factor"], 1.0),
    "yarn": _yarn,
    "llama3": _llama3,
    "proportional": _proportional,
}


def rope_frequencies(dim: int, theta: float, scaling: dict | None,
                     max_position_embeddings: int | None = None) -> tuple[np.ndarray, float]:
    """Inverse frequencies [dim // 2] and cos/sin factor, as transformers' ROPE_INIT_FUNCTIONS compute them.

    ``scaling`` is ``arch.rope(cfg)[1]``: None for plain RoPE, else a dict with ``rope_type``.
    """
    inv = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    kind = (scaling or {}).get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise UnsupportedArchitecture(f"rope_type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    return ROPE_TYPES[kind](inv, dim, theta, scaling, max_position_embeddings)


class ScaledRoPE(nn.Module):
    """RoPE on the first ``dims`` features from explicit inverse frequencies, cos/sin scaled by ``attention_factor``.

    ``traditional``: rotate interleaved pairs (x0, x1), (x2, x3)... instead of the two halves.
    ``at`` rotates at explicit positions (DeepSeek V4's compressed entries sit every ``rate`` positions), the last
    ``dims`` features where ``trailing`` (V4 lays each head out as [nope | rope]), or by the opposite angles.
    """

    def __init__(self, dims: int, theta: float, scaling: dict | None, max_position_embeddings: int | None = None,
                 traditional: bool = False, trailing: bool = False):
        super().__init__()
        inv, self.attention_factor = rope_frequencies(dims, theta, scaling, max_position_embeddings)
        self.dims, self.traditional, self.trailing = dims, traditional, trailing
        with np.errstate(divide="ignore"):  # a zero frequency (proportional RoPE) is an infinite wavelength
            self._freqs = mx.array((1.0 / inv).astype(np.float32))  # mx.fast.rope takes wavelengths/2π
        self._inv = mx.array(inv.astype(np.float32))

    def at(self, x: mx.array, positions: mx.array, conjugate: bool = False) -> mx.array:
        """x [..., T, D] rotated at ``positions`` [T] (float32 angles position·inv_freq, as transformers computes
        them); ``conjugate``: by minus those angles (undoes a rotation at the same positions)."""
        angles = positions.astype(mx.float32)[:, None] * self._inv  # [T, dims/2]
        cos, sin = mx.cos(angles) * self.attention_factor, mx.sin(angles) * self.attention_factor
        if conjugate:
            sin = -sin
        d = self.dims
        part = (x[..., -d:] if self.trailing else x[..., :d]).astype(mx.float32)
        if self.traditional:  # pairs (x0, x1), (x2, x3), ...
            a, b = part[..., 0::2], part[..., 1::2]
            rotated = mx.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(part.shape)
        else:
            a, b = part[..., : d // 2], part[..., d // 2 :]
            rotated = mx.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
        rotated = rotated.astype(x.dtype)
        if d == x.shape[-1]:
            return rotated
        return mx.concatenate([x[..., :-d], rotated] if self.trailing else [rotated, x[..., d:]], axis=-1)

    def wavelengths(self) -> mx.array:
        return self._freqs

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        """x [..., T, D] rotated at positions offset, offset + 1, ... (the first ``dims`` features, or the last
        where ``trailing``)."""
        d = self.dims
        if self.trailing and d < x.shape[-1]:
            return mx.concatenate([x[..., :-d], self._rotate(x[..., -d:], offset)], axis=-1)
        return self._rotate(x, offset)

    def _rotate(self, x: mx.array, offset: int) -> mx.array:
        y = mx.fast.rope(x, self.dims, traditional=self.traditional, base=None, scale=1.0, offset=offset,
                         freqs=self.wavelengths())
        if self.attention_factor == 1.0:
            return y
        if self.dims == x.shape[-1]:
            return y * self.attention_factor
        return mx.concatenate([y[..., : self.dims] * self.attention_factor, y[..., self.dims :]], axis=-1)


def ropes_by_layer_type(cfg: dict, head_dim: int | dict[str, int], defaults: dict[str, dict]) -> dict[str, ScaledRoPE]:
    """One RoPE per layer type, where ``rope_parameters`` is keyed by it (Laguna, Step 3.7, Gemma 4:
    ``{"full_attention": {"rope_theta": ..., "partial_rotary_factor": ...}, "sliding_attention": {...}}``);
    ``defaults`` (the family's, in that form) when the config gives none. ``head_dim``: one for all, or per layer type
    (Gemma 4's global layers have wider heads). A proportional RoPE spans the whole head (its factor zeroes
    frequencies instead of leaving dims out)."""
    out = {}
    for kind, params in (cfg.get("rope_parameters") or defaults).items():
        theta, scaling = arch.rope({"rope_parameters": params})
        dim = head_dim[kind] if isinstance(head_dim, dict) else head_dim
        if (scaling or {}).get("rope_type") != "proportional":
            dim = arch.rotary_dim({"rope_parameters": params}, dim)
        out[kind] = ScaledRoPE(dim, theta, scaling, cfg.get("max_position_embeddings"))
    return out
class LearnedRoPE(ScaledRoPE):
    """ScaledRoPE whose inverse frequencies are scaled by exp(alpha), ``alpha`` a learned weight (Mistral Large 4's
    LeRoPE); kept float32, as transformers keeps it."""

    float32 = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha = mx.zeros((self.dims // 2,))

    def wavelengths(self) -> mx.array:
        return self._freqs * mx.exp(-self.alpha.astype(mx.float32))


def unrotated(x: mx.array, offset: int = 0) -> mx.array:
    """The rope of a NoPE MLA layer that keeps its rope dims (Kimi Linear): the shared key part passes as it is."""
    return x
