"""The command line as a user drives it: convert, inspect, verify, generate, demo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from click.testing import CliRunner

import moepack

from moepack.cli import main
from moepack.demo import SyntheticSpec, write_checkpoint

SPEC = SyntheticSpec(hidden_size=128, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                     moe_intermediate_size=64, vocab_size=512)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    ckpt = write_checkpoint(root / "ckpt", SPEC)
    pack = root / "pack"
    res = CliRunner().invoke(main, ["convert", str(ckpt), str(pack), "--q-group-size", "32", "--dense-group-size", "32"])
    assert res.exit_code == 0, res.output
    return ckpt, pack


def test_inspect_json_reports_sizes(converted):
    _, pack = converted
    res = CliRunner().invoke(main, ["inspect", str(pack), "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.output)
    a, b = s["architecture"], s["bytes"]
    assert a["family"] == "qwen3_moe" and a["num_experts"] == 8 and a["top_k"] == 2 and a["moe_layers"] == [0, 1]
    assert b["per_expert"] % s["alignment"] == 0
    assert b["per_token_uncached"] == b["per_expert"] * 2 * 2
    assert s["parameters"]["routed_experts"] == 2 * 8 * 3 * 128 * 64
    assert s["recipe"]["expert_bits"] == 4 and s["recipe"]["expert_group_size"] == 32
    assert any(k.startswith("affine4/g32") for k in s["encodings"])
    text = CliRunner().invoke(main, ["inspect", str(pack)]).output
    assert "per token" in text and "qwen3_moe" in text


def test_verify_exit_codes(converted, tmp_path):
    _, pack = converted
    ok = CliRunner().invoke(main, ["verify", str(pack)])
    assert ok.exit_code == 0 and "ok" in ok.output
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(pack, bad)
    victim = bad / "experts" / "001" / "0005.bin"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    (bad / "experts" / "000" / "0001.bin").unlink()
    res = CliRunner().invoke(main, ["verify", str(bad)])
    assert res.exit_code != 0
    assert "experts/001/0005.bin" in res.output and "experts/000/0001.bin" in res.output


def test_convert_refuses_unknown_architecture_cleanly(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", SPEC)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    res = CliRunner().invoke(main, ["convert", str(ckpt), str(tmp_path / "out")])
    assert res.exit_code == 1
    assert "not supported" in res.output and "qwen3_moe" in res.output
    assert not (tmp_path / "out" / "manifest.json").exists()


def expected_text(pack: Path, ids: list[int], n: int, **sampling) -> str:
    """What the engine generates in-process for ``ids``, decoded by transformers from the pack's tokenizer.json."""
    hf = transformers.AutoTokenizer.from_pretrained(str(pack))
    engine = moepack.load(pack)
    try:
        tokens = list(engine.generate(ids, n, stop_tokens={hf.eos_token_id}, **sampling))
    finally:
        engine.close()
    return hf.decode([t for t in tokens if t != hf.eos_token_id], skip_special_tokens=True)


def test_generate_streams_text_and_stats(converted):
    _, pack = converted
    hf = transformers.AutoTokenizer.from_pretrained(str(pack))
    res = subprocess.run([sys.executable, "-m", "moepack.cli", "generate", str(pack), "-p", "Hello experts",
                          "--max-tokens", "6", "--stats", "--memory-budget", "4MB"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    # the greedy text, streamed at the minimum budget, is what the whole model in memory gives
    assert res.stdout == expected_text(pack, hf.encode("Hello experts"), 6) + "\n", res.stdout
    assert "tok/s" in res.stderr and "hit rate" in res.stderr and "/token" in res.stderr
    chat = subprocess.run([sys.executable, "-m", "moepack.cli", "generate", str(pack), "-p", "Hi", "--chat",
                           "--max-tokens", "4", "--temp", "0.7", "--seed", "1"], capture_output=True, text=True,
                          timeout=300)
    assert chat.returncode == 0, chat.stderr
    ids = list(hf.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"])
    assert chat.stdout == expected_text(pack, ids, 4, temperature=0.7, top_p=1.0, top_k=0, seed=1) + "\n", chat.stdout


def test_budget_error_states_minimum(converted):
    _, pack = converted
    res = CliRunner().invoke(main, ["generate", str(pack), "-p", "x", "--memory-budget", "1000"])
    assert res.exit_code == 1
    assert "minimum budget" in res.output


def test_demo_runs_end_to_end(tmp_path):
    res = CliRunner().invoke(main, ["demo", "--dir", str(tmp_path), "--max-tokens", "4"])
    assert res.exit_code == 0, res.output
    assert "trained on Vim's help files" in res.output and "verify         ok" in res.output
    assert (tmp_path / "pack" / "manifest.json").exists()


def test_convert_from_hub_repo_id_via_offline_cache(tmp_path, monkeypatch):
    """A repo id resolves through huggingface_hub's cache (HF_HOME, HF_HUB_OFFLINE), as after a prior download."""
    home = tmp_path / "hf"
    snap = home / "hub" / "models--acme--tiny-moe" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    write_checkpoint(snap, SPEC)
    (home / "hub" / "models--acme--tiny-moe" / "refs").mkdir(parents=True)
    (home / "hub" / "models--acme--tiny-moe" / "refs" / "main").write_text(snap.name)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    out = tmp_path / "pack"
    res = CliRunner().invoke(main, ["convert", "acme/tiny-moe", str(out), "--q-group-size", "32"])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["provenance"]["source"] == "acme/tiny-moe"
    assert m["provenance"]["revision"] == snap.name
    missing = CliRunner().invoke(main, ["convert", "acme/not-there", str(tmp_path / "p2")])
    assert missing.exit_code == 1 and "could not fetch acme/not-there" in missing.output


@pytest.mark.parametrize("how", ["flag", "env"])
def test_serve_refuses_an_empty_api_key(converted, how):
    """``--api-key "$KEY"`` with KEY unset, or an empty MOEPACK_API_KEY, must not silently serve without authentication."""
    _, pack = converted
    args, env = (["--api-key", ""], {}) if how == "flag" else ([], {"MOEPACK_API_KEY": ""})
    res = CliRunner().invoke(main, ["serve", str(pack), "--port", "1", *args], env=env)
    assert res.exit_code == 2 and "API key is empty" in res.output, res.output
