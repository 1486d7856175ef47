"""Quantized release encodings: FP8 blocks (DeepSeek-V3, Kimi K2), compressed-tensors INT4 (Kimi K2-Thinking,
K2.5) and MXFP4 (gpt-oss).

Checkpoints are quantized here from real tensors exactly as the releases lay them out. Lossless paths must be
bit-exact, decoded ones within the encoding's bound, and converted models must match transformers run on the same
(decoded) weights: logits NMSE < 1e-5 and the same 8 greedy tokens.

Bounds (documented in README "Quantized releases"):
- FP8 e4m3 blocks decode bit-identically to torch's float8_e4m3fn cast times the block scale; against the tensor
  that was quantized, |w' - w| <= 2^-4 |w| + 2^-10 s (half an e4m3 step; s the block's scale).
- MXFP4 requantized to affine (``requantize``): within one step (the stored scale) of the MXFP4 values.
  Not half a step: MLX's affine quantizer moves its grid off plain [min, max] rounding (measured: up to 1.0 step).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from checkpoints import COMMON, TINY, build, randomize, reference_greedy, reference_logits, to_old_spelling
from click.testing import CliRunner
from parity import EXACT, PROMPT, nmse
from safetensors.torch import load_file
from safetensors.torch import save_file as save_torch

import moepack
from moepack.cli import main as cli
from moepack.convert import encodings
from moepack.convert.encodings import E2M1
from moepack.convert.pipeline import convert
from moepack.convert.recipe import Recipe
from moepack.convert.source import Checkpoint
from moepack.formats.reader import PackReader

# ---- quantizers: float tensors -> the bytes each release ships ------------------------------------------


def to_fp8_blocks(w: torch.Tensor, block=(128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's layout: per block (edge blocks padded) scale = amax / 448, codes = e4m3(w / scale);
    ``weight_scale_inv`` is that scale (the factor that dequantizes)."""
    (R, C), (bo, bi) = w.shape, block
    so, si = -(-R // bo), -(-C // bi)
    padded = torch.zeros(so * bo, si * bi)
    padded[:R, :C] = w
    blocks = padded.reshape(so, bo, si, bi)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    codes = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).reshape(so * bo, si * bi)[:R, :C]
    return codes.contiguous(), scale.float()


def fp8_reference(codes: torch.Tensor, scale: torch.Tensor, block=(128, 128)) -> torch.Tensor:
    """torch's own float8 decode times the block scale (the oracle for our 256-entry table)."""
    R, C = codes.shape
    return codes.float() * scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:R, :C]


def to_pack_quantized(w: torch.Tensor, group: int = 32, force_range: bool = False):
    """compressed-tensors pack-quantized, symmetric 4-bit: bf16 scale per group, q in [-8, 7], word j of a row
    holding elements 8j..8j+7 as q+8 at bits 4i. Returns (weight_packed int32, weight_scale bf16, q int8)."""
    R, C = w.shape
    g = w.reshape(R, C // group, group)
    s = (g.abs().amax(-1) / 7.5).to(torch.bfloat16)
    q = torch.clamp(torch.round(g / s.float()[..., None]), -8, 7).to(torch.int8)
    if force_range:  # every group spans [-8, 7], so MLX's own min/max quantization picks the same scale and codes
        q[..., 0], q[..., 1] = -8, 7
    q = q.reshape(R, C)
    codes = (q.numpy().astype(np.int64) + 8).astype(np.uint32).reshape(R, C // 8, 8)
    words = np.bitwise_or.reduce(codes << (4 * np.arange(8, dtype=np.uint32)), axis=-1).astype(np.uint32)
    return torch.from_numpy(words.view(np.int32)), s, q


def to_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OCP MXFP4 as gpt-oss ships it: [..., R, C] -> blocks uint8 [..., R, C/32, 16] (element 2k in the low nibble
    of byte k), scales uint8 [..., R, C/32] = 127 + floor(log2(amax)) - 2."""
    g = w.reshape(*w.shape[:-1], -1, 32)
    amax = g.abs().amax(-1)
    e = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp(min=1e-30))) - 2, torch.tensor(-127.0)).clamp(-127, 127)
    x = g / torch.exp2(e)[..., None]
    codes = (x[..., None] - torch.from_numpy(E2M1)).abs().argmin(-1).to(torch.uint8)  # nearest e2m1 value
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (e + 127).to(torch.uint8)


def assert_matches(pack: Path, want: np.ndarray, greedy: list[int]) -> None:
    """The pack's logits within NMSE 1e-5 of ``want`` and its 8 greedy tokens ``greedy``."""
    eng = moepack.load(pack)
    got = eng.logits(PROMPT)
    assert nmse(got, want) < 1e-5, nmse(got, want)
    assert list(eng.generate(PROMPT, 8)) == greedy


def _checkpoint(path: Path, tensors: dict, config: dict | None = None) -> Checkpoint:
    path.mkdir(parents=True, exist_ok=True)
    save_torch(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config or {"model_type": "deepseek_v3"}))
    return Checkpoint(path)


def _inspect(pack: Path) -> str:
    res = CliRunner().invoke(cli, ["inspect", str(pack)])
    assert res.exit_code == 0, res.output
    return res.output


# ---- encodings, tensor by tensor ------------------------------------------------------------------------


def test_from_fp8_is_torchs_float8():
    """The FP8 decode (``mx.from_fp8``) is bit-identical to torch's float8_e4m3fn cast on all 256 codes."""
    want = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    got = np.array(mx.from_fp8(mx.arange(256, dtype=mx.uint8), dtype=mx.float32))
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), want.view(np.uint32))  # -0.0, NaNs too


def test_fp8_blocks_decode_exactly_and_within_e4m3_bound(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(300, 320) * torch.logspace(-3, 1, 320)  # edges padded on both axes; wide dynamic range
    codes, scale = to_fp8_blocks(w)
    ckpt = _checkpoint(tmp_path, {"l.weight": codes, "l.weight_scale_inv": scale})
    t = encodings.logical_tensors(ckpt)["l.weight"]
    assert t.shape == (300, 320) and t.dtype == "fp8-e4m3-block128x128" and scale.shape == (3, 3)
    q = encodings.read(ckpt, t)
    got = np.array(q.decode())
    assert np.array_equal(got, fp8_reference(codes, scale).numpy())  # bit-identical to torch's decode
    s = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :320].numpy()
    err = np.abs(got - w.numpy())
    assert (err <= 2.0**-4 * np.abs(w.numpy()) + 2.0**-10 * s).all(), err.max()
    # a row range that starts and ends inside blocks decodes as the same rows of the whole
    part = encodings.read(ckpt, t, rows=slice(100, 260))
    assert np.array_equal(np.array(part.decode()), got[100:260])
    # no pack encoding holds it exactly: the recipe requantizes (or, unquantized, dequantizes) it
    assert q.repack("bfloat16") is None
    assert Recipe().encode_source("l.weight", q, expert=False).carried == "requantized"
    assert Recipe(quantize=False).encode_source("l.weight", q, expert=False).carried == "dequantized"


def test_int4_pack_quantized_repacks_bit_exactly(tmp_path):
    torch.manual_seed(1)
    w = torch.randn(64, 256)
    packed, s, q = to_pack_quantized(w)
    ckpt = _checkpoint(tmp_path, {"e.weight_packed": packed, "e.weight_scale": s,
                                  "e.weight_shape": torch.tensor([64, 256])})
    tensors = encodings.logical_tensors(ckpt)
    assert list(tensors) == ["e.weight"]
    t = tensors["e.weight"]
    assert t.dtype == "int4-pack-quantized-g32" and t.shape == (64, 256)
    qt = encodings.read(ckpt, t)
    exact = q.float() * s.float().repeat_interleave(32, 1)  # what the release means, in float32
    assert np.array_equal(np.array(qt.decode()), exact.numpy())

    e = Recipe().encode_source("gate", qt, expert=True)  # the default recipe (4-bit g64) does not requantize it
    assert (e.encoding, e.bits, e.group_size, e.dtype, e.carried) == ("affine", 4, 32, "bfloat16", "lossless")
    assert np.array_equal(np.array(e.parts["weight"]).view(np.int32), packed.numpy())  # the words, unchanged
    assert np.array_equal(np.array(e.parts["scales"].view(mx.uint16)), s.view(torch.uint16).numpy())
    assert np.array_equal(np.array(e.parts["biases"].astype(mx.float32)), -8 * s.float().numpy())
    # the pack's values (SPEC 4.2: q * scale + bias in float32, as the CPU runtime computes) are exactly q * s
    f32 = {k: v.astype(mx.float32) for k, v in e.parts.items() if k != "weight"}
    deq = mx.dequantize(e.parts["weight"], f32["scales"], f32["biases"], group_size=32, bits=4)
    assert np.array_equal(np.array(deq), exact.numpy())
    # scales widen to a float32 recipe exactly; a float16 recipe cannot hold every bf16 scale, so they stay bf16
    assert Recipe(dtype="float32").encode_source("gate", qt, True).dtype == "float32"
    assert Recipe(dtype="float16").encode_source("gate", qt, True).dtype == "bfloat16"
    assert Recipe(requantize=True).encode_source("gate", qt, True)[2:4] == (4, 64)  # recipe's 4-bit g64


def test_int4_words_are_mlx_affine_packing(tmp_path):
    # Where every group spans the whole code range, MLX's own quantization of the decoded tensor picks scale s and
    # bias -8s, so its packed words must equal the release's: the bit layouts agree, independently of our decoder.
    torch.manual_seed(2)
    packed, s, q = to_pack_quantized(torch.randn(16, 128), force_range=True)
    ckpt = _checkpoint(tmp_path, {"e.weight_packed": packed, "e.weight_scale": s,
                                  "e.weight_shape": torch.tensor([16, 128])})
    e = Recipe(dtype="float32").encode_source("gate", encodings.read(ckpt, encodings.logical_tensors(ckpt)["e.weight"]), True)
    exact = mx.array((q.float() * s.float().repeat_interleave(32, 1)).numpy())
    wq, scales, biases = mx.quantize(exact, group_size=32, bits=4)
    assert np.array_equal(np.array(wq), np.array(e.parts["weight"]))
    np.testing.assert_allclose(np.array(scales), np.array(e.parts["scales"]), rtol=1e-6)


def test_asymmetric_pack_quantized_is_refused(tmp_path):
    packed, s, _ = to_pack_quantized(torch.randn(8, 64))
    ckpt = _checkpoint(tmp_path, {"e.weight_packed": packed, "e.weight_scale": s,
                                  "e.weight_zero_point": torch.zeros(1, 2, dtype=torch.int32)})
    with pytest.raises(moepack.errors.SourceError, match="asymmetric"):
        encodings.logical_tensors(ckpt)


def _gpt_oss_like(tmp_path):
    torch.manual_seed(3)
    w = torch.randn(2, 64, 128) * torch.logspace(-2, 1, 64)[:, None]  # [E, 2I, H] with interleaved gate/up rows
    blocks, scales = to_mxfp4(w)
    ckpt = _checkpoint(tmp_path, {"x.experts.gate_up_proj_blocks": blocks, "x.experts.gate_up_proj_scales": scales})
    return ckpt, encodings.logical_tensors(ckpt)["x.experts.gate_up_proj"], blocks, scales


def test_mxfp4_repacks_bit_exactly(tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    ckpt, t, blocks, scales = _gpt_oss_like(tmp_path)
    assert t.shape == (2, 64, 128) and t.dtype == "mxfp4"
    # transformers' own MXFP4 decode (which also transposes to gpt-oss's [E, in, out]) is the oracle
    want = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).transpose(1, 2).numpy()
    q = encodings.read(ckpt, t, index=1)
    assert np.array_equal(np.array(q.decode()), want[1])
    e = Recipe().encode_source("gate", q, expert=True)
    assert (e.encoding, e.bits, e.group_size, e.carried) == ("mxfp4", 4, 32, "lossless")
    assert np.array(e.parts["weight"]).tobytes() == blocks[1].numpy().tobytes()
    assert np.array(e.parts["scales"]).tobytes() == scales[1].numpy().tobytes()
    deq = mx.dequantize(e.parts["weight"], e.parts["scales"], group_size=32, bits=4, mode="mxfp4", dtype=mx.float32)
    assert np.array_equal(np.array(deq), want[1])
    # gpt-oss interleaves gate and up rows: a strided row read is those rows of the whole
    gate = encodings.read(ckpt, t, index=1, rows=slice(0, 64, 2))
    assert np.array_equal(np.array(gate.decode()), want[1][0::2])


def test_mxfp4_requantized_within_one_step(tmp_path):
    ckpt, t, *_ = _gpt_oss_like(tmp_path)
    q = encodings.read(ckpt, t, index=0)
    e = Recipe(expert_group_size=32, requantize=True).encode_source("gate", q, expert=True)
    assert (e.encoding, e.carried) == ("affine", "requantized")
    f32 = {k: v.astype(mx.float32) for k, v in e.parts.items() if k != "weight"}
    got = np.array(mx.dequantize(e.parts["weight"], f32["scales"], f32["biases"], group_size=32, bits=4))
    step = np.abs(np.repeat(np.array(f32["scales"]), 32, axis=-1))
    err = np.abs(got - np.array(q.decode()))
    assert (err <= step).all(), (err / step).max()  # one step of the stored scale (see the module docstring)


# ---- whole releases through convert, compared with transformers on the decoded weights ------------------

FP8_SKIP = ("embed_tokens", "lm_head", "norm", "mlp.gate.weight")  # DeepSeek-V3 keeps these in bf16


def test_deepseek_v3_fp8_release(tmp_path):
    src = build("deepseek_v3", tmp_path / "float")
    cfg = json.loads((src / "config.json").read_text())
    block = (32, 32)  # DeepSeek uses 128; smaller blocks give these tiny matrices several, with padded edges
    release, decoded = {}, {}
    for name, w in load_file(src / "model.safetensors").items():
        if name.endswith(".weight") and w.ndim == 2 and not any(k in name for k in FP8_SKIP):
            codes, scale = to_fp8_blocks(w, block)
            release[name], release[name + "_scale_inv"] = codes, scale
            decoded[name] = fp8_reference(codes, scale, block)
        else:
            release[name] = decoded[name] = w
    rel, ref = tmp_path / "release", tmp_path / "decoded"
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}
    _checkpoint(rel, release, {**cfg, "quantization_config": qc})
    _checkpoint(ref, decoded, cfg)
    want, model = reference_logits(ref, PROMPT)

    pack = convert(str(rel), tmp_path / "pack", EXACT, progress=False)
    assert_matches(pack, want, reference_greedy(model, PROMPT, 8))
    r = PackReader(pack)
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"  # [40, 64]: a padded edge block
    assert (r.manifest.dense[name].source_encoding, r.manifest.dense[name].carried) == ("fp8-e4m3-block32x32", "dequantized")
    assert np.array_equal(np.array(r.dense_tensor(name)), decoded[name].numpy())
    assert np.array_equal(np.array(r.expert_tensor(1, 3, "down")), decoded["model.layers.1.mlp.experts.3.down_proj.weight"].numpy())
    assert "(from fp8-e4m3-block32x32, dequantized)" in _inspect(pack)

    quant = convert(str(rel), tmp_path / "quant", Recipe(), progress=False)  # the default recipe requantizes
    out = _inspect(quant)
    assert "affine4/g64 bfloat16 (from fp8-e4m3-block32x32, requantized)" in out
    assert "raw bfloat16 (from float32)" in out  # norms, router: untouched float tensors carry no "carried"


def _kimi_k25() -> transformers.PreTrainedModel:
    *_, kw = TINY["deepseek_v3"]
    cfg = transformers.Kimi_K25Config(
        text_config={"model_type": "deepseek_v3", **COMMON, **kw},
        vision_config=dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                           pos_emb_height=4, pos_emb_width=4, pos_emb_time=2),
        projection_hidden_size=32, tie_word_embeddings=False)
    torch.manual_seed(0)
    return randomize(transformers.Kimi_K25ForConditionalGeneration(cfg).eval())


# transformers' module names -> Kimi K2.5's on the hub
K25_NAMES = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
             ("model.vision_tower.", "vision_tower."), ("model.mm_projector.", "mm_projector."))


def test_kimi_k25_int4_release(tmp_path):
    model = _kimi_k25()
    text = model.config.text_config
    I = text.moe_intermediate_size
    release, exact = {}, {}
    with torch.no_grad():
        for name, p in model.state_dict().items():  # parameters and saved buffers (e_score_correction_bias)
            hub = next(new + name[len(old):] for old, new in K25_NAMES if name.startswith(old))
            if not hub.endswith(("experts.gate_up_proj", "experts.down_proj")):
                release[hub] = p.detach().clone()
                continue
            # routed experts ship per expert, INT4 pack-quantized, group 32; the model gets exactly their values
            for e in range(p.shape[0]):
                ws = {"gate_proj": p[e, :I], "up_proj": p[e, I:]} if hub.endswith("gate_up_proj") else {"down_proj": p[e]}
                for proj, w in ws.items():
                    packed, s, q = to_pack_quantized(w)
                    base = hub.replace("experts.gate_up_proj", f"experts.{e}.{proj}").replace(
                        "experts.down_proj", f"experts.{e}.{proj}")
                    release.update({base + ".weight_packed": packed, base + ".weight_scale": s,
                                    base + ".weight_shape": torch.tensor(list(w.shape))})
                    exact[base] = q.float() * s.float().repeat_interleave(32, 1)
                    w.copy_(exact[base])
    want = model(torch.tensor([PROMPT])).logits[0].detach().numpy()
    greedy = reference_greedy(model, PROMPT, 8)

    tc = to_old_spelling(text.to_dict())
    tc.update(model_type="kimi_k2", tie_word_embeddings=False)
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
              "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}}},
          "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|down)_proj.*"]}
    cfg = {"model_type": "kimi_k25", "architectures": ["KimiK25ForConditionalGeneration"], "text_config": tc,
           "vision_config": model.config.vision_config.to_dict(), "quantization_config": qc}
    src = tmp_path / "k25"
    _checkpoint(src, release, cfg)

    pack = convert(str(src), tmp_path / "pack", EXACT, progress=False)
    r = PackReader(pack)
    assert r.manifest.architecture["family"] == "deepseek"
    assert not [n for n in r.manifest.dense if not n.startswith(("model.", "lm_head."))]  # text model, its own names
    gate = r.expert_layout(1).tensors["gate"]
    assert (gate.encoding, gate.bits, gate.group_size, gate.dtype, gate.source_encoding, gate.carried) == \
        ("affine", 4, 32, "float32", "int4-pack-quantized-g32", "lossless")
    assert np.array_equal(np.array(r.expert_tensor(2, 5, "up")), exact["language_model.model.layers.2.mlp.experts.5.up_proj"].numpy())

    assert_matches(pack, want, greedy)
    assert "affine4/g32 float32 (from int4-pack-quantized-g32, lossless)" in _inspect(pack)

    res = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "rq"), "--requantize"])  # decode, recipe
    assert res.exit_code == 0, res.output
    gate = PackReader(tmp_path / "rq").expert_layout(1).tensors["gate"]
    assert (gate.bits, gate.group_size, gate.carried) == (4, 64, "requantized")


def test_gpt_oss_mxfp4_release(tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    src = build("gpt_oss", tmp_path / "float", fused=True)
    release, decoded = {}, {}
    for name, w in load_file(src / "model.safetensors").items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            # gpt-oss ships [E, out, in/32, 16] blocks of its [E, in, out] parameters
            blocks, scales = to_mxfp4(w.transpose(1, 2).contiguous())
            release[name + "_blocks"], release[name + "_scales"] = blocks, scales
            decoded[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # transformers' decode
        else:
            release[name] = decoded[name] = w
    cfg = json.loads((src / "config.json").read_text())
    rel, ref = tmp_path / "release", tmp_path / "decoded"
    _checkpoint(rel, release, {**cfg, "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}})
    _checkpoint(ref, decoded, cfg)
    want, model = reference_logits(ref, PROMPT)

    pack = convert(str(rel), tmp_path / "pack", EXACT, progress=False)
    lay = PackReader(pack).expert_layout(0)
    assert {(p, t.encoding, t.carried) for p, t in lay.tensors.items() if not p.endswith("_bias")} == \
        {(p, "mxfp4", "lossless") for p in ("gate", "up", "down")}
    assert_matches(pack, want, reference_greedy(model, PROMPT, 8))
    assert "mxfp4 float32 (from mxfp4, lossless)" in _inspect(pack)
