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

GEMMA4_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
               "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}}

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
    # transformers runs Sarvam with the GLM-4 MoE model; grouped routing and q/k/v bias so the fused-qkv split and the
    # group limit both act
    "sarvam_moe": ("SarvamMoEConfig", "Glm4MoeForCausalLM", dict(
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
        moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
        use_qk_norm=True, attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 8e6, "partial_rotary_factor": 1.0})),
    # sliding (window 4 < prompt, RoPE) and full (NoPE) layers alternate; layer 0 dense; muP scaling on
    "afmoe": ("AfmoeConfig", "AfmoeForCausalLM", dict(
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
        moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, num_shared_experts=1, num_dense_layers=1,
        route_scale=2.5, global_attn_every_n_layers=2, sliding_window=4, mup_enabled=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4})),
    # sliding (window 4 < prompt) and full layers, each with its own RoPE (full: half rotary) and head count;
    # dense and MoE layers interleaved; a router softcap of 0.5 that bites on these logits; per-head softplus gate
    "laguna": ("LagunaConfig", "LagunaForCausalLM", dict(
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
        moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        mlp_layer_types=["dense", "sparse", "dense", "sparse"], num_attention_heads_per_layer=[4, 8, 2, 4],
        sliding_window=4, gating=True, moe_routed_scaling_factor=2.5, moe_router_logit_softcapping=0.5,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 5e5, "partial_rotary_factor": 0.5},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.0}})),
    # 2 layers of 2 sublayers each; 4 stored + 4 zero experts, top-2: the router picks zero experts on the prompt
    # (test_parity_longcat_flash checks it)
    "longcat_flash": ("LongcatFlashConfig", "LongcatFlashForCausalLM", dict(
        num_layers=2, num_attention_heads=4, ffn_hidden_size=96, expert_ffn_hidden_size=32, n_routed_experts=4,
        zero_expert_num=4, moe_topk=2, routed_scaling_factor=2.0, q_lora_rank=32, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, head_dim=8,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7})),
    # DSA: index_topk 5 < the 12-token prompt, so the indexer's selection acts from the sixth query on
    "deepseek_v32": ("DeepseekV32Config", "DeepseekV32ForCausalLM", dict(
        num_hidden_layers=3, num_attention_heads=4, intermediate_size=96, moe_intermediate_size=32,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=2,
        topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=32, kv_lora_rank=32,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, index_topk=5, index_head_dim=16, index_n_heads=8,
        rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0})),
    # layers 1 and 2 reuse layer 0's top-k selection (no indexer of their own), layer 3 runs its own
    "glm_moe_dsa": ("GlmMoeDsaConfig", "GlmMoeDsaForCausalLM", dict(
        num_hidden_layers=4, num_attention_heads=4, intermediate_size=96, moe_intermediate_size=32,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
        q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=24, index_topk=5,
        index_head_dim=16, index_n_heads=8, indexer_types=["full", "shared", "shared", "full"],
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # multimodal (a 1-layer Pixtral tower the converter leaves out); layers: 0 RoPE, owns its latent KV, dense MLP;
    # 1 RoPE, reuses layer 0's KV and layer 0's top-k; 2 NoPE, owns its KV; 3 NoPE, reuses layer 2's KV with an
    # indexer of its own. LeRoPE (learned frequency scales), learned query scaling, logit softcap 30.
    "mistral_large4": ("MistralLarge4Config", "MistralLarge4ForConditionalGeneration", dict(
        text_config=dict(
            num_hidden_layers=4, num_attention_heads=4, intermediate_size=96, moe_intermediate_size=32,
            n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=2,
            topk_group=1, routed_scaling_factor=1.5, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
            v_head_dim=16, index_topk=5, index_head_dim=16, index_n_heads=8, indexer_types=["full", "shared", "full", "full"],
            no_rope_layers=[1, 1, 0, 0], kv_source_layers=[0, 0, 2, 2], final_logit_softcapping=3.0,
            rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 64,
                             "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 1.0}),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           patch_size=4, image_size=32, head_dim=16))),
    # Every feature acts on the 12-token prompt: a window of 4; CSA entries every 2 positions (6 in the prompt) of
    # which the indexer keeps 2; HCA entries every 5; hash-routed layers 0-1 then learned ones; 3 streams; clamps bite.
    "deepseek_v4": ("DeepseekV4Config", "DeepseekV4ForCausalLM", dict(
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=32, q_lora_rank=32,
        partial_rotary_factor=0.25, o_groups=2, o_lora_rank=16, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, moe_intermediate_size=32, sliding_window=4,
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                     "compressed_sparse_attention"],
        mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
        compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 5},
        index_n_heads=4, index_head_dim=16, index_topk=2, hc_mult=3, swiglu_limit=1.0, rope_theta=1e4,
        compress_rope_theta=1.6e5, rope_parameters={k: v for k, v in YARN.items() if k != "rope_theta"})),
    # MoE layers 1 and 3 between dense ones (interleave step 2); layers 0-2 RoPE (llama3 scaling over an original
    # context of 16) attending within chunks of 5 < 12, layer 3 NoPE over the whole prompt, its queries scaled by
    # position (floor_scale 4); top-1 routing with a shared expert
    "llama4_text": ("Llama4TextConfig", "Llama4ForCausalLM", dict(
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=32,
        intermediate_size_mlp=96, num_local_experts=8, num_experts_per_tok=1, interleave_moe_layer_step=2,
        attention_chunk_size=5, no_rope_layer_interval=4, floor_scale=4, attn_scale=0.5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    # multimodal (a one-layer vision tower the converter leaves out): sliding (window 4, 8 heads, full rotary) and
    # full layers (4 heads, half rotary at another theta); layer 0 dense; SwiGLU clamps that bite (0.5) and none (0)
    "step3p7": ("Step3p7Config", "Step3p7ForConditionalGeneration", dict(
        text_config=dict(
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
            moe_intermediate_size=32, share_expert_dim=48, n_routed_experts=8, num_experts_per_tok=2,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            mlp_layer_types=["dense", "sparse", "sparse", "sparse"], sliding_window=4, num_sliding_attention_heads=8,
            swiglu_limits=[0, 0.5, 0, 0.5], swiglu_limits_shared=[0.5, 0, 0.5, 0], moe_router_scaling_factor=2.5,
            query_pre_attn_scalar=12, pad_token_id=0,
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 5e5, "partial_rotary_factor": 0.5},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=56, patch_size=14))),
    # Every feature acts on the 12-token prompt: index_topk 5 < 12; layers 1 and 3 reuse the top-k of layers 0 and 2;
    # 3 independent hyper-connection streams (hc_magnitude 1.5); sinks and the output gate; clamp 1.0 bites; layer 0
    # dense; YaRN with mscale_all_dim (the softmax scale changes). 8 indexer heads: with 4, a key every head's relu
    # zeroes often scores exactly 0 and ties decide the top-k (torch breaks ties its own way)
    "hy_v4": ("HYV4Config", "HYV4ForCausalLM", dict(
        num_hidden_layers=4, num_attention_heads=4, intermediate_size=96, moe_intermediate_size=32,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, routed_scaling_factor=2.5, q_lora_rank=32,
        kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, index_topk=5, index_head_dim=16,
        index_n_heads=8, indexer_types=["full", "shared", "full", "shared"], hc_mult=3, hc_magnitude=1.5,
        swiglu_limit=1.0, rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0})),
    # MLA (NoPE), KDA, MLA, KDA; layer 0 dense; 4 groups of 2 experts, 2 groups kept (KDA first routes this seed's
    # prompt on near-ties, which 8-bit noise flips)
    "kimi_linear": ("KimiLinearConfig", "KimiLinearForCausalLM", dict(
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96,
        moe_intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=4,
        topk_group=2, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
        linear_head_dim=16, linear_num_heads=2,
        layer_types=["full_attention", "linear_attention", "full_attention", "linear_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"])),
    # multimodal (a 1-layer vision tower the converter leaves out); KDA, MLA (own indexer), MLA (reusing its top-k),
    # KDA, MLA (own indexer): keys pooled in pairs, top-4 = 2 pools of the 6 in the prompt plus each query's
    # incomplete pool (8 indexer heads: with fewer, a query whose every head scores 0 leaves pools tied); 3
    # hyper-connection streams; layer 0 dense; the SwiGLU clamp bites
    "glm5_next": ("Glm5NextConfig", "Glm5NextForConditionalGeneration", dict(
        text_config=dict(
            num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96,
            moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2,
            topk_group=1, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=0, qk_nope_head_dim=16, v_head_dim=16,
            index_topk=4, index_kpool=2, index_head_dim=16, index_n_heads=8, linear_head_dim=16, linear_num_heads=2,
            hc_mult=3, swiglu_limit=1.5,
            layer_types=["linear_attention", "indexed_attention", "indexed_attention", "linear_attention",
                         "indexed_attention"],
            indexer_types=["full", "full", "shared", "full", "full"],
            mlp_layer_types=["dense", "sparse", "sparse", "sparse", "sparse"]),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, image_size=32,
                           out_hidden_size=64, projection_intermediate_size=64))),
    # groups of 2: KDA (bounded forget gate) then gated MLA (RoPE), twice; layer 0 dense; 4 groups of 2 experts, 2
    # groups kept; routed_scaling_factor 1 (the default 2.5 makes this random model route on near-ties that 8-bit
    # noise flips: NMSE 0.2)
    "bailing_hybrid": ("BailingHybridConfig", "BailingHybridForCausalLM", dict(
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, head_dim=16, intermediate_size=96,
        moe_intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=4,
        topk_group=2, first_k_dense_replace=1, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, layer_group_size=2, routed_scaling_factor=1.0, rope_theta=1e4)),
    # multimodal (a 1-layer vision tower and the projector the converter leaves out): layers 1 and 2 block-sparse,
    # their indexer keeping 3 blocks of 2 positions (the local one included) of the prompt's 6, one selection per
    # pair of query heads; layer 0 dense; half rotary; the SwiGLU-OAI clamp bites (1.5)
    "minimax_m3_vl": ("MiniMaxM3VLConfig", "MiniMaxM3SparseForConditionalGeneration", dict(
        text_config=dict(
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=32,
            dense_intermediate_size=96, shared_intermediate_size=48, num_local_experts=8, num_experts_per_tok=2,
            routed_scaling_factor=2.0, swiglu_limit=1.5, mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
            layer_types=["full_attention", "minimax_m3_sparse", "minimax_m3_sparse", "full_attention"],
            index_n_heads=2, index_head_dim=16, index_block_size=2, index_topk_blocks=3, index_local_blocks=1,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           patch_size=14, image_size=56),
        projector_hidden_size=64)),
    # multimodal (one-layer vision and audio towers the converter leaves out): sliding (window 4 < the prompt) and
    # global layers, the global ones with wider heads, one KV head and keys as values; a dense MLP beside the MoE in
    # every layer; per-layer embeddings (PLE, 8 per layer); logits soft-capped at 3 (the release: 30, which these
    # logits of about 1 would not reach)
    "gemma4": ("Gemma4Config", "Gemma4ForConditionalGeneration", dict(
        text_config=dict(
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
            num_global_key_value_heads=1, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
            top_k_experts=2, enable_moe_block=True, attention_k_eq_v=True, sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            hidden_size_per_layer_input=8, vocab_size_per_layer_input=256, final_logit_softcapping=3.0,
            pad_token_id=0, rope_parameters=GEMMA4_ROPE),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=2, head_dim=16, patch_size=4, position_embedding_size=64,
                           pooling_kernel_size=2),
        audio_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          subsampling_conv_channels=[8, 4], output_proj_dims=32))),
    # Qwen3.8-Flash-Next: DeltaNet with PLE, QSA attention, twice; EOS (5) inside PARITY's prompt resets the n-grams;
    # each PLE table saved as 3 shards; the indexer sees 2 blocks of 2 (+ its own incomplete one) of up to 6 (8
    # indexer heads: with fewer, a query whose every head scores 0 leaves blocks tied); 3 hyper-connection streams
    "qwen4_exp": ("Qwen4ExpTextConfig", "Qwen4ExpForCausalLM", dict(
        eos_token_id=5, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8,
        moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        hc_count=3, hc_lowrank=16, ple_layer_ids=[1, 3], ple_embed_dim=128, ngram_size=3, heads_per_ngram=2,
        ngram_vocab_size_base=300, make_ngram_vocab_size_divisible_by=16, split_ngram_parts=3,
        indexer_n_heads=8, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=4, indexer_compress_ratio=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
                         "mrope_section": [2, 1, 1], "mrope_interleaved": True})),
}
# model_type -> {transformers 5 key: the release's legacy key} (to_old_spelling)
LEGACY_KEYS: dict[str, dict[str, str]] = {
    "sarvam_moe": {"n_routed_experts": "num_experts", "n_shared_experts": "num_shared_experts",
                   "attention_bias": "use_qkv_bias"},
}
# model_type -> rotary share its legacy configs leave unspelled (the family's default)
LEGACY_ROTARY_DEFAULT = {"sarvam_moe": 1.0}


def make_model(kind: str, seed: int = 0, **overrides) -> torch.nn.Module:
    cfg_cls, model_cls, kwargs = TINY[kind]
    if "text_config" in kwargs:  # multimodal: the common sizes and the overrides are the text model's
        cfg = getattr(transformers, cfg_cls)(**{**kwargs, "text_config": {**COMMON, **kwargs["text_config"], **overrides}})
    else:
        cfg = getattr(transformers, cfg_cls)(**{**COMMON, **kwargs, **overrides})
    torch.manual_seed(seed)
    return randomize(getattr(transformers, model_cls)(cfg).eval())


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Larger, varied weights than the default init, so logits are far from uniform and routing is decisive;
    norms and biases (e_score_correction_bias included) get non-trivial values too."""
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("tid2eid"):  # a hash router's table: distinct experts per token
                t.copy_(torch.rand(t.shape[0], model.config.num_local_experts).argsort(-1)[:, : t.shape[1]])
                continue
            if not t.is_floating_point() or "inv_freq" in name or ("rotary" in name and not name.endswith("alpha")) \
                    or t.ndim == 0:
                continue  # rotary buffers; Mistral Large 4's learned frequency scales (rotary_emb.alpha) vary; scalars
            if "norm" in name or name.endswith(("softmax_scaling.bias", "layer_scalar", "router.scale",
                                                "per_expert_scale")):  # multipliers around 1
                t.copy_(1.0 + 0.1 * torch.randn_like(t))
            elif t.ndim == 1:
                t.copy_(0.1 * torch.randn_like(t))
            else:
                t.copy_(torch.randn_like(t) * (1.0 / t.shape[-1] ** 0.5))
    return model


MLA_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32", "glm_moe_dsa")


def step3p7_release_text_config(tc: dict, mtp: int = 1) -> dict:
    """Step 3.7's text config as its release spells it (remote-code names, per-layer RoPE lists, MoE layers as
    ``moe_layers_enum``, the sliding layers' heads in ``attention_other_setting``, per-layer lists padded with
    ``mtp`` multi-token-prediction layers)."""
    tc = {k: v for k, v in tc.items() if k not in ("per_layer_config", "mtp_layer_types", "mtp_mlp_layer_types")}
    types = tc["layer_types"]
    rp = tc.pop("rope_parameters")
    tc["rope_theta"] = [rp[t]["rope_theta"] for t in types] + [rp["full_attention"]["rope_theta"]] * mtp
    tc["partial_rotary_factors"] = [rp[t].get("partial_rotary_factor", 1.0) for t in types] + [0.5] * mtp
    tc["moe_layers_enum"] = ",".join(str(i) for i, t in enumerate(tc.pop("mlp_layer_types")) if t == "sparse")
    tc["attention_other_setting"] = {"attention_type": "sliding_attention",
                                     "num_attention_heads": tc.pop("num_sliding_attention_heads")}
    for new, old in (("n_routed_experts", "moe_num_experts"), ("num_experts_per_tok", "moe_top_k"),
                     ("num_key_value_heads", "num_attention_groups")):
        tc[old] = tc.pop(new)
    tc["layer_types"] = types + ["full_attention"] * mtp
    for k in ("swiglu_limits", "swiglu_limits_shared"):
        tc[k] = tc[k] + [0] * mtp
    tc["num_nextn_predict_layers"] = mtp
    return tc


def to_old_spelling(cfg: dict) -> dict:
    """config.json as most hub checkpoints spell it (written before transformers 5)."""
    cfg = dict(cfg)
    if cfg.get("model_type") == "deepseek_v4":
        return _deepseek_v4_old_spelling(cfg)
    if cfg.get("model_type") == "step3p7":
        cfg["text_config"] = step3p7_release_text_config(cfg["text_config"])
        return cfg
    if cfg.get("model_type") == "minimax_m3_vl":
        cfg["text_config"] = minimax_m3_release_text_config(cfg["text_config"])
    if cfg.get("model_type") == "gemma4":  # the release: the global layers' shapes as keys, not per_layer_config
        text = dict(cfg["text_config"])
        glob = next(iter(text.pop("per_layer_config").values()))
        text["global_head_dim"], text["num_global_key_value_heads"] = glob["head_dim"], glob["num_key_value_heads"]
        cfg["text_config"] = text
        cfg["torch_dtype"] = cfg.pop("dtype", "float32")
        return cfg
    if cfg.get("model_type") == "kimi_linear":
        cfg = _kimi_linear_old_spelling(cfg)
    if cfg.get("model_type") == "glm5_next":  # the text model's hub keys: a linear_attn_config, an indexer pattern
        text = dict(cfg["text_config"])
        text["linear_attn_config"] = {"head_dim": text.pop("linear_head_dim"), "num_heads": text.pop("linear_num_heads"),
                                      "short_conv_kernel_size": text.pop("linear_conv_kernel_dim"),
                                      "gate_lower_bound": text.pop("linear_lower_bound")}
        text["index_topk_pattern"] = "".join(t[0].upper() for t in text.pop("indexer_types"))
        cfg["text_config"] = text
    if cfg.get("model_type") == "bailing_hybrid":  # the release: head_dim is KDA's, layers from layer_group_size
        cfg["head_dim"] = cfg.pop("linear_head_dim")
        for k in ("linear_num_heads", "linear_conv_kernel_dim", "mlp_layer_types", "qk_head_dim"):
            cfg.pop(k)
    if cfg.get("model_type") == "qwen4_exp_text":  # the layer pattern as an interval (transformers' default 4)
        types = cfg["layer_types"]
        cfg["full_attention_interval"] = next(i + 1 for i, t in enumerate(types) if t != "linear_attention")
        assert types == [("linear_attention" if (i + 1) % cfg["full_attention_interval"] else t)
                         for i, t in enumerate(types)]
    params = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = params.get("rope_theta", 10000.0)
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "rope_type", "partial_rotary_factor")}
    kind = params.get("rope_type", "default")
    cfg["rope_scaling"] = {"type": kind, **scaling} if kind != "default" else None
    if params.get("partial_rotary_factor") == LEGACY_ROTARY_DEFAULT.get(cfg.get("model_type")):
        params = {k: v for k, v in params.items() if k != "partial_rotary_factor"}
    if "partial_rotary_factor" in params:
        if cfg.get("model_type") == "minimax_m2":
            cfg["rotary_dim"] = int(cfg["head_dim"] * params["partial_rotary_factor"])
        else:
            cfg["partial_rotary_factor"] = params["partial_rotary_factor"]
    if cfg.get("model_type") == "qwen3_moe" and "num_local_experts" in cfg:
        cfg["num_experts"] = cfg.pop("num_local_experts")
    # derived keys transformers 5 writes for MLA models; hub configs give first_k_dense_replace, not mlp_layer_types
    for k in ("head_dim", "qk_head_dim", "mlp_layer_types") if cfg.get("model_type") in MLA_TYPES else ():
        cfg.pop(k, None)
    for new, old in LEGACY_KEYS.get(cfg.get("model_type"), {}).items():
        if new in cfg:
            cfg[old] = cfg.pop(new)
    cfg.pop("layer_types", None)
    if cfg.get("indexer_types"):  # GLM-5's hub spelling: one letter per layer, Full or Shared indexer
        cfg["index_topk_pattern"] = "".join(t[0].upper() for t in cfg.pop("indexer_types"))
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    return cfg


def minimax_m3_release_text_config(tc: dict) -> dict:
    """MiniMax-M3's text config as its release spells it: ``rope_theta`` with both ``rotary_dim`` and
    ``partial_rotary_factor``, ``num_experts``, 1/0 per layer in ``moe_layer_freq``, the indexer's keys and its
    layers in a nested ``sparse_attention_config``, and switches transformers ignores."""
    tc = dict(tc)
    rp = tc.pop("rope_parameters")
    tc.update(rope_theta=rp["rope_theta"], partial_rotary_factor=rp["partial_rotary_factor"],
              rotary_dim=int(tc["head_dim"] * rp["partial_rotary_factor"]), num_experts=tc.pop("num_local_experts"),
              moe_layer_freq=[int(t == "sparse") for t in tc.pop("mlp_layer_types")], hidden_act="swigluoai",
              scoring_func="sigmoid", use_routing_bias=True, use_gemma_norm=True, qk_norm_type="per_head")
    freq = [int(t == "minimax_m3_sparse") for t in tc.pop("layer_types")]
    tc["sparse_attention_config"] = {
        "use_sparse_attention": True, "sparse_num_index_heads": tc.pop("index_n_heads"),
        "sparse_index_dim": tc.pop("index_head_dim"), "sparse_block_size": tc.pop("index_block_size"),
        "sparse_topk_blocks": tc.pop("index_topk_blocks"), "sparse_local_block": tc.pop("index_local_blocks"),
        "sparse_score_type": "max", "sparse_init_block": 0, "sparse_attention_freq": freq,
        "sparse_disable_index_value": freq}
    return tc


def _kimi_linear_old_spelling(cfg: dict) -> dict:
    """Kimi Linear's release keys: ``linear_attn_config`` (1-indexed ``kda_layers``/``full_attn_layers``),
    ``first_k_dense_replace`` for ``mlp_layer_types``; its other release names (``num_experts_per_token``, ...) are
    what transformers writes too."""
    types = cfg.pop("layer_types")
    cfg["linear_attn_config"] = {
        "head_dim": cfg.pop("linear_head_dim"), "num_heads": cfg.pop("linear_num_heads"),
        "short_conv_kernel_size": cfg.pop("linear_conv_kernel_dim"),
        "kda_layers": [i + 1 for i, t in enumerate(types) if t == "linear_attention"],
        "full_attn_layers": [i + 1 for i, t in enumerate(types) if t == "full_attention"]}
    cfg["first_k_dense_replace"] = cfg.pop("mlp_layer_types").index("sparse")
    for k in ("head_dim", "qk_head_dim"):
        cfg.pop(k, None)
    return cfg


def _deepseek_v4_old_spelling(cfg: dict) -> dict:
    """DeepSeek V4's legacy keys, as transformers' DeepseekV4Config still reads them: per-layer ``compress_ratios``
    (0 / 4 / 128 name the kind) with ``compress_rate_csa``/``_hca``, ``num_hash_layers``, ``qk_rope_head_dim``,
    ``rope_theta`` + ``rope_scaling`` (the compress set's YaRN) + ``compress_rope_theta``."""
    kinds = {"sliding_attention": 0, "compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
    cfg["compress_ratios"] = [kinds[k] for k in cfg.pop("layer_types")]
    rates = cfg.pop("compress_rates")
    cfg["compress_rate_csa"], cfg["compress_rate_hca"] = rates["compressed_sparse_attention"], rates["heavily_compressed_attention"]
    cfg["num_hash_layers"] = cfg.pop("mlp_layer_types").count("hash_moe")
    cfg["qk_rope_head_dim"] = int(cfg["head_dim"] * cfg.pop("partial_rotary_factor"))
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"], cfg["compress_rope_theta"] = rope["main"]["rope_theta"], rope["compress"]["rope_theta"]
    scaling = {k: v for k, v in rope["compress"].items()
               if k not in ("rope_theta", "rope_type", "partial_rotary_factor", "attention_factor")}
    cfg["rope_scaling"] = {"type": rope["compress"]["rope_type"], **scaling}
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


# a one-block vision tower for Qwen's multimodal wrappers (Qwen3.5-MoE, Qwen3.8-Flash-Next)
QWEN_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                   spatial_merge_size=2, temporal_patch_size=2)


def mtp_head(c) -> dict[str, torch.Tensor]:
    """A multi-token-prediction head as Qwen's releases save it beside the model (``mtp.layers.0...`` must not be read
    as layer 0), for text config ``c``."""
    E, I, H = c.num_experts, c.moe_intermediate_size, c.hidden_size
    return {"mtp.layers.0.mlp.experts.gate_up_proj": torch.randn(E, 2 * I, H),
            "mtp.layers.0.mlp.experts.down_proj": torch.randn(E, H, I), "mtp.fc.weight": torch.randn(H, 2 * H)}


def build_multimodal(kind: str, wrapper: str, out: Path, vision: dict = QWEN_VISION, extra=None, fused: bool = False,
                     **text_overrides) -> Path:
    """A release-style multimodal checkpoint of ``kind``'s tiny text model: transformers' ``{wrapper}Config`` and
    ``{wrapper}ForConditionalGeneration`` with a tiny ``vision`` tower, the text weights those of ``make_model(kind)``
    (so its parity oracle is the same), plus ``extra(config)`` -> {name: tensor} added to the saved file (a
    multi-token-prediction head)."""
    from safetensors.torch import load_file, save_file

    text = make_model(kind)
    cfg = getattr(transformers, wrapper + "Config")(text_config={**COMMON, **TINY[kind][2], **text_overrides},
                                                   vision_config=vision)
    vl = getattr(transformers, wrapper + "ForConditionalGeneration")(cfg).eval()
    vl.model.language_model.load_state_dict(text.model.state_dict())
    vl.lm_head.load_state_dict(text.lm_head.state_dict())
    vl.save_pretrained(out, save_original_format=not fused)
    if extra is not None:
        tensors = load_file(out / "model.safetensors")
        tensors.update(extra(cfg.text_config))
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def reference_logits(ckpt: Path, ids: list[int]):
    """transformers' own float32 logits for ``ids`` from the checkpoint as saved (the parity oracle)."""
    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    # the causal-LM class where transformers maps one (Llama 4), else the multimodal one run on text (Step 3.7,
    # Mistral Large 4), else the class config.json names (mistral4, which no auto class maps)
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForImageTextToText):
        try:
            model = auto.from_pretrained(ckpt, dtype=torch.float32).eval()
            break
        except ValueError:
            continue
    else:
        model = getattr(transformers, cfg["architectures"][0]).from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy(), model


def reference_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()
