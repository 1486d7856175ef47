"""The converter against its sources: every tensor of every family comes back from the pack as the source wrote it.

Oracles are independent of the converter: tensors are read from the checkpoint with safetensors' torch loader,
experts are cut out of fused tensors by hand, quantization is ``mx.quantize`` itself, hashes are blake3 of the
files, and which tensors stay unquantized is spelled out here rather than taken from ``moepack.arch``.
Fault handling (verify, resume, bad sources, full disk) is in test_convert_faults.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import blake3
import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import build
from moepack.convert import units
from moepack.convert.pipeline import convert
from moepack.convert.recipe import Recipe
from moepack.formats.reader import PackReader

EXACT = Recipe(quantize=False, dtype="float32")
QUANT = Recipe(expert_group_size=32, dense_group_size=32)  # bfloat16, 4-bit experts, 8-bit dense
QUANT_ALT = Recipe(dtype="float16", expert_bits=3, expert_group_size=32, dense_bits=6, dense_group_size=32,
                   alignment=4096)
MX_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}

# Side files a user needs next to the weights; the tiny builds have no tokenizer, so fake ones are added.
SIDE = {"tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"}}', "tokenizer_config.json": '{"x": 1}',
        "chat_template.jinja": "{% for m in messages %}{{ m.content }}{% endfor %}"}
FAMILY = {"mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe", "olmoe": "olmoe",
          "deepseek_v2": "deepseek", "deepseek_v3": "deepseek", "glm4_moe": "glm4_moe", "minimax_m2": "minimax_m2"}

# The oracle's own reading of expert tensor names (per-expert hub names and transformers 5 fused names).
PER_EXPERT = re.compile(r"layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
FUSED = re.compile(r"layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(gate_up_proj|down_proj)$")
PROJ = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
# Must stay raw under any recipe: norms, routers, the shared-expert gate, biases, correction biases (all of them
# 1-D except routers and the shared-expert gate, which are matrices the runtime needs in full precision).
KEEP_RAW = re.compile(r"norm|\.gate\.weight$|shared_expert_gate\.weight$|\.bias$|e_score_correction_bias$")


@dataclass(frozen=True)
class Case:
    kind: str
    fused: bool = False
    old_spelling: bool = False
    bf16: bool = False  # source stored in bfloat16

    @property
    def id(self) -> str:
        return self.kind + "-fused" * self.fused + "-old" * self.old_spelling + "-bf16" * self.bf16


CASES = [Case(k) for k in FAMILY] + [
    Case("mixtral", fused=True),
    Case("qwen3_moe", fused=True),
    Case("deepseek_v3", fused=True, bf16=True),
    Case("minimax_m2", fused=True),
    Case("qwen3_moe", old_spelling=True),
    Case("glm4_moe", fused=True, old_spelling=True),
]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.id)
def case(request, tmp_path_factory):
    c: Case = request.param
    src = build(c.kind, tmp_path_factory.mktemp(c.id), fused=c.fused, old_spelling=c.old_spelling,
                dtype=torch.bfloat16 if c.bf16 else torch.float32)
    for name, text in SIDE.items():
        (src / name).write_text(text)
    return c, src


# ---------------------------------------------------------------------------------------------
# oracle helpers (also used by test_convert_faults.py)


def source_tensors(src: Path) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint as float32 numpy (exact for f32/bf16/f16 sources)."""
    out = {}
    for f in sorted(src.glob("*.safetensors")):
        out.update({k: v.float().numpy() for k, v in load_file(f).items()})
    return out


def split_experts(tensors: dict[str, np.ndarray]) -> tuple[dict[tuple[int, int, str], np.ndarray], dict[str, np.ndarray]]:
    """(experts[(layer, expert, proj)], everything else), cutting fused [E, 2I, H] gate_up into gate rows then up rows."""
    experts, rest = {}, {}
    for name, w in tensors.items():
        if m := PER_EXPERT.search(name):
            experts[(int(m[1]), int(m[2]), PROJ[m[3]])] = w
        elif m := FUSED.search(name):
            for e in range(w.shape[0]):
                if m[2] == "down_proj":
                    experts[(int(m[1]), e, "down")] = w[e]
                else:
                    half = w.shape[1] // 2
                    experts[(int(m[1]), e, "gate")], experts[(int(m[1]), e, "up")] = w[e, :half], w[e, half:]
        else:
            rest[name] = w
    return experts, rest


def layer_index(name: str) -> int | None:
    m = re.search(r"layers\.(\d+)\.", name)
    return int(m[1]) if m else None


def raw_bytes(a: mx.array) -> bytes:
    return np.asarray(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a).tobytes()


def expected_parts(w: np.ndarray, dtype: str, bits: int | None, group_size: int | None) -> dict[str, mx.array]:
    a = mx.array(w).astype(MX_DTYPES[dtype])
    if bits is None:
        return {"data": a}
    wq, scales, biases = mx.quantize(a, group_size=group_size, bits=bits)
    return {"weight": wq, "scales": scales, "biases": biases}


def dense_value(parts: dict[str, mx.array], bits: int | None, group_size: int | None) -> mx.array:
    if bits is None:
        return parts["data"]
    return mx.dequantize(parts["weight"], parts["scales"], parts["biases"], group_size=group_size, bits=bits)


def assert_same(got: mx.array, want: mx.array, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype}{got.shape} != {want.dtype}{want.shape}"
    assert raw_bytes(got) == raw_bytes(want), f"{what}: values differ"


def blake3_of(path: Path) -> str:
    return blake3.blake3(path.read_bytes()).hexdigest()


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes), for byte-identity comparisons of whole packs."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def reshard(src: Path, n: int, extra: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Rewrite a one-file checkpoint as ``n`` shards plus model.safetensors.index.json (``extra`` goes in the last)."""
    tensors = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for i, shard in enumerate(shards):
        part = {k: tensors[k] for k in names[i::n]}
        if i == n - 1:
            part.update(extra or {})
        save_file(part, src / shard, metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return shards


def check_pack(pack: Path, src: Path, recipe: Recipe) -> PackReader:
    """Every tensor, encoding, offset, hash and side file of ``pack`` against the source checkpoint ``src``."""
    r = PackReader(pack)
    m = r.manifest
    cfg = json.loads((src / "config.json").read_text())
    n_layers = cfg["num_hidden_layers"]
    tensors = {k: v for k, v in source_tensors(src).items() if (layer_index(k) or 0) < n_layers}  # MTP dropped
    experts, dense = split_experts(tensors)
    moe_layers = sorted({L for L, _, _ in experts})
    n_experts = max(e for _, e, _ in experts) + 1
    align = recipe.alignment
    dt = recipe.dtype

    # dense tensors: which are quantized, and their stored bytes and values; the input embedding is a streamed
    # table (SPEC 3.6), encoded as the dense recipe would encode it, where the head has weights of its own
    assert set(m.dense) | set(m.tables) == set(dense) and not set(m.dense) & set(m.tables)
    head = not cfg.get("tie_word_embeddings") and "lm_head.weight" in dense
    assert set(m.tables) == ({"model.embed_tokens.weight"} if head and recipe.stream_tables else set())

    def stored(name: str, blob) -> bytes:
        if name not in m.tables:
            return (pack / blob.file).read_bytes()[blob.offset : blob.offset + blob.length]
        t, data = m.tables[name], (pack / m.tables[name].file).read_bytes()
        return b"".join(data[t.row_offset(i) + blob.offset :][: blob.length] for i in range(t.rows))

    for name, w in dense.items():
        rec = m.dense[name] if name in m.dense else m.tables[name].row
        # affine needs whole groups per row: qwen2_moe's shared expert (width 48) stays raw at group size 32
        quantized = recipe.quantize and w.ndim == 2 and not KEEP_RAW.search(name) and w.shape[1] % recipe.dense_group_size == 0
        bits, gs = (recipe.dense_bits, recipe.dense_group_size) if quantized else (None, None)
        assert rec.encoding == ("affine" if quantized else "raw"), name
        shape = m.tables[name].shape if name in m.tables else rec.shape
        assert (rec.bits, rec.group_size, rec.dtype, shape) == (bits, gs, dt, list(w.shape)), name
        want = expected_parts(w, dt, bits, gs)
        assert set(rec.parts) == set(want), name
        for part, blob in rec.parts.items():
            assert stored(name, blob) == raw_bytes(want[part]), f"{name}.{part}: stored bytes differ from mx.quantize's"
            assert blob.offset % 64 == 0
        value = r.table_rows(name, list(range(w.shape[0]))) if name in m.tables else r.dense_tensor(name)
        assert_same(value, dense_value(want, bits, gs), name)
    if recipe.quantize:  # the rule above must not be vacuous
        assert m.dense["lm_head.weight"].encoding == "affine"
        assert any(".self_attn." in n and m.dense[n].encoding == "affine" for n in m.dense)

    # routed experts: one file per (layer, expert), every projection on an aligned boundary
    assert r.moe_layers == moe_layers
    for L in moe_layers:
        layout = r.expert_layout(L)
        assert set(layout.tensors) == {"gate", "up", "down"}
        assert layout.length % align == 0
        for proj, rec in layout.tensors.items():
            assert min(b.offset for b in rec.parts.values()) % align == 0, f"layer {L} {proj} segment not aligned"
        for e in range(n_experts):
            path = r.expert_file(L, e)
            data = path.read_bytes()
            assert len(data) == layout.length == m.files[str(path.relative_to(pack))]["length"]
            for proj, rec in layout.tensors.items():
                w = experts[(L, e, proj)]
                bits, gs = (recipe.expert_bits, recipe.expert_group_size) if recipe.quantize else (None, None)
                assert rec.encoding == ("affine" if bits else "raw") and (rec.bits, rec.group_size) == (bits, gs)
                assert rec.shape == list(w.shape) and rec.dtype == dt
                want = expected_parts(w, dt, bits, gs)
                for part, blob in rec.parts.items():
                    assert data[blob.offset : blob.offset + blob.length] == raw_bytes(want[part]), (L, e, proj, part)
                assert_same(r.expert_tensor(L, e, proj), dense_value(want, bits, gs), f"layer {L} expert {e} {proj}")

    # manifest: architecture, recipe, provenance, and a hash of every file (nothing else left in the directory)
    kind = cfg["model_type"]
    assert m.format == "moepack" and m.format_version == (2 if m.tables else 1)
    a = m.architecture
    assert a["family"] == FAMILY[kind] and a["model_type"] == kind
    assert a["moe_layers"] == moe_layers and a["num_layers"] == n_layers
    assert a["num_experts"] == n_experts and a["top_k"] == cfg["num_experts_per_tok"]
    assert a["hidden_size"] == cfg["hidden_size"] == tensors["model.norm.weight"].shape[0]
    assert a["expert_width"] == experts[(moe_layers[0], 0, "gate")].shape[0]
    assert a["vocab_size"] == cfg["vocab_size"]
    assert m.recipe == recipe.to_json() and m.alignment == align
    assert m.provenance["source"] == str(src.resolve())
    source_files = sorted(p.name for p in src.glob("*.safetensors*"))
    assert m.provenance["source_files"] == {
        f: {"size": (src / f).stat().st_size, "blake3": blake3_of(src / f)} for f in source_files
    }
    on_disk = {str(p.relative_to(pack)) for p in pack.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(m.files) == on_disk
    for rel, info in m.files.items():
        assert info == {"length": (pack / rel).stat().st_size, "blake3": blake3_of(pack / rel)}, rel
        if rel.startswith(("dense/", "experts/")):
            assert info["length"] % align == 0, rel
    for side in ["config.json", "generation_config.json", *(n for n in SIDE if (src / n).exists())]:
        assert (pack / side).read_bytes() == (src / side).read_bytes(), side
    assert r.verify().ok
    return r


# ---------------------------------------------------------------------------------------------
# tests


def test_exact(case, tmp_path):
    """Unquantized float32: every tensor read back is bit-identical to the source."""
    c, src = case
    check_pack(convert(str(src), tmp_path / "pack", EXACT, progress=False), src, EXACT)


def test_quantized(case, tmp_path):
    """Quantized: stored bytes are mx.quantize's, raw tensors are the source cast to the recipe dtype."""
    c, src = case
    recipe = QUANT_ALT if c.fused else QUANT
    check_pack(convert(str(src), tmp_path / "pack", recipe, progress=False), src, recipe)


def test_mtp_layers_dropped(tmp_path):
    """Tensors of layers >= num_hidden_layers (DeepSeek-V3's multi-token-prediction layer) are left out."""
    src = build("deepseek_v3", tmp_path / "ckpt")
    n = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    g = torch.Generator().manual_seed(1)
    mtp = {f"model.layers.{n}.{k}": torch.randn(*shape, generator=g) for k, shape in {
        "enorm.weight": (64,), "hnorm.weight": (64,), "eh_proj.weight": (64, 128),
        "self_attn.q_a_proj.weight": (32, 64), "mlp.gate.weight": (8, 64), "mlp.gate.e_score_correction_bias": (8,),
        **{f"mlp.experts.{e}.{p}.weight": (32, 64) if p != "down_proj" else (64, 32)
           for e in range(8) for p in ("gate_proj", "up_proj", "down_proj")},
        "shared_head.head.weight": (256, 64), "shared_head.norm.weight": (64,),
    }.items()}
    reshard(src, 2, extra=mtp)  # the MTP layer sits in the last shard, as on the hub
    pack = convert(str(src), tmp_path / "pack", EXACT, progress=False)
    r = check_pack(pack, src, EXACT)
    assert not [k for k in r.manifest.dense if layer_index(k) is not None and layer_index(k) >= n]
    assert r.moe_layers == [1, 2] and r.manifest.architecture["num_layers"] == n
    assert set(r.manifest.provenance["source_files"]) == {
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"}


def test_dense_split_into_shards(tmp_path, monkeypatch):
    """Dense tensors spread over several dense files when they exceed the shard size, and still read back exactly."""
    monkeypatch.setattr(units, "DENSE_SHARD_BYTES", 40_000)  # embed_tokens alone is 64 KiB
    src = build("qwen2_moe", tmp_path / "ckpt")
    r = check_pack(convert(str(src), tmp_path / "pack", EXACT, progress=False), src, EXACT)
    assert len({b.file for rec in r.manifest.dense.values() for b in rec.parts.values()}) > 2
