"""DeepSeek V4: parity of the converted pack with transformers (transformers' names fused and per expert, the hub
release's names, both config spellings), every feature of the tiny config acting on the prompt, cached decoding
equal to a full forward pass, selection independent of the query blocks, and hash-routed experts read early and
exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from checkpoints import build, make_model
from parity import EXACT, PROMPT, check_parity
from safetensors.torch import load_file, save_file

import moepack
from moepack.convert.pipeline import convert
from moepack.runtime.models import attention, compressed


@pytest.mark.parametrize("fused,old", [(False, False), (True, False), (False, True)])
def test_deepseek_v4_parity(tmp_path, fused, old):
    check_parity("deepseek_v4", tmp_path, fused=fused, old_spelling=old)


# transformers' names -> the hub release's (what transformers' conversion mapping reads back)
RELEASE = (("model.", ""), ("embed_tokens.", "embed."), ("hc_head.hc_", "hc_head_"), (".attn.norm.", ".attn.kv_norm."))


def test_deepseek_v4_release_layout(tmp_path):
    """The release's layout: no ``model.`` prefix, ``embed``/``head``/``hc_head_fn``, ``layers.N.attn.wq_a``,
    ``ffn.experts.E.w1``, ``ffn.gate.tid2eid``, the legacy config, and an MTP layer (dropped)."""
    ckpt = build("deepseek_v4", tmp_path / "hf", old_spelling=True)
    tensors = {}
    for name, t in load_file(ckpt / "model.safetensors").items():
        for old, new in RELEASE:
            name = name.replace(old, new, 1) if old == "model." else name.replace(old, new)
        tensors[name] = t
    assert {"embed.weight", "head.weight", "norm.weight", "hc_head_fn", "layers.0.ffn.gate.tid2eid",
            "layers.1.attn.indexer.compressor.wkv.weight", "layers.2.ffn.experts.7.w2.weight"} <= set(tensors)
    tensors["mtp.0.attn.wq_a.weight"] = torch.randn(32, 64)
    tensors["mtp.0.ffn.experts.0.w1.weight"] = torch.randn(32, 64)
    out = tmp_path / "ckpt"
    out.mkdir()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text((ckpt / "config.json").read_text())
    check_parity("deepseek_v4", tmp_path, ckpt=out)


@pytest.mark.parametrize("override", [
    {"index_topk": 64},  # every closed CSA entry instead of the indexer's 2
    {"sliding_window": 64},
    {"swiglu_limit": 100.0},
    {"hc_mult": 1},
    {"mlp_layer_types": ["moe"] * 4},  # no hash routing
    {"layer_types": ["sliding_attention"] * 4},  # no compressed entries
])
def test_every_feature_acts_on_the_prompt(override):
    """The tiny config is only a test of a feature if changing that feature changes transformers' logits."""
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        base = make_model("deepseek_v4")(ids).logits
        other = make_model("deepseek_v4", **override)(ids).logits
    assert (base - other).abs().max() > 1e-3


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    root = tmp_path_factory.mktemp("v4")
    return convert(str(build("deepseek_v4", root / "ckpt")), root / "pack", EXACT, progress=False)


def test_cached_decoding_equals_a_full_forward(pack):
    """Prefill in uneven pieces, then one token at a time across windows and compression boundaries: every step's
    logits are those of one pass over the whole sequence (compressor buffers, CSA overlap, indexer and sliding keys
    carried in the cache)."""
    engine = moepack.load(pack, heat=False)
    seq = PROMPT + [251, 31, 150, 148, 183, 247, 71, 185, 9, 77, 3, 140]
    full = engine.logits(seq)
    for pieces in ((3, 4, 1, 2, 3) + (1,) * (len(seq) - 13), (1,) * len(seq)):  # the second from the first token
        cache = engine.make_cache()
        got, at = [], 0
        for n in pieces:
            got.append(engine.forward(seq[at : at + n], cache, "all"))
            at += n
        assert at == len(seq)
        np.testing.assert_allclose(np.concatenate(got), full, rtol=1e-5, atol=1e-5)
        assert all(c.offset == len(seq) for c in cache)
    # a cache cannot be rewound: trimming forgets it, which PromptCache takes as "nothing reusable"
    cache[0].trim(1)
    assert cache[0].offset == 0


def test_selection_does_not_depend_on_query_blocks(pack, monkeypatch):
    """Attention and the indexer one query at a time give the logits of the whole prompt at once."""
    engine = moepack.load(pack, heat=False)
    whole = engine.logits(PROMPT)
    monkeypatch.setattr(attention, "SCORE_BYTES", 1)
    monkeypatch.setattr(compressed, "SCORE_BYTES", 1)
    np.testing.assert_allclose(engine.logits(PROMPT), whole, rtol=1e-5, atol=1e-5)


def test_hash_routed_experts_are_read_early_and_exactly(pack):
    """A hash-routed layer's experts are read before the layer runs (while its attention computes), all of them
    used: no wasted read; with the pool large enough, no expert is read twice."""
    engine = moepack.load(pack, heat=False)
    list(engine.generate(PROMPT, 6))
    c = engine.store.counters
    config = json.loads((pack / "config.json").read_text())
    assert c.prefetch_issued > 0 and c.prefetch_used == c.prefetch_issued
    hashed = {k for k in engine.store.heat if config["mlp_layer_types"][k[0]] == "hash_moe"}
    assert c.prefetch_issued == len(hashed)  # every hash-routed expert came in through an early, exact read
    assert c.reads == len(engine.store.heat)
    # with guessing on too (learned layers guess the next learned layer's experts), the same tokens
    guessing = moepack.load(pack, heat=False, prefetch=True)
    assert list(guessing.generate(PROMPT, 6)) == list(moepack.load(pack, heat=False).generate(PROMPT, 6))


def test_virtual_pack_sizes_match_a_conversion(tmp_path):
    """tools/virtual_pack.py (how the README plans DeepSeek V4 Pro) sizes every V4 tensor as the converter writes it,
    the int32 hash-routing tables included."""
    import sys
    from pathlib import Path

    from moepack.convert.recipe import Recipe
    from moepack.formats.reader import PackReader

    sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
    from virtual_pack import virtual_pack

    ckpt = build("deepseek_v4", tmp_path / "ckpt", fused=True)  # transformers' own names, as the tool lists them
    for recipe in (EXACT, Recipe(expert_group_size=32, dense_group_size=32)):
        real = PackReader(convert(str(ckpt), tmp_path / "real", recipe, progress=False, force=True)).manifest
        virt = PackReader(virtual_pack(json.loads((ckpt / "config.json").read_text()), tmp_path / "virtual", recipe,
                                       None)).manifest
        assert {k: (r.encoding, r.dtype, r.nbytes) for k, r in virt.dense.items()} == \
            {k: (r.encoding, r.dtype, r.nbytes) for k, r in real.dense.items()}
        assert [virt.expert_layouts[e.layout].length for e in virt.experts] == \
            [real.expert_layouts[e.layout].length for e in real.experts]


E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])


def _e8m0(amax: torch.Tensor, top: float) -> torch.Tensor:
    """Power-of-two scales 2^e >= amax / top, as e8m0 bytes 127 + e."""
    return (127 + torch.ceil(torch.log2(amax.clamp_min(1e-30) / top))).clamp(0, 254).to(torch.uint8)


def to_fp8_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[R, C] -> (e4m3 codes, e8m0 scale per 128x128 block, the values they stand for)."""
    R, C = w.shape
    sr, sc = -(-R // 128), -(-C // 128)
    padded = torch.nn.functional.pad(w, (0, sc * 128 - C, 0, sr * 128 - R)).reshape(sr, 128, sc, 128)
    e = _e8m0(padded.abs().amax(dim=(1, 3)), 448.0)
    s = torch.exp2(e.float() - 127)[:, None, :, None]
    codes = (padded / s).to(torch.float8_e4m3fn)
    value = (codes.float() * s).reshape(sr * 128, sc * 128)[:R, :C].contiguous()
    return codes.reshape(sr * 128, sc * 128)[:R, :C].contiguous(), e.view(torch.float8_e8m0fnu), value


def to_fp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[R, C] -> (e2m1 codes two a byte, low nibble first, as int8 [R, C/2]; e8m0 scale per 32; the values)."""
    R, C = w.shape
    g = w.reshape(R, C // 32, 32)
    e = _e8m0(g.abs().amax(dim=-1), 6.0)
    s = torch.exp2(e.float() - 127)[..., None]
    codes = ((g / s)[..., None] - E2M1).abs().argmin(dim=-1).reshape(R, C)  # nearest e2m1 value
    value = (E2M1[codes].reshape(R, C // 32, 32) * s).reshape(R, C)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    return packed, e.view(torch.float8_e8m0fnu), value


def test_deepseek_v4_release_encodings(tmp_path):
    """The release's quantized weights: FP8 e4m3 dense matrices with e8m0 128x128 block scales (decoded) and FP4
    experts with an e8m0 scale per 32 (carried losslessly as mxfp4) give the logits of transformers on the values
    they stand for."""
    from parity import nmse
    from checkpoints import reference_greedy, reference_logits

    from moepack import arch
    from moepack.formats.reader import PackReader

    hf = build("deepseek_v4", tmp_path / "hf", old_spelling=True)
    floats, quantized = {}, {}
    for name, t in load_file(hf / "model.safetensors").items():
        for old, new in RELEASE:
            name = name.replace(old, new, 1) if old == "model." else name.replace(old, new)
        if arch.EXPERT_TENSOR.match(name):
            codes, scale, t = to_fp4(t)
        elif any(f".attn.{p}.weight" in name for p in ("wq_a", "wq_b", "wkv", "wo_a", "wo_b")):
            codes, scale, t = to_fp8_blocks(t)
        else:
            codes = scale = None
        floats[name] = t
        if codes is None:
            quantized[name] = t
        else:
            quantized[name], quantized[name[: -len(".weight")] + ".scale"] = codes, scale
    for name, tensors in (("float", floats), ("release", quantized)):
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "model.safetensors", metadata={"format": "pt"})
        (tmp_path / name / "config.json").write_text((hf / "config.json").read_text())
    pack = convert(str(tmp_path / "release"), tmp_path / "pack", EXACT, progress=False)
    m = PackReader(pack).manifest
    expert = m.expert_layouts[m.experts[0].layout].tensors["gate"]
    assert (expert.encoding, expert.source_encoding, expert.carried) == ("mxfp4", "fp4-e2m1-g32-e8m0", "lossless")
    wq_a = m.dense["layers.1.attn.wq_a.weight"]
    assert (wq_a.encoding, wq_a.source_encoding, wq_a.carried) == ("raw", "fp8-e4m3-block128x128-e8m0", "dequantized")
    ref, model = reference_logits(tmp_path / "float", PROMPT)
    engine = moepack.load(pack, heat=False)
    got = engine.logits(PROMPT)
    assert nmse(got, ref) < 1e-5, nmse(got, ref)
    assert list(engine.generate(PROMPT, 8)) == reference_greedy(model, PROMPT, 8)


def test_bfloat16_compute(pack):
    """In bfloat16 (a GPU's compute dtype) the model runs, prompt and cached decode, close to float32 (float32
    modules: routers, hyper-connections, sinks and position biases kept so)."""
    import mlx.core as mx
    from parity import nmse

    f32 = moepack.load(pack, heat=False).logits(PROMPT)
    bf16 = moepack.load(pack, heat=False, compute_dtype=mx.bfloat16)
    assert nmse(bf16.logits(PROMPT), f32) < 0.05
    assert len(list(bf16.generate(PROMPT, 3))) == 3


@pytest.mark.parametrize("kind", ["deepseek_v4", "glm5_next", "hy_v4"])
def test_hyper_connections_match_transformers(kind):
    """models/hyper.py against transformers' own hyper-connection modules: DeepSeek V4's and GLM-5.3's (pre, post and
    Sinkhorn-projected comb), Hunyuan v4's (no comb, post scaled by hc_magnitude), and the learned final head
    (GLM-5.3's is a plain mean over the streams)."""
    import importlib

    import mlx.core as mx
    import transformers

    from moepack.runtime.models.hyper import HyperConnection, HyperHead

    n, H, eps = 3, 16, 1e-6
    prefix, module = {"deepseek_v4": ("DeepseekV4", "deepseek_v4"), "glm5_next": ("Glm5NextText", "glm5_next"),
                      "hy_v4": ("HYV4", "hy_v4")}[kind]
    modeling = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    cfg = getattr(transformers, f"{prefix}Config")(hidden_size=H, hc_mult=n, rms_norm_eps=eps, hc_eps=eps,
                                                   **({"hc_magnitude": 1.5} if kind == "hy_v4" else {}))
    torch.manual_seed(0)
    hc = getattr(modeling, f"{prefix}HyperConnection")(cfg)
    head = getattr(modeling, f"{prefix}HyperHead")(cfg) if kind != "glm5_next" else torch.nn.Module()
    for m in (hc, head):
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(1, 5, n, H)
    mixing = kind != "hy_v4"
    ours = HyperConnection(H, n, getattr(cfg, "hc_sinkhorn_iters", 20), eps, eps, mixing=mixing,
                           magnitude=getattr(cfg, "hc_magnitude", 2.0))
    ours.update({k: mx.array(v.detach().numpy()) for k, v in hc.named_parameters()})
    ours_head = HyperHead(H, n, eps, eps)
    ours_head.update({k: mx.array(v.detach().numpy()) for k, v in head.named_parameters()})
    with torch.no_grad():
        want = hc(x)
        want_head = head(x) if kind != "glm5_next" else None
    post, comb, collapsed = ours(mx.array(x.numpy()))
    np.testing.assert_allclose(np.array(post), want[0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(collapsed), want[-1].numpy(), rtol=1e-5, atol=1e-6)
    if mixing:
        np.testing.assert_allclose(np.array(comb), want[1].numpy(), rtol=1e-5, atol=1e-6)
    if want_head is not None:
        np.testing.assert_allclose(np.array(ours_head(mx.array(x.numpy()))), want_head.numpy(), rtol=1e-5, atol=1e-6)
