"""The demo model, and synthetic checkpoints of a real architecture (Qwen3-MoE, hub spelling), made with no network.

``moepack demo`` converts and runs :data:`DEMO_MODEL`, a small Qwen3-MoE with learned weights shipped inside the
package (trained by ``tools/train_demo.py`` on Vim's help files; a toy that continues text in their style, not an
assistant); :func:`minimum_budget` picks the budget at which its experts really stream from disk.

The synthetic checkpoints (:func:`write_checkpoint`) serve the benchmarks in ``tools/`` and the tests: any size, up
to many GB, written shard by shard and never held whole in memory. Their weights are random, so their routing is
noise and their text gibberish: measure quality and caching on the demo model.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

log = logging.getLogger(__name__)

DEMO_MODEL = Path(__file__).parent / "demo_model"  # bf16 safetensors, tokenizer, config; see its TRAINING.md
DEMO_PROMPT = "To delete a word"

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = """Mixture-of-Experts models route every token to a few experts out of many. moepack keeps the dense part
of the model in memory and reads the experts a token needs from the SSD, into a fixed pool of memory.
The quick brown fox jumps over the lazy dog. Hello, world! How are you today? I am fine, thank you.
Once upon a time there was a small laptop that wanted to run a very large language model."""


@dataclass
class SyntheticSpec:
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    num_experts: int = 16
    num_experts_per_tok: int = 4
    moe_intermediate_size: int = 128
    vocab_size: int = 1024
    seed: int = 0
    # lm_head shipped quantized, as compressed-tensors int4 g32 (Kimi K2-Thinking's layout), which a pack carries
    # as it is: with an unquantized recipe the streamed embedding table then outweighs the whole resident part, as
    # the per-layer and n-gram tables of the 2026 families do (tests/test_tables.py, the bench of SPEC 3.6 tables)
    int4_head: bool = False

    def config(self) -> dict:
        """config.json in the older hub spelling (rope_theta, rope_scaling, num_experts)."""
        return {
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.moe_intermediate_size * 4,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "rope_theta": 1000000.0,
            "rope_scaling": None,
            "rms_norm_eps": 1e-6,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": False,
            "attention_bias": False,
            "bos_token_id": None,
            "eos_token_id": 2,
            "torch_dtype": "bfloat16",
        }

    @property
    def expert_params(self) -> int:
        return self.num_hidden_layers * self.num_experts * 3 * self.hidden_size * self.moe_intermediate_size


def _random_bf16(rng: np.random.Generator, shape: tuple[int, ...]) -> mx.array:
    """Random bf16 values of magnitude 2^-9..2^-3 with random sign, made from integer bits (fast for GBs)."""
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    exp = (118 + (bits >> 7) % 7).astype(np.uint16)  # biased exponent 118..124
    out = (bits & np.uint16(0x807F)) | (exp << np.uint16(7))
    return mx.array(out).view(mx.bfloat16)


ITEMSIZE = {"BF16": 2, "I32": 4}  # safetensors dtypes a synthetic checkpoint holds


def _dtype(name: str) -> str:
    """A tensor's safetensors dtype: bf16 but for an int4 head's packed words."""
    return "I32" if name.endswith(".weight_packed") else "BF16"


def _tensors(spec: SyntheticSpec):
    """(name, shape) of every tensor, in file order: embeddings, then layer by layer, then head."""
    H, I, E = spec.hidden_size, spec.moe_intermediate_size, spec.num_experts
    q, kv = spec.num_attention_heads * spec.head_dim, spec.num_key_value_heads * spec.head_dim
    yield "model.embed_tokens.weight", (spec.vocab_size, H)
    for L in range(spec.num_hidden_layers):
        p = f"model.layers.{L}."
        yield p + "input_layernorm.weight", (H,)
        yield p + "post_attention_layernorm.weight", (H,)
        yield p + "self_attn.q_proj.weight", (q, H)
        yield p + "self_attn.k_proj.weight", (kv, H)
        yield p + "self_attn.v_proj.weight", (kv, H)
        yield p + "self_attn.o_proj.weight", (H, q)
        yield p + "self_attn.q_norm.weight", (spec.head_dim,)
        yield p + "self_attn.k_norm.weight", (spec.head_dim,)
        yield p + "mlp.gate.weight", (E, H)
        for e in range(E):
            yield p + f"mlp.experts.{e}.gate_proj.weight", (I, H)
            yield p + f"mlp.experts.{e}.up_proj.weight", (I, H)
            yield p + f"mlp.experts.{e}.down_proj.weight", (H, I)
    yield "model.norm.weight", (H,)
    if spec.int4_head:  # compressed-tensors pack-quantized: words of 8 codes, a bf16 scale per 32 columns
        yield "lm_head.weight_packed", (spec.vocab_size, H // 8)
        yield "lm_head.weight_scale", (spec.vocab_size, H // 32)
    else:
        yield "lm_head.weight", (spec.vocab_size, H)


def checkpoint_bytes(spec: SyntheticSpec) -> int:
    return sum(ITEMSIZE[_dtype(name)] * int(np.prod(shape)) for name, shape in _tensors(spec))


def _tensor_bits(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The stored bits of one tensor: norms near 1 (activations keep their scale), the rest small and random; an
    int4 head's words random codes, its scales 2^-6 (weights up to 2^-3, as the float ones)."""
    if name.endswith(".weight_packed"):
        return rng.integers(np.iinfo(np.int32).min, np.iinfo(np.int32).max, size=shape, dtype=np.int32)
    if name.endswith(".weight_scale"):
        return np.full(shape, 0x3C80, np.uint16)  # bf16 2^-6
    if len(shape) == 1:
        return np.asarray(mx.array(1.0 + 0.05 * rng.standard_normal(shape).astype(np.float32))
                          .astype(mx.bfloat16).view(mx.uint16))
    return np.asarray(_random_bf16(rng, shape).view(mx.uint16))


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...]]], rng: np.random.Generator) -> None:
    """Stream one shard in the safetensors format (8-byte header length, JSON header, data), a tensor at a
    time, so writing a multi-GB checkpoint never holds more than one tensor."""
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = ITEMSIZE[_dtype(name)] * int(np.prod(shape))
        header[name] = {"dtype": _dtype(name), "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, shape in tensors:
            f.write(_tensor_bits(rng, name, shape).tobytes())
    os.replace(tmp, path)


def write_checkpoint(out: str | Path, spec: SyntheticSpec = SyntheticSpec(), shard_bytes: int = 2 << 30) -> Path:
    """Write a sharded bf16 safetensors checkpoint (hub file names and index), config.json and a small tokenizer."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards, cur, size = [], [], 0
    for name, shape in _tensors(spec):
        n = ITEMSIZE[_dtype(name)] * int(np.prod(shape))
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    shards.append(cur)
    rng = np.random.default_rng(spec.seed)
    weight_map = {}
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out / fname, tensors, rng)
        weight_map.update({name: fname for name, _ in tensors})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": checkpoint_bytes(spec)}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(spec.config(), indent=2))
    write_tokenizer(out, spec.vocab_size)
    log.info("wrote a synthetic qwen3_moe checkpoint of %.2f GB to %s", checkpoint_bytes(spec) / 1e9, out)
    return out


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer trained on a built-in paragraph, with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 600), special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS] * 4, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "bos_token": None, "pad_token": "<|endoftext|>", "chat_template": CHATML,
        "model_max_length": 4096, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [SPECIAL.index("<|im_end|>")]}))


def minimum_budget(pack: str | os.PathLike) -> int:
    """The smallest memory budget ``pack`` runs in (dense weights + one layer's top-k expert slots), the one at which
    the demo really streams experts from disk. Worked out from the manifest by the engine's own arithmetic
    (``memory_need``), at the compute dtype ``moepack.load`` would pick, without building the model."""
    from moepack.formats.reader import PackReader
    from moepack.runtime.memory import compute_dtype_for, memory_need

    reader = PackReader(pack)
    return memory_need(reader, compute_dtype_for(reader)).minimum


NEXT_STEPS = """
Next, with a real model (the demo model is a 5M-parameter toy):
  moepack convert Qwen/Qwen3-30B-A3B ~/models/qwen3-30b-a3b     # a hub repo id or a local checkpoint folder
  moepack chat ~/models/qwen3-30b-a3b                           # or: generate -p "...", serve (OpenAI API)
  moepack chat ~/models/qwen3-30b-a3b --memory-budget 8GB       # cap the memory it uses (default: 60% free)"""


def demo_generate(pack: str | os.PathLike, budget: int, prompt: str, max_tokens: int, echo) -> None:
    """Stream a continuation of ``prompt`` from ``pack`` through ``echo(text, nl)``, as ``moepack generate`` would.
    Plain text, no chat template: the demo model learned to continue documentation, not to answer."""
    import moepack
    from moepack.runtime.tokenizer import StreamDecoder, Tokenizer

    tok = Tokenizer(pack)
    ids = tok.encode(prompt)
    with moepack.load(pack, memory_budget=budget, heat=False) as engine:
        out = StreamDecoder(tok)
        echo(prompt, False)
        for t in engine.generate(ids, max_tokens, temperature=0.7, top_p=0.9, seed=0, stop_tokens=tok.eos_token_ids):
            if t in tok.eos_token_ids:
                break
            echo(out.push(t), False)
        echo(out.flush(), True)
        s = engine.stats()
        echo(f"  ({s['tokens']} tokens through the model, {s['reads']} expert reads from disk into "
             f"{s['slots']} slots)", True)
