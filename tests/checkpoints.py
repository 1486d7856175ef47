"""Tiny real-architecture checkpoints built by transformers itself (so tensor names and configs are the real ones).

``build(kind, dir)`` writes a checkpoint directory; ``fused=True`` saves experts as transformers 5's fused
tensors, ``old_spelling=True`` rewrites config.json the way hub checkpoints spell it (rope_theta/rope_scaling,
num_experts, top-level partial_rotary_factor).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

YARN = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1}
COMMON = dict(vocab_size=256, hidden_size=64, max_position_embeddings=256, rms_norm_eps=1e-6,
              pad_token_id=None, bos_token_id=None, eos_token_id=None)

# kind -> (config class, model class, tiny config kwargs)
TINY: dict[str, tuple[str, str, dict]] = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=64,
        num_local_experts=4, num_experts_per_tok=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
        moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=False, mlp_only_layers=[2], decoder_sparse_step=1, qkv_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=16, intermediate_size=96,
        moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=False, rope_parameters={"rope_type": "default", "rope_theta": 1e4})),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96,
        moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2,
        first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        routed_scaling_factor=16.0, q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, rope_parameters={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707})),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96,
        moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
        rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0})),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
        moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, n_group=1, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        use_qk_norm=True, attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5})),
    "minimax_m2": ("MiniMaxM2Config", "MiniMaxM2ForCausalLM", dict(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=32,
        num_local_experts=8, num_experts_per_tok=2,
        rope_parameters={"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.5})),
    # sliding_window 4 < prompt length; swiglu_limit 1.5 so the clamps bite; truncate=False as gpt-oss ships
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=32,
        num_local_experts=8, num_experts_per_tok=2, sliding_window=4, swiglu_limit=1.5,
        rope_parameters={**YARN, "rope_theta": 1.5e5, "truncate": False})),
    # layer_types default: 3 Gated-DeltaNet layers, then full attention; layer 1 dense; 2 k-heads serve 4 v-heads
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", dict(
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
        moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
        mlp_only_layers=[1], linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
        linear_value_head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25})),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", dict(
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25})),
    # a dense layer between MoE layers; sigmoid + correction bias routing, scaled, with an ungated shared expert
    "hy_v3": ("HYV3Config", "HYV3ForCausalLM", dict(
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
        moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, num_shared_experts=1,
        router_scaling_factor=2.826, mlp_layer_types=["sparse", "dense", "sparse"],
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # layers 1 and 3 MoE (start 1, interval 2), 0 and 2 dense; biases on attention and MLP projections
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM", dict(
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
        moe_intermediate_size=32, moe_num_experts=8, moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1,
        moe_layer_interval=2, use_bias=True, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 5e5})),
    # 4 groups of 2 experts, 2 groups kept; layer 0 dense; the last layer slides over a window of 5 < 12
    "dots1": ("Dots1Config", "Dots1ForCausalLM", dict(
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
        moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=4,
        topk_group=2, first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5, sliding_window=5,
        max_window_layers=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # MLA with YaRN over an original context of 4 tokens, so llama_4_scaling_beta scales queries within the prompt;
    # softmax routing over 4 groups of 2, 2 kept; layer 0 dense
    "mistral4": ("Mistral4Config", "Mistral4ForCausalLM", dict(
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96,
        moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.0, norm_topk_prob=True,
        q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
        rope_parameters={**YARN, "original_max_position_embeddings": 4, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "llama_4_scaling_beta": 0.5})),
    # MoE layers 1 and 3 between dense ones (interleave step 2); layers 0-2 RoPE (llama3 scaling over an original
    # context of 16) attending within chunks of 5 < 12, layer 3 NoPE over the whole prompt, its queries scaled by
    # position (floor_scale 4); top-1 routing with a shared expert
    "llama4_text": ("Llama4TextConfig", "Llama4ForCausalLM", dict(
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=32,
        intermediate_size_mlp=96, num_local_experts=8, num_experts_per_tok=1, interleave_moe_layer_step=2,
        attention_chunk_size=5, no_rope_layer_interval=4, floor_scale=4, attn_scale=0.5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
}


def make_model(kind: str, seed: int = 0, **overrides) -> torch.nn.Module:
    cfg_cls, model_cls, kwargs = TINY[kind]
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **kwargs, **overrides})
    torch.manual_seed(seed)
    return randomize(getattr(transformers, model_cls)(cfg).eval())


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Larger, varied weights than the default init, so logits are far from uniform and routing is decisive;
    norms and biases (e_score_correction_bias included) get non-trivial values too."""
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point() or "rotary" in name or "inv_freq" in name:
                continue
            if "norm" in name:
                t.copy_(1.0 + 0.1 * torch.randn_like(t))
            elif t.ndim == 1:
                t.copy_(0.1 * torch.randn_like(t))
            else:
                t.copy_(torch.randn_like(t) * (1.0 / t.shape[-1] ** 0.5))
    return model


def to_old_spelling(cfg: dict) -> dict:
    """config.json as most hub checkpoints spell it (written before transformers 5)."""
    cfg = dict(cfg)
    params = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = params.get("rope_theta", 10000.0)
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "rope_type", "partial_rotary_factor")}
    kind = params.get("rope_type", "default")
    cfg["rope_scaling"] = {"type": kind, **scaling} if kind != "default" else None
    if "partial_rotary_factor" in params:
        if cfg.get("model_type") == "minimax_m2":
            cfg["rotary_dim"] = int(cfg["head_dim"] * params["partial_rotary_factor"])
        else:
            cfg["partial_rotary_factor"] = params["partial_rotary_factor"]
    if cfg.get("model_type") == "qwen3_moe" and "num_local_experts" in cfg:
        cfg["num_experts"] = cfg.pop("num_local_experts")
    for k in ("head_dim", "qk_head_dim") if cfg.get("model_type", "").startswith("deepseek") else ():
        cfg.pop(k, None)
    cfg.pop("layer_types", None)
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    return cfg


def build(kind: str, out: str | Path, fused: bool = False, old_spelling: bool = False, dtype=torch.float32,
          seed: int = 0, **overrides) -> Path:
    out = Path(out)
    model = make_model(kind, seed, **overrides).to(dtype)
    model.save_pretrained(out, save_original_format=not fused)
    if old_spelling:
        p = out / "config.json"
        p.write_text(json.dumps(to_old_spelling(json.loads(p.read_text())), indent=2))
    return out


def reference_logits(ckpt: Path, ids: list[int]):
    """transformers' own float32 logits for ``ids`` from the checkpoint as saved (the parity oracle)."""
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    except ValueError:  # a model type the auto class does not map (mistral4): the class config.json names
        arch = json.loads((Path(ckpt) / "config.json").read_text())["architectures"][0]
        model = getattr(transformers, arch).from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy(), model


def reference_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()
