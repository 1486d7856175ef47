"""Architecture knowledge shared by the converter and the runtime, kept as data.

For every supported family: which ``model_type`` values name it, which checkpoint tensors are routed
experts (and how their names map to gate/up/down), which layers are MoE layers, and how to read the
config in both the hub's older spelling (``rope_theta``/``rope_scaling``/``num_experts``) and
transformers 5's (``rope_parameters``/``num_local_experts``). A new architecture starts here, then
gets a model module in ``moepack/runtime/models/``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from typing import Callable

from moepack.errors import UnsupportedArchitecture

# Canonical config keys and the spellings found in the wild, first match wins.
CONFIG_ALIASES: dict[str, tuple[str, ...]] = {
    "num_experts": ("n_routed_experts", "num_local_experts", "num_experts", "moe_num_experts"),
    "top_k": ("num_experts_per_tok", "moe_topk", "top_k", "moe_k", "moe_top_k",
              "num_experts_per_token",  # Kimi Linear's and Bailing's releases
              "top_k_experts"),  # Gemma 4
    "n_shared_experts": ("n_shared_experts", "num_shared_experts"),  # Sarvam's release: num_shared_experts
    "attention_bias": ("attention_bias", "use_qkv_bias"),  # Sarvam's release: use_qkv_bias
    "num_hidden_layers": ("num_hidden_layers", "num_layers"),  # LongCat-Flash: num_layers (each two sublayers)
    "zero_experts": ("zero_expert_num",),
    "num_key_value_heads": ("num_key_value_heads", "num_attention_groups"),  # Step 3.7's release  # LongCat-Flash: identity experts the router may pick after the stored ones
}

# Per-expert tensors: ...layers.L.(mlp|block_sparse_moe|ffn|feed_forward).experts.E.<proj>.<weight|bias>
# (ffn: DeepSeek V4's release; feed_forward: Llama 4's)
EXPERT_TENSOR = re.compile(
    r"^(?P<prefix>.*?)layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe|ffn|feed_forward)\.experts\.(?P<expert>\d+)\."
    r"(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)\.(?P<part>weight|bias)$"
)
# Fused tensors (transformers 5 with save_original_format=False): [E, 2I, H] gate_up (gate rows first), [E, H, I] down;
# Gemma 4's release keeps them so, on the layer itself (``layers.L.experts.gate_up_proj``: its MLP runs beside them).
FUSED_EXPERT_TENSOR = re.compile(
    r"^(?P<prefix>.*?)layers\.(?P<layer>\d+)\.(?:(?:mlp|block_sparse_moe|feed_forward)\.)?experts\."
    r"(?P<proj>gate_up_proj|down_proj)(?P<bias>_bias)?$"
)
# Stacked per projection (Step 3.7's release): ...layers.L.moe.<gate_proj|up_proj|down_proj>.weight [E, out, in].
STACKED_EXPERT_TENSOR = re.compile(
    r"^(?P<prefix>.*?)layers\.(?P<layer>\d+)\.moe\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$"
)
LAYER_TENSOR = re.compile(r"^(?P<prefix>.*?)layers\.(?P<layer>\d+)\.")
# The token embedding: ``model.embed_tokens.weight``, or ``embed.weight`` in DeepSeek V4's release.
EMBEDDING = re.compile(r"(^|\.)embed(_tokens)?\.")
# Tensors a pack leaves out: multi-token-prediction heads (``mtp.layers.0...`` would otherwise read as layer 0;
# LongCat-Flash's ``model.mtp.*``; Mistral Large 4's ``mtp_dspark``; ERNIE 4.5's ``model.mtp_block.0...``,
# ``model.mtp_linear_proj.0...``) and the vision tower of a multimodal checkpoint whose text model moepack runs
# (Qwen3.5-MoE; Kimi K2.5's vision_tower and mm_projector; Llama 4's vision_model and multi_modal_projector; Step
# 3.7's vision_model and vit_large_projector, under model. in transformers 5's saves; Mistral Large 4's Pixtral tower
# and projector, in transformers' names and in Mistral's own; MiniMax-M3's vision_tower, multi_modal_projector and
# patch_merge_mlp; Gemma 4's vision and audio towers and their embedders).
VISION = re.compile(r"^(model\.visual\.|visual\.|vision_tower\.|(model\.)?vision_model\.|mm_projector\.|"
                    r"multi_modal_projector\.|vit_large_projector\.|model\.vision_tower\.|model\.multi_modal_projector\.|"
                    r"vision_encoder\.|patch_merger\.|pre_mm_projector_norm\.|vision_language_adapter\.|patch_merge_mlp\.|"
                    r"model\.audio_tower\.|model\.embed_vision\.|model\.embed_audio\.)")
SKIPPED = re.compile(rf"^(model\.)?mtp\.|^mtp_dspark\.|^model\.mtp_|{VISION.pattern}")
# Buffers a checkpoint saves that the runtime derives from the config, which a pack leaves out: Qwen3.8-Flash-Next's
# n-gram hash constants (int64 multipliers beyond the int32 a pack stores integers in; the heads' prime vocabulary
# sizes and offsets).
DERIVED = re.compile(r"\.ple_embedding\.(layer_multipliers|ngram_heads_offsets|ngram_heads_vocab_sizes)$")
# Row-indexed tables other than the input embedding that no LM head shares, so a pack streams them whether or not the
# head is tied (SPEC 3.6), name -> the config's rows each token reads from one: Gemma 4's per-layer embeddings (PLE,
# [vocab, layers x per-layer width], one row a token); Qwen3.8-Flash-Next's hashed n-gram embeddings (Per-Layer
# Embedding, one row per n-gram head).
ROW_TABLES: dict[str, Callable[[dict], int]] = {
    r"(^|\.)embed_tokens_per_layer\.weight$": lambda cfg: 1,
    r"\.ple_embedding\.ngram_embedding\.weight$": lambda cfg: (cfg.get("ngram_size", 3) - 1) * cfg.get("heads_per_ngram", 8),
}
# A table a release splits over several tensors along its rows (``...ngram_embedding.shard_K.weight``, K from 0, as
# transformers' Concatenate(dim=0) joins them): the pack stores the whole table under ``<base>.weight``.
TABLE_SHARD = re.compile(r"^(?P<base>.*\.ngram_embedding)\.shard_(?P<part>\d+)\.weight$")
# A multimodal wrapper's prefixes -> the text model's own, so its tensors load as a plain causal LM
# (Kimi K2.5 nests a DeepSeek-V3 text model as language_model.model.* and language_model.lm_head; Qwen3.5-MoE
# as model.language_model.*).
TEXT_PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                 ("model.language_model.", "model."))
PROJ_ALIASES = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
EXPERT_PROJS = ("gate", "up", "down")

# Dense tensors that stay unquantized whatever the recipe: norms, routers, gates, biases, correction terms, the DSA
# indexer's per-head weights (float32 in transformers).
UNQUANTIZED = re.compile(
    r"(norm|\.gate\.weight$|shared_expert_gate|e_score_correction_bias|\.bias$|layernorm|router|sinks|weights_proj)"
)


def _all_layers(cfg: dict, i: int) -> bool:
    return True


def _qwen_moe_layer(cfg: dict, i: int) -> bool:
    step = cfg.get("decoder_sparse_step", 1) or 1
    return i not in (cfg.get("mlp_only_layers") or []) and get(cfg, "num_experts", 0) > 0 and (i + 1) % step == 0


def _deepseek_moe_layer(cfg: dict, i: int) -> bool:
    if cfg.get("mlp_layer_types"):  # transformers 5 spelling (DeepSeek-V3.2, GLM-5): "dense" / "sparse" per layer
        return cfg["mlp_layer_types"][i] == "sparse"
    return (
        get(cfg, "num_experts", 0) > 0
        and i >= cfg.get("first_k_dense_replace", 0)
        and i % (cfg.get("moe_layer_freq", 1) or 1) == 0
    )


def _glm_moe_layer(cfg: dict, i: int) -> bool:
    return i >= cfg.get("first_k_dense_replace", 0)


def _afmoe_layer(cfg: dict, i: int) -> bool:
    return i >= cfg.get("num_dense_layers", 1)


def _sparse_by_type(cfg: dict, i: int, first_sparse: int) -> bool:
    """``mlp_layer_types`` ("dense"/"sparse" per layer: Laguna, Hunyuan v3 and v4, Step 3.7, the KDA families,
    MiniMax-M3), else MiniMax-M3's release spelling ``moe_layer_freq`` (1/0 per layer), else Step 3.7's
    ``moe_layers_enum`` (MoE layer indices, a list or "3,4,..."), else layers from ``first_k_dense_replace`` on, or
    from ``first_sparse`` (the family's default: Kimi Linear 1, Bailing hybrid 2, GLM-5.3 3)."""
    if types := cfg.get("mlp_layer_types"):
        return types[i] == "sparse"
    if isinstance(freq := cfg.get("moe_layer_freq"), list):
        return bool(freq[i])
    if (enum := cfg.get("moe_layers_enum")) is not None:
        return i in {int(x) for x in (enum.split(",") if isinstance(enum, str) else enum) if str(x).strip()}
    return i >= cfg.get("first_k_dense_replace", first_sparse)


def _ernie_moe_layer(cfg: dict, i: int) -> bool:
    # every moe_layer_interval-th layer from moe_layer_start_index to moe_layer_end_index (-1: the last layer)
    end = cfg.get("moe_layer_end_index", -1)
    end = num_layers(cfg) - 1 if end is None or end == -1 else end
    return ((i + 1) % (cfg.get("moe_layer_interval") or 1) == 0 and cfg.get("moe_layer_start_index", 1) <= i <= end
            and get(cfg, "num_experts", 0) > 0)


def _gemma4_moe_layer(cfg: dict, i: int) -> bool:
    # a MoE beside the dense MLP in every layer where ``enable_moe_block`` (26B-A4B); the dense releases have none
    return bool(cfg.get("enable_moe_block")) and get(cfg, "num_experts", 0) > 0


def _llama4_moe_layer(cfg: dict, i: int) -> bool:
    # ``moe_layers`` where given, else every interleave_moe_layer_step-th layer (transformers' default)
    step = cfg.get("interleave_moe_layer_step") or 1
    layers = cfg.get("moe_layers")
    return i in (layers if layers is not None else range(step - 1, num_layers(cfg), step))


@dataclass(frozen=True)
class FusedLayout:
    """How a family's fused expert tensors lie on disk, after the leading expert axis.

    Default (transformers 5): ``gate_up_proj [2I, H]`` = [gate; up] halves, ``down_proj [H, I]``, i.e. [out, in].
    gpt-oss: ``gate_up_proj [H, 2I]`` with gate and up interleaved along 2I (gate = even, up = odd columns),
    ``down_proj [I, H]``: ``transposed`` ([in, out]) and ``interleaved``. Biases ``*_bias [2I]``/``[H]`` follow the
    same split along their only axis.
    """

    transposed: bool = False
    interleaved: bool = False

    def split(self, two_i: int) -> dict[str, tuple[int, int, int]]:
        """(start, stop, step) of gate and up along the fused 2I axis."""
        if self.interleaved:
            return {"gate": (0, two_i, 2), "up": (1, two_i, 2)}
        return {"gate": (0, two_i // 2, 1), "up": (two_i // 2, two_i, 1)}


@dataclass(frozen=True)
class NativeNames:
    """A release's own tensor names -> transformers' (as transformers' conversion_mapping renames them on load):
    ``rules`` (regex, replacement) in order, for names that match ``applies``."""

    applies: str
    rules: tuple[tuple[str, str], ...]

    def __call__(self, name: str) -> str:
        if not re.match(self.applies, name):
            return name
        for pattern, repl in self.rules:
            name = re.sub(pattern, repl, name)
        return name


# Mistral's consolidated names (Mistral Large 4): layers.N.attention.wq, .feed_forward.w1, .experts.E.w1, ...
MISTRAL_NAMES = NativeNames(r"(layers|tok_embeddings|lerope|norm|output)\.", (
    (r"^tok_embeddings\.", "model.embed_tokens."), (r"^lerope\.alpha$", "model.rotary_emb.alpha"),
    (r"^layers\.", "model.layers."), (r"^norm\.", "model.norm."), (r"^output\.", "lm_head."),
    (r"\.attention\.", ".self_attn."), (r"\.wq\.", ".q_proj."), (r"\.wkv_a_with_mqa\.", ".kv_a_proj_with_mqa."),
    (r"\.wkv_b\.", ".kv_b_proj."), (r"\.wo\.", ".o_proj."), (r"\.attention_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."), (r"\.kv_a_norm\.", ".kv_a_layernorm."),
    (r"\.(feed_forward|shared_experts)\.w1\.", r".\1.gate_proj."),
    (r"\.(feed_forward|shared_experts)\.w2\.", r".\1.down_proj."),
    (r"\.(feed_forward|shared_experts)\.w3\.", r".\1.up_proj."),
    (r"\.feed_forward\.", ".mlp."), (r"\.gate\.", ".mlp.gate."), (r"\.experts\.", ".mlp.experts."),
    (r"\.shared_experts\.", ".mlp.shared_experts."),
    (r"\.ssmax_scaling\.s$", ".softmax_scaling.scale"), (r"\.ssmax_scaling\.b$", ".softmax_scaling.bias"),
))

# Hunyuan v4's release names (transformers' conversion mapping for hy_v4): the hyper-connections' ``hc_pre`` prefix,
# ``hc_attn_layer``/``hc_mlp_layer``, ``hc_head_fn``...; the attention's ``learnable_sink_param`` and ``linear_gate``.
HY_V4_NAMES = NativeNames(r"", (
    (r"\.hc_pre\.hc_", ".hc_"), (r"\.learnable_sink_param", ".sinks"), (r"\.linear_gate", ".gate_proj"),
    (r"\.hc_attn_layer\.hc_(fn|base|scale)", r".attn_hc.\1"), (r"\.hc_mlp_layer\.hc_(fn|base|scale)", r".ffn_hc.\1"),
    (r"\.hc_head_(fn|base|scale)", r".hc_\1"),
))


@dataclass(frozen=True)
class Family:
    name: str  # the runtime module in moepack/runtime/models/
    model_types: tuple[str, ...]
    expert_intermediate: tuple[str, ...]  # config keys of a routed expert's width, first match wins
    is_moe_layer: Callable[[dict, int], bool]
    fused: FusedLayout = FusedLayout()
    native: NativeNames | None = None  # the release's own tensor names, where they are not transformers'


FAMILIES: tuple[Family, ...] = (
    Family("mixtral", ("mixtral",), ("intermediate_size",), _all_layers),
    Family("qwen2_moe", ("qwen2_moe",), ("moe_intermediate_size",), _qwen_moe_layer),
    Family("qwen3_moe", ("qwen3_moe",), ("moe_intermediate_size",), _qwen_moe_layer),
    Family("deepseek", ("deepseek_v2", "deepseek_v3", "kimi_k2", "kimi_k25", "mistral4"), ("moe_intermediate_size",),
           _deepseek_moe_layer),
    Family("olmoe", ("olmoe",), ("intermediate_size",), _all_layers),
    Family("glm4_moe", ("glm4_moe",), ("moe_intermediate_size",), _glm_moe_layer),
    Family("minimax_m2", ("minimax_m2",), ("intermediate_size",), _all_layers),
    Family("gpt_oss", ("gpt_oss",), ("intermediate_size",), _all_layers, FusedLayout(transposed=True, interleaved=True)),
    Family("qwen3_next", ("qwen3_next", "qwen3_5_moe", "qwen3_5_moe_text"), ("moe_intermediate_size",), _qwen_moe_layer),
    Family("hy_v3", ("hy_v3",), ("moe_intermediate_size",), partial(_sparse_by_type, first_sparse=1)),
    Family("ernie4_5_moe", ("ernie4_5_moe",), ("moe_intermediate_size",), _ernie_moe_layer),
    Family("dots1", ("dots1",), ("moe_intermediate_size",), _glm_moe_layer),
    Family("sarvam_moe", ("sarvam_moe",), ("moe_intermediate_size",), _glm_moe_layer),
    Family("afmoe", ("afmoe",), ("moe_intermediate_size",), _afmoe_layer),
    Family("laguna", ("laguna",), ("moe_intermediate_size",), partial(_sparse_by_type, first_sparse=1)),
    Family("longcat_flash", ("longcat_flash",), ("expert_ffn_hidden_size", "moe_intermediate_size"), _all_layers),
    # MLA + the DSA lightning indexer (moepack/runtime/models/dsa.py), run by the DeepSeek module
    Family("deepseek", ("deepseek_v32", "glm_moe_dsa"), ("moe_intermediate_size",), _deepseek_moe_layer),
    Family("mistral_large4", ("mistral_large4", "mistral_large4_text"), ("moe_intermediate_size",),
           _deepseek_moe_layer, native=MISTRAL_NAMES),
    Family("deepseek_v4", ("deepseek_v4",), ("moe_intermediate_size",), _all_layers),
    # Llama 4 fuses experts transposed, gate and up halves: gate_up_proj [E, H, 2I], down_proj [E, I, H]
    Family("llama4", ("llama4", "llama4_text"), ("intermediate_size",), _llama4_moe_layer, FusedLayout(transposed=True)),
    Family("step3p7", ("step3p7", "step3p5"), ("moe_intermediate_size",), partial(_sparse_by_type, first_sparse=3)),
    Family("hy_v4", ("hy_v4",), ("moe_intermediate_size",), partial(_sparse_by_type, first_sparse=1), native=HY_V4_NAMES),
    # KDA linear attention (moepack/runtime/models/kda.py) mixed with NoPE MLA
    Family("kimi_linear", ("kimi_linear",), ("moe_intermediate_size",), partial(_sparse_by_type, first_sparse=1)),
    # KDA + NoPE MLA with a pooled-key DSA indexer, hyper-connections; the text model of a multimodal checkpoint
    Family("glm5_next", ("glm5_next", "glm5_next_text"), ("moe_intermediate_size",), partial(_sparse_by_type, first_sparse=3)),
    # KDA (full-rank gates) + gated MLA groups, the release's Ling names
    Family("bailing_hybrid", ("bailing_hybrid",), ("moe_intermediate_size",), partial(_sparse_by_type, first_sparse=2)),
    # GQA with a block-selecting indexer (dsa.BlockIndexer), SwiGLU-OAI experts; the text model of a multimodal
    # checkpoint (every layer MoE where the config says nothing, as transformers)
    Family("minimax_m3_vl", ("minimax_m3_vl", "minimax_m3_vl_text"), ("intermediate_size",),
           partial(_sparse_by_type, first_sparse=0)),
    # a dense MLP and a MoE in parallel in every layer; the text model of a multimodal checkpoint
    Family("gemma4", ("gemma4", "gemma4_text"), ("moe_intermediate_size",), _gemma4_moe_layer),
    # Qwen3.8-Flash-Next: Gated DeltaNet + gated attention with the QSA indexer, gated hyper-connections, n-gram
    # Per-Layer Embedding tables (streamed, ROW_TABLES); the text model of a multimodal checkpoint
    Family("qwen4_exp", ("qwen4_exp", "qwen4_exp_text"), ("moe_intermediate_size",), _qwen_moe_layer),
)
BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def supported() -> list[str]:
    return sorted(BY_MODEL_TYPE)


def family_for(cfg: dict) -> Family:
    mt = cfg.get("model_type")
    if mt not in BY_MODEL_TYPE and isinstance(cfg.get("text_config"), dict):
        mt = cfg["text_config"].get("model_type")
    fam = BY_MODEL_TYPE.get(mt)
    if fam is None:
        raise UnsupportedArchitecture(
            f"model_type {mt!r} is not supported; moepack converts and runs: {', '.join(supported())}"
        )
    return fam


def text_config(cfg: dict) -> dict:
    """The language model's config: a multimodal checkpoint's ``text_config`` over its top level (Qwen3.5-MoE
    saves ``{"model_type": "qwen3_5_moe", "text_config": {...}, "vision_config": {...}}``), else ``cfg`` itself."""
    tc = cfg.get("text_config")
    if not isinstance(tc, dict):
        return cfg
    return {**{k: v for k, v in cfg.items() if k not in ("text_config", "vision_config", "audio_config")}, **tc}


def text_name(name: str, cfg: dict | None = None) -> str:
    """A tensor's name in the text model (see TEXT_PREFIXES; a release's own names, given its config, as
    transformers names them); other names are returned unchanged."""
    fam = BY_MODEL_TYPE.get(text_config(cfg or {}).get("model_type"))
    if fam is not None and fam.native is not None:
        name = fam.native(name)
    for old, new in TEXT_PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


# A release's nested block of keys -> transformers 5's flat ones: {block: {flat key: the block's key}} (MiniMax-M3's
# ``sparse_attention_config``; its ``sparse_attention_freq`` gives ``layer_types`` and ``moe_layer_freq`` is read
# by ``_sparse_by_type``).
NESTED_KEYS: dict[str, dict[str, str]] = {
    "sparse_attention_config": {"index_n_heads": "sparse_num_index_heads", "index_head_dim": "sparse_index_dim",
                                "index_block_size": "sparse_block_size", "index_topk_blocks": "sparse_topk_blocks",
                                "index_local_blocks": "sparse_local_block"},
}


def flattened(cfg: dict) -> dict:
    """``cfg`` with the keys of its nested blocks (``NESTED_KEYS``) at the top level (a block's value wins, as
    transformers reads them); a MiniMax-M3 ``sparse_attention_freq`` (1/0 per layer) gives ``layer_types`` where
    the config has none."""
    out = dict(cfg)
    for block, keys in NESTED_KEYS.items():
        nested = cfg.get(block) or {}
        out.update({flat: nested[old] for flat, old in keys.items() if old in nested})
    freq = (cfg.get("sparse_attention_config") or {}).get("sparse_attention_freq")
    if cfg.get("layer_types") is None and freq is not None:
        out["layer_types"] = ["minimax_m3_sparse" if f else "full_attention" for f in freq]
    return out


def get(cfg: dict, key: str, default=None):
    """Read a canonical key through its aliases (see CONFIG_ALIASES)."""
    for k in CONFIG_ALIASES.get(key, (key,)):
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def rope(cfg: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either spelling; rope_theta is None when the config gives none (the family's
    default applies) and rope_scaling is None for plain RoPE.

    Old: ``rope_theta`` + ``rope_scaling={"type"|"rope_type": "yarn", ...}``.
    New: ``rope_parameters={"rope_type": ..., "rope_theta": ..., ...}``.
    """
    params = cfg.get("rope_parameters")
    scaling = cfg.get("rope_scaling")
    theta = cfg.get("rope_theta")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        scaling = params
    if scaling:
        scaling = dict(scaling)
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        scaling["rope_type"] = kind
        if kind == "default":
            scaling = None
    return (float(theta) if theta is not None else None), scaling


def rotary_dim(cfg: dict, head_dim: int, default_factor: float = 1.0) -> int:
    """Dims of each head that RoPE rotates (the first ones), from either spelling.

    New: ``rope_parameters.partial_rotary_factor``. Old: top-level ``partial_rotary_factor`` (GLM) or
    ``rotary_dim`` (MiniMax-M2). ``default_factor`` is the family's default when none is given (GLM: 0.5).
    """
    params = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
    factor = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if factor is None and cfg.get("rotary_dim") is not None:
        return int(cfg["rotary_dim"])
    return int(head_dim * (default_factor if factor is None else factor))


def num_layers(cfg: dict) -> int:
    return int(get(cfg, "num_hidden_layers"))


def moe_layers(cfg: dict) -> list[int]:
    fam = family_for(cfg)
    return [i for i in range(num_layers(cfg)) if fam.is_moe_layer(cfg, i)]


def expert_width(cfg: dict) -> int:
    fam = family_for(cfg)
    for k in fam.expert_intermediate:
        if cfg.get(k) is not None:
            return int(cfg[k])
    raise KeyError(f"config has none of {fam.expert_intermediate}")


# Bounds on config values, as data: key (through CONFIG_ALIASES) -> (kind, low, high). A key that is absent or
# null is left to the family's default; any value present must be of the kind and in range. Checked when a
# checkpoint is converted and when a pack is loaded, so a vocabulary of 10^12 or a NaN rope_theta is a clear
# error instead of an allocation failure or silent garbage.
CONFIG_BOUNDS: dict[str, tuple[str, float, float]] = {
    "num_hidden_layers": ("int", 1, 4096),
    "num_experts": ("int", 1, 1 << 16),
    "top_k": ("int", 1, 1 << 16),
    "hidden_size": ("int", 1, 1 << 24),
    "intermediate_size": ("int", 1, 1 << 24),
    "moe_intermediate_size": ("int", 1, 1 << 24),
    "vocab_size": ("int", 1, 1 << 31),
    "num_attention_heads": ("int", 1, 1 << 16),
    "num_key_value_heads": ("int", 1, 1 << 16),
    "head_dim": ("int", 0, 1 << 16),  # 0: MLA's rope dims where it has none (GLM-5.3's NoPE: head_dim = qk_rope_head_dim)
    "max_position_embeddings": ("int", 1, 1 << 40),
    "rope_theta": ("float", 0, float("inf")),
    "rms_norm_eps": ("float", 0, 1),
}


def config_problem(cfg: dict) -> str | None:
    """Why ``cfg`` (a text config) cannot describe a real model, or None: a value of the wrong kind or out of
    CONFIG_BOUNDS (floats must be finite and above the low bound), or top-k above the number of experts."""
    import math

    for key, (kind, lo, hi) in CONFIG_BOUNDS.items():
        v = get(cfg, key)
        if key == "rope_theta":
            v = cfg.get("rope_parameters", {}).get("rope_theta", v) if isinstance(cfg.get("rope_parameters"), dict) else v
        if v is None:
            continue
        if kind == "int":
            if type(v) is not int:
                return f"{key} is {str(v)[:40]}, not a whole number"
            if not lo <= v <= hi:
                return f"{key} {v} is out of range [{lo}, {hi}]"
        else:  # a float, or one per layer (Step 3.7's release spells rope_theta per layer)
            for x in (v if isinstance(v, list) and v else [v]):
                if type(x) not in (int, float) or not math.isfinite(x) or not lo < x <= hi:
                    return f"{key} is {str(v)[:40]}; it must be a finite number above {lo}" + (
                        f" and at most {hi}" if math.isfinite(hi) else "")
    k, e = get(cfg, "top_k"), get(cfg, "num_experts")
    if k is not None and e is not None and k > e:
        return f"top_k {k} is more than num_experts {e}"
    return None


def is_embedding(name: str) -> bool:
    return bool(EMBEDDING.search(name))


def is_row_table(name: str) -> bool:
    """A row-indexed table other than the input embedding (``ROW_TABLES``), streamed whatever the LM head does."""
    return any(re.search(p, name) for p in ROW_TABLES)


def table_rows_per_token(cfg: dict, name: str) -> int:
    """Rows one token reads from streamed table ``name``: one of the input embedding, one per n-gram head of a PLE
    table (``cfg`` the text config)."""
    for pattern, rows in ROW_TABLES.items():
        if re.search(pattern, name):
            return int(rows(cfg))
    return 1


def layer_of(name: str) -> int | None:
    m = LAYER_TENSOR.match(name)
    return int(m["layer"]) if m else None


def is_quantizable_dense(name: str, shape: list[int]) -> bool:
    return name.endswith(".weight") and len(shape) == 2 and not UNQUANTIZED.search(name)


# model_type -> its indexer schedule where the config spells none (transformers' HYV4Config: layer 0, then every
# fourth layer from 1, runs its indexer)
DEFAULT_INDEXER_KINDS: dict[str, Callable[[int], str]] = {
    "hy_v4": lambda i: "full" if i == 0 or (i - 1) % 4 == 0 else "shared",
}


def indexer_kinds(cfg: dict, n_layers: int) -> list[str]:
    """Per layer "full" (runs its indexer) or "shared" (reuses the last full layer's selection), from either
    spelling: ``indexer_types``; else the family's default (``DEFAULT_INDEXER_KINDS``; such a family reads nothing
    else, as transformers); else the hub's ``index_topk_pattern`` ("FSS..."); else ``index_topk_freq`` and
    ``index_skip_topk_offset`` (transformers' GlmMoeDsaConfig derivation; DeepSeek-V3.2 has none: all "full")."""
    if cfg.get("indexer_types"):
        return list(cfg["indexer_types"])
    if cfg.get("model_type") in DEFAULT_INDEXER_KINDS:
        return [DEFAULT_INDEXER_KINDS[cfg["model_type"]](i) for i in range(n_layers)]
    pattern = cfg.get("index_topk_pattern")
    if pattern is not None:
        return [{"F": "full", "S": "shared"}[c] for c in pattern] if isinstance(pattern, str) else list(pattern)
    freq, offset = max(cfg.get("index_topk_freq") or 1, 1), cfg.get("index_skip_topk_offset", 2)
    return ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(n_layers)]


def per_layer_width(cfg: dict) -> int:
    """Gemma 4's per-layer embedding (PLE) width per layer, ``hidden_size_per_layer_input`` (transformers' default 256
    where a gemma4 config does not say; 0 or null: none); 0 for every other family."""
    if cfg.get("model_type") not in ("gemma4", "gemma4_text"):
        return 0
    return int(cfg.get("hidden_size_per_layer_input", 256) or 0)


def stage_starts(cfg: dict) -> set[int] | None:
    """The layers a pipeline stage may begin at, where later layers reuse what earlier ones computed in the same
    pass (a DSA "shared" layer the last indexer's selection, a Mistral Large 4 layer another's latent KV): a stage
    must start at a layer with its own indexer that no later layer looks back past. None: any layer."""
    n = num_layers(cfg)
    if per_layer_width(cfg):  # Gemma 4's per-layer inputs are made from the embedding, which the first stage holds
        return set()
    sources = cfg.get("kv_source_layers") or list(range(n))
    dsa = cfg.get("index_topk") is not None or cfg.get("model_type") in DEFAULT_INDEXER_KINDS
    kinds = indexer_kinds(cfg, n) if dsa else ["full"] * n
    if "shared" not in kinds and sources == list(range(n)):
        return None
    return {b for b in range(n) if kinds[b] == "full" and all(s >= b for s in sources[b:])}
