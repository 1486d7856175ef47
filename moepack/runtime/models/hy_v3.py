"""Hunyuan v3 (Hy3-preview): dots1's architecture (per-head q/k RMSNorm, sigmoid routing with a selection-only
correction bias, an ungated shared expert) without expert groups, always renormalised then scaled by
``router_scaling_factor``, dense layers where ``mlp_layer_types`` says "dense" (by default the first).

The release names the router ``mlp.router.gate``, the correction bias ``mlp.expert_bias`` (on the block) and the
shared expert ``mlp.shared_mlp``; transformers 5's own saves say ``mlp.gate``, ``mlp.e_score_correction_bias`` and
``mlp.shared_experts``. ``renames`` maps both onto this tree.
"""

from __future__ import annotations

from dataclasses import dataclass

from moepack.errors import UnsupportedArchitecture
from moepack.runtime.models import dots1


@dataclass(kw_only=True)
class ModelArgs(dots1.ModelArgs):
    num_shared_experts: int = 1
    router_scaling_factor: float = 2.826
    norm_topk_prob: bool = True  # transformers' HYV3TopKRouter always renormalises
    sliding_window: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 11_158_840.0
    mlp_bias: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mlp_bias:
            raise UnsupportedArchitecture("hy_v3 with mlp_bias=true is not supported (Hy3 releases have none)")
        self.n_shared_experts, self.routed_scaling_factor = self.num_shared_experts, self.router_scaling_factor


class Model(dots1.Model):
    args = ModelArgs
    renames = ((".mlp.router.gate.", ".mlp.gate."), (".mlp.shared_mlp.", ".mlp.shared_experts."),
               (".mlp.expert_bias", ".mlp.gate.e_score_correction_bias"),
               (".mlp.e_score_correction_bias", ".mlp.gate.e_score_correction_bias"))
