#!/usr/bin/env python
"""Write a manifest-only ("virtual") pack: the manifest.json and config.json `moepack convert` would write for a
model and a recipe, without any tensor data. `moepack plan` and `moepack inspect` read only those two files, so
they can size a model too large to download or convert here, e.g. Kimi K2.5 over two 96 GB Macs:

    python tools/virtual_pack.py kimi-k2.5 /tmp/kimi-k2.5-virtual
    moepack plan /tmp/kimi-k2.5-virtual --hosts 2 --memory-per-host 72GB

Tensor names and shapes come from transformers' own model class for the config, built on the meta device (no
memory). Each tensor is then sized by the converter's rules (convert/recipe.py, formats/writer.py): dense matrices
quantized to --dense-bits unless recipe.py keeps them raw, routed experts to --q-bits, or carried exactly as the
release ships them (``--carried-experts 4:32`` for Kimi K2.5's INT4 group-32 experts, moepack's default when the
source is quantized), each expert projection on an aligned boundary of its own file.

CONFIG is a config.json path or a preset (``kimi-k2.5``: Kimi K2.5's published text-model dimensions;
``deepseek-v3.2``, ``glm-5``, ``deepseek-v4-pro``, ``hy4-preview``).

``--ttft 2048,8192,32768`` also prints the expected time to first token for prompts of those lengths: bytes read
over the SSD's bandwidth plus compute, under the old scheme (the prompt in 512-token chunks, each chunk reading every
expert it touches) and the new one (the prompt layer by layer in passes sized like the engine's, each pass reading
every expert it touches once). Experts touched by n tokens assume uniform routing: E·(1 - (1 - k/E)^n) per layer;
streamed tables (the input embedding, SPEC 3.6) add each prompt token's row pages, none cached.
Compute is 2 FLOPs per active parameter per token plus causal attention, at ``--tflops`` (an assumption: set it to
your machine's measured matmul rate).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import transformers

from moepack import arch
from moepack.convert.recipe import Recipe
from moepack.formats import dtypes, quant
from moepack.convert.units import streamed_tables, table_relpath
from moepack.formats.manifest import Blob, ExpertLayer, ExpertLayout, Manifest, Table, TensorRecord
from moepack.formats.writer import BLOB_ALIGN, align_up

# Kimi K2.5 (moonshotai/Kimi-K2.5): a DeepSeek-V3 text model (as Kimi K2) inside a vision-language wrapper.
KIMI_K25_TEXT = {
    "model_type": "kimi_k2", "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 163840, "hidden_size": 7168,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 64,
    "num_key_value_heads": 64, "n_shared_experts": 1, "n_routed_experts": 384, "num_experts_per_tok": 8,
    "first_k_dense_replace": 1, "moe_layer_freq": 1, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128, "n_group": 1, "topk_group": 1,
    "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.827,
    "rms_norm_eps": 1e-5, "max_position_embeddings": 262144, "tie_word_embeddings": False, "rope_theta": 50000.0,
    "rope_scaling": {"type": "yarn", "factor": 64.0, "original_max_position_embeddings": 4096, "beta_fast": 1.0,
                     "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
}
# DeepSeek-V3.2 (deepseek-ai/DeepSeek-V3.2): DeepSeek-V3's dimensions plus the DSA indexer; FP8 blocks, which the
# converter decodes and requantizes (no carried experts).
DEEPSEEK_V32 = {
    "model_type": "deepseek_v32", "architectures": ["DeepseekV32ForCausalLM"], "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "num_experts_per_tok": 8, "first_k_dense_replace": 3, "moe_layer_freq": 1, "kv_lora_rank": 512,
    "q_lora_rank": 1536, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128, "n_group": 8,
    "topk_group": 4, "norm_topk_prob": True, "routed_scaling_factor": 2.5, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 163840, "tie_word_embeddings": False, "index_topk": 2048, "index_head_dim": 128,
    "index_n_heads": 64, "rope_theta": 10000.0,
    "rope_scaling": {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                     "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
}
# GLM-5 (zai-org/GLM-5): MLA + DSA, the dimensions transformers' GlmMoeDsaConfig documents as its defaults.
GLM_5 = {
    "model_type": "glm_moe_dsa", "architectures": ["GlmMoeDsaForCausalLM"], "vocab_size": 154880, "hidden_size": 6144,
    "intermediate_size": 12288, "moe_intermediate_size": 2048, "num_hidden_layers": 78, "num_attention_heads": 64,
    "num_key_value_heads": 64, "n_shared_experts": 1, "n_routed_experts": 256, "num_experts_per_tok": 8,
    "first_k_dense_replace": 3, "kv_lora_rank": 512, "q_lora_rank": 2048, "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 192, "v_head_dim": 256, "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
    "routed_scaling_factor": 2.5, "rms_norm_eps": 1e-5, "max_position_embeddings": 202752,
    "tie_word_embeddings": False, "index_topk": 2048, "index_head_dim": 128, "index_n_heads": 32,
    "rope_theta": 1000000.0,
}
# DeepSeek V4 Pro (deepseek-ai/DeepSeek-V4-Pro): 61 layers (2 HCA, then CSA and HCA alternating; the first 3 hash-routed),
# 384 experts, top-6, 4 hyper-connection streams; the release ships FP4 experts (e2m1, group 32), sized here as 4-bit
# group 32. Fields not given take transformers' DeepseekV4Config defaults (V4 Flash's).
DEEPSEEK_V4_PRO = {
    "model_type": "deepseek_v4", "architectures": ["DeepseekV4ForCausalLM"], "vocab_size": 129280, "hidden_size": 7168,
    "moe_intermediate_size": 3072, "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 1,
    "head_dim": 512, "q_lora_rank": 1536, "n_routed_experts": 384, "num_experts_per_tok": 6, "n_shared_experts": 1,
    "o_groups": 16, "o_lora_rank": 1024, "index_topk": 1024, "sliding_window": 128, "num_hash_layers": 3, "hc_mult": 4,
    "rope_theta": 10000.0, "compress_rope_theta": 160000.0, "max_position_embeddings": 1048576,
    "rope_scaling": {"type": "yarn", "factor": 16.0, "original_max_position_embeddings": 65536, "beta_fast": 32,
                     "beta_slow": 1},
}
# Hunyuan v4 (tencent/Hy4-preview): the dimensions transformers' HYV4Config documents as its defaults (34 layers, the
# first dense; 256 experts, top-8; MLA + DSA with shared indexer layers; 4 hyper-connection streams).
HY4_PREVIEW = {
    "model_type": "hy_v4", "architectures": ["HYV4ForCausalLM"], "vocab_size": 120832, "hidden_size": 2816,
    "intermediate_size": 6912, "moe_intermediate_size": 768, "num_hidden_layers": 34, "num_attention_heads": 32,
    "n_routed_experts": 256, "num_experts_per_tok": 8, "n_shared_experts": 1, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 192, "qk_rope_head_dim": 64, "v_head_dim": 256, "index_topk": 2048, "index_head_dim": 128,
    "index_n_heads": 16, "hc_mult": 4, "rms_norm_eps": 1e-5, "max_position_embeddings": 262144,
    "tie_word_embeddings": False,
}
PRESETS = {
    "kimi-k2.5": ({"model_type": "kimi_k25", "architectures": ["KimiK25ForConditionalGeneration"],
                   "text_config": KIMI_K25_TEXT}, "4:32"),
    "deepseek-v3.2": (DEEPSEEK_V32, None),
    "glm-5": (GLM_5, None),
    "deepseek-v4-pro": (DEEPSEEK_V4_PRO, "4:32"),
    "hy4-preview": (HY4_PREVIEW, None),
}
# model types transformers knows under another name
TRANSFORMERS_TYPE = {"kimi_k2": "deepseek_v3", "kimi_k25": "deepseek_v3"}
NO_HASH = "0" * 64  # a virtual pack has no files to hash


def tensor_shapes(cfg: dict) -> dict[str, list[int]]:
    """Every tensor of the text model, under hub names, from transformers' model class on the meta device (integer
    tables, e.g. DeepSeek V4's tid2eid, are listed in ``INTEGER_TABLES``)."""
    tc = {k: v for k, v in cfg.items() if k not in ("architectures", "auto_map", "quantization_config")}
    mt = TRANSFORMERS_TYPE.get(tc["model_type"], tc["model_type"])
    config = transformers.AutoConfig.for_model(mt, **{k: v for k, v in tc.items() if k != "model_type"})
    tied = {"lm_head.weight"} if tc.get("tie_word_embeddings") else set()  # saved once, as the embedding
    with torch.device("meta"):
        try:
            state = transformers.AutoModelForCausalLM.from_config(config).state_dict()
        except ValueError:  # a multimodal release's text model (GLM-5.3-Flash) has no causal-LM class of its own
            state = {"model." + k: v for k, v in transformers.AutoModel.from_config(config).state_dict().items()}
            state["lm_head.weight"] = torch.empty(config.vocab_size, config.hidden_size)
    state = {k: v for k, v in state.items() if k not in tied}
    INTEGER_TABLES.update(k for k, v in state.items() if not v.is_floating_point())
    return {k: list(v.shape) for k, v in state.items()}


INTEGER_TABLES: set[str] = set()  # names of integer tensors seen by tensor_shapes: stored raw as int32


def _blobs(parts: dict[str, tuple[str, list[int]]], pos: int, file: str | None) -> tuple[dict[str, Blob], int]:
    blobs = {}
    for name, (dtype, shape) in parts.items():
        pos = align_up(pos, BLOB_ALIGN)
        n = math.prod(shape) * dtypes.get(dtype).itemsize
        blobs[name] = Blob(pos, n, dtype, shape, file)
        pos += n
    return blobs, pos


def encode(name: str, shape: list[int], expert: bool, recipe: Recipe, carried: tuple[int, int] | None):
    """(encoding, parts {name: (dtype, shape)}, bits, group size, carried) as recipe.py would store the tensor."""
    if name in INTEGER_TABLES:
        return "raw", {"data": (dtypes.TABLE_DTYPE, shape)}, None, None, None
    if expert and carried:
        bits, gs = carried
        return "affine", _affine(shape, bits, gs, recipe.dtype), bits, gs, "lossless"
    bits, gs = (recipe.expert_bits, recipe.expert_group_size) if expert else (recipe.dense_bits, recipe.dense_group_size)
    wants = expert and name in arch.EXPERT_PROJS or not expert and arch.is_quantizable_dense(name, shape)
    if recipe.quantize and wants and quant.can_quantize(shape, gs):
        return "affine", _affine(shape, bits, gs, recipe.dtype), bits, gs, None
    return "raw", {"data": (recipe.dtype, shape)}, None, None, None


def _affine(shape: list[int], bits: int, gs: int, dtype: str) -> dict[str, tuple[str, list[int]]]:
    s = quant.packed_shape(shape, bits, gs)
    return {"weight": ("uint32", s["weight"]), "scales": (dtype, s["scales"]), "biases": (dtype, s["biases"])}


def expert_shapes(shapes: dict[str, list[int]], cfg: dict) -> tuple[dict[str, list[int]], dict[int, dict[str, list[int]]]]:
    """Split off routed experts: dense tensors, and per MoE layer the shapes of one expert's projections."""
    fused = arch.family_for(cfg).fused
    dense, experts = {}, {}
    for name, shape in shapes.items():
        if m := arch.FUSED_EXPERT_TENSOR.match(name):
            one = shape[1:]  # [E, ...] -> one expert's
            if m["bias"]:
                split = {"gate_up_proj": {"gate_bias": [one[0] // 2], "up_bias": [one[0] // 2]}, "down_proj": {"down_bias": one}}
            elif fused.transposed:  # gpt-oss: [in, out]; the pack stores [out, in]
                split = {"gate_up_proj": {"gate": [one[1] // 2, one[0]], "up": [one[1] // 2, one[0]]},
                         "down_proj": {"down": [one[1], one[0]]}}
            else:
                split = {"gate_up_proj": {"gate": [one[0] // 2, one[1]], "up": [one[0] // 2, one[1]]},
                         "down_proj": {"down": one}}
            experts.setdefault(int(m["layer"]), {}).update(split[m["proj"]])
        elif m := arch.EXPERT_TENSOR.match(name):
            proj = arch.PROJ_ALIASES[m["proj"]] + ("_bias" if m["part"] == "bias" else "")
            experts.setdefault(int(m["layer"]), {})[proj] = shape
        else:
            dense[name] = shape
    return dense, experts


def virtual_pack(config: dict, out: Path, recipe: Recipe, carried: tuple[int, int] | None) -> Path:
    tc = arch.text_config(config)
    fam = arch.family_for(tc)
    dense_shapes, expert_projs = expert_shapes(tensor_shapes(tc), tc)
    files: dict[str, dict] = {}
    dense, pos, tables = {}, 0, {}
    kept = {n: s for n, s in dense_shapes.items() if not arch.SKIPPED.match(n) and not arch.DERIVED.search(n)}
    for name in streamed_tables(tc, recipe, kept, INTEGER_TABLES):  # the input embedding and PLE tables, streamed (SPEC 3.6)
        rows, *cols = kept.pop(name)
        enc, parts, bits, gs, _ = encode(name, [1, *cols], False, recipe, None)
        blobs, _ = _blobs({k: (dt, shape[1:]) for k, (dt, shape) in parts.items()}, 0, None)
        tables[name] = Table.layout(table_relpath(name), rows, TensorRecord(enc, cols, recipe.dtype, blobs, bits, gs),
                                    recipe.alignment)
        files[tables[name].file] = {"length": tables[name].length, "blake3": NO_HASH}
    for name in sorted(kept, key=lambda n: (arch.layer_of(n) if arch.layer_of(n) is not None else -1, n)):
        enc, parts, bits, gs, _ = encode(name, dense_shapes[name], False, recipe, None)
        blobs, pos = _blobs(parts, pos, "dense/dense-00000.bin")
        dtype = dtypes.TABLE_DTYPE if name in INTEGER_TABLES else recipe.dtype
        dense[name] = TensorRecord(enc, dense_shapes[name], dtype, blobs, bits, gs)
    files["dense/dense-00000.bin"] = {"length": align_up(pos, recipe.alignment), "blake3": NO_HASH}
    layouts, layers = {}, []
    n_experts = int(arch.get(tc, "num_experts"))
    for L in sorted(expert_projs):
        tensors, pos = {}, 0
        for proj in sorted(expert_projs[L], key=lambda p: (arch.EXPERT_PROJS.index(p.removesuffix("_bias")), p)):
            enc, parts, bits, gs, how = encode(proj, expert_projs[L][proj], True, recipe, carried if proj in arch.EXPERT_PROJS else None)
            pos = align_up(pos, recipe.alignment)  # every projection segment starts on an aligned boundary
            blobs, pos = _blobs(parts, pos, None)
            tensors[proj] = TensorRecord(enc, expert_projs[L][proj], recipe.dtype, blobs, bits, gs,
                                         source_encoding=f"int{bits}-pack-quantized-g{gs}" if how else None, carried=how)
        layout = ExpertLayout(align_up(pos, recipe.alignment), tensors)
        key = next((k for k, v in layouts.items() if v.to_json() == layout.to_json()), f"layout-{len(layouts)}")
        layouts[key] = layout
        names = [f"experts/{L:03d}/{e:04d}.bin" for e in range(n_experts)]
        files.update({n: {"length": layout.length, "blake3": NO_HASH} for n in names})
        layers.append(ExpertLayer(L, key, names))
    architecture = {"family": fam.name, "model_type": tc.get("model_type"), "num_layers": arch.num_layers(tc),
                    "moe_layers": arch.moe_layers(tc), "num_experts": n_experts, "top_k": int(arch.get(tc, "top_k")),
                    "hidden_size": int(tc["hidden_size"]), "expert_width": arch.expert_width(tc),
                    "vocab_size": tc.get("vocab_size")}
    manifest = Manifest(architecture, recipe.alignment, recipe.to_json(),
                        {"source": "virtual pack (tools/virtual_pack.py): sizes only, no tensor data",
                         "converter": "tools/virtual_pack.py"},
                        dict(sorted(files.items())), dense, layouts, layers, tables=tables)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    manifest.save(out)
    return out


def ttft(pack: Path, tokens: list[int], ssd_gbps: float, tflops: float, budget: int, chunk: int = 512) -> list[dict]:
    """Expected time to first token for each prompt length, old (chunked) and new (layer-major passes) schemes."""
    import mlx.core as mx

    from moepack.formats.reader import PackReader
    from moepack.runtime.engine import ACTIVATION_BYTES, MAX_PASS
    from moepack.runtime.memory import working_memory

    reader = PackReader(pack)
    m, tc = reader.manifest, arch.text_config(reader.config)
    E, k = m.architecture["num_experts"], m.architecture["top_k"]
    per_layer = [m.expert_layouts[el.layout].length for el in m.experts]  # one expert file, per MoE layer
    active = sum(math.prod(r.shape) for r in m.dense.values()) + sum(
        k * sum(math.prod(t.shape) for t in m.expert_layouts[el.layout].tensors.values()) for el in m.experts)
    heads = int(tc["num_attention_heads"])
    qk = int(tc.get("qk_nope_head_dim", 0) + tc.get("qk_rope_head_dim", 0)) or int(tc.get("head_dim") or tc["hidden_size"] // heads)
    v = int(tc.get("v_head_dim") or qk)
    work = working_memory(reader, mx.bfloat16)
    max_pass = max(256, min(MAX_PASS, max(ACTIVATION_BYTES, budget // 16) // work.act_per_token))

    def read(n_tokens: int, size: int) -> float:  # bytes one run of ``size``-token blocks reads over n_tokens
        blocks = [min(size, n_tokens - s) for s in range(0, n_tokens, size)]
        rows = sum(min(n_tokens, t.rows) * t.read_bytes() for t in m.tables.values())  # streamed tables, 0% hits
        return sum(E * (1 - (1 - k / E) ** b) * L for b in blocks for L in per_layer) + rows

    rows = []
    for T in tokens:
        flops = 2 * active * T + 2 * T * T * arch.num_layers(tc) * heads * (qk + v)  # causal: T²/2 pairs, qk and pv
        compute = flops / (tflops * 1e12)
        old, new = read(T, chunk), read(T, max_pass)
        rows.append({"tokens": T, "old_read_gb": old / 1e9, "old_s": old / (ssd_gbps * 1e9) + compute,
                     "passes": -(-T // max_pass), "new_read_gb": new / 1e9, "new_s": new / (ssd_gbps * 1e9) + compute,
                     "compute_s": compute})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help=f"config.json or a preset: {', '.join(PRESETS)}")
    ap.add_argument("out", type=Path)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--q-bits", type=int, default=4)
    ap.add_argument("--q-group-size", type=int, default=64)
    ap.add_argument("--dense-bits", type=int, default=8)
    ap.add_argument("--dense-group-size", type=int, default=64)
    ap.add_argument("--carried-experts", metavar="BITS:GROUP",
                    help="the release ships experts quantized like this and moepack carries them as they are")
    ap.add_argument("--ttft", type=lambda s: [int(x) for x in s.split(",")], metavar="TOKENS,...",
                    help="print the expected time to first token for these prompt lengths, old and new scheme")
    ap.add_argument("--ssd-gbps", type=float, default=5.3, help="the SSD's read bandwidth, GB/s (for --ttft)")
    ap.add_argument("--tflops", type=float, default=20.0, help="sustained matmul TFLOP/s (for --ttft; an assumption)")
    ap.add_argument("--budget", default="64GB", help="the memory budget the passes are sized for (for --ttft)")
    ap.add_argument("--resident-embeddings", action="store_true", help="as `moepack convert --resident-embeddings`")
    args = ap.parse_args()
    if args.config in PRESETS:
        config, carried = PRESETS[args.config]
        carried = args.carried_experts or carried
    else:
        config, carried = json.loads(Path(args.config).read_text()), args.carried_experts
    recipe = Recipe(dtype=args.dtype, expert_bits=args.q_bits, expert_group_size=args.q_group_size,
                    dense_bits=args.dense_bits, dense_group_size=args.dense_group_size,
                    stream_tables=not args.resident_embeddings)
    bits_gs = tuple(int(x) for x in carried.split(":")) if carried else None
    print(virtual_pack(config, args.out, recipe, bits_gs))
    if args.ttft:
        from moepack.units import parse_bytes

        print(f"time to first token, SSD {args.ssd_gbps:g} GB/s, {args.tflops:g} TFLOP/s, budget {args.budget}")
        print(f"{'tokens':>7} | {'old: read GB':>12} {'TTFT s':>8} | {'new: passes':>11} {'read GB':>8} {'TTFT s':>8} | "
              f"{'compute s':>9}")
        for r in ttft(args.out, args.ttft, args.ssd_gbps, args.tflops, parse_bytes(args.budget)):
            print(f"{r['tokens']:>7} | {r['old_read_gb']:>12.0f} {r['old_s']:>8.0f} | {r['passes']:>11} "
                  f"{r['new_read_gb']:>8.0f} {r['new_s']:>8.0f} | {r['compute_s']:>9.0f}")


if __name__ == "__main__":
    main()
