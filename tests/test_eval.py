"""``moepack eval``: sliding-window perplexity, checked against transformers on the same windows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from checkpoints import build
from click.testing import CliRunner
from parity import EXACT

import moepack
from moepack.cli import main
from moepack.convert.pipeline import convert
from moepack.runtime.evaluate import perplexity, windows
from moepack.runtime.tokenizer import Tokenizer


@pytest.mark.parametrize("n,context,stride", [(2, 2, 1), (10, 4, 4), (11, 4, 3), (100, 16, 5), (7, 32, 16), (33, 8, 8)])
def test_windows_score_each_token_at_most_once(n, context, stride):
    scored = []
    for w in windows(n, context, stride):
        assert 0 <= w.begin < w.end <= n and w.end - w.begin <= context and 0 < w.scored < w.end - w.begin + 1
        scored += range(w.end - w.scored, w.end)
        # each scored token sees at least context - stride tokens before it, or the whole text before it
        assert w.end - w.scored - w.begin >= min(context - stride, w.end - w.scored)
    assert scored == sorted(set(scored))
    missed = set(range(1, n)) - set(scored)
    # overlapping windows score every token but the first; windows that do not overlap cannot score their first
    assert missed == (set() if stride < context else set(range(stride, n, stride)))


def _hf_perplexity(model, ids: list[int], context: int, stride: int) -> float:
    """transformers' perplexity-guide loop, counting exactly the tokens each window scores."""
    x = torch.tensor([ids])
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        chunk = x[:, begin:end]
        labels = chunk.clone()
        labels[:, : chunk.shape[1] - (end - prev_end)] = -100
        with torch.no_grad():
            logits = model(chunk).logits[0, :-1].double()
        tgt = labels[0, 1:]
        total += torch.nn.functional.cross_entropy(logits, tgt, ignore_index=-100, reduction="sum").item()
        count += int((tgt != -100).sum())
        prev_end = end
        if end == len(ids):
            break
    return float(np.exp(total / count))


def test_perplexity_matches_transformers(tmp_path):
    import transformers

    ckpt = build("qwen3_moe", tmp_path / "ckpt")
    pack = convert(str(ckpt), tmp_path / "pack", EXACT, progress=False)
    ids = np.random.default_rng(0).integers(0, 256, 90).tolist()
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    for context, stride in [(24, 10), (32, 32)]:
        want = _hf_perplexity(model, ids, context, stride)
        for budget in (None, "minimum"):
            with moepack.load(pack) as full:
                b = full.plan.minimum if budget else None
            with moepack.load(pack, memory_budget=b) as engine:
                got = perplexity(engine, ids, context=context, stride=stride)
            assert got.scored_tokens == (len(ids) - 1 if stride < context else len(ids) - len(range(0, len(ids), stride)))
            assert abs(got.perplexity / want - 1) < 1e-3, (context, stride, budget, got.perplexity, want)
            if budget:
                assert got.bytes_read > 0  # experts really streamed at the minimum budget


# Written for this test in the style of Vim's help (the demo model's training text): not a training file.
VIM_STYLE = """When you want to delete a word, move the cursor to the start of the word and type "dw". To delete the
rest of the line, use "D". The command "u" undoes the last change, and CTRL-R redoes it. In Insert mode you can
type text; press <Esc> to go back to Normal mode. The option 'textwidth' sets the maximum width of text that is
being inserted. A longer line will be broken after white space to get this width. See |:set| for how to set an
option, and |options| for a list of all options. Use ":help" to open a window with the help file.
"""


def test_demo_model_perplexity_matches_transformers_and_is_learned(tmp_path):
    """The shipped model: a float32 pack scores held-out-style text as transformers does (within 0.1%), and far
    better than chance (a random model's perplexity is about its vocabulary size, 4096)."""
    import transformers

    from moepack.demo import DEMO_MODEL

    pack = convert(str(DEMO_MODEL), tmp_path / "pack", EXACT, progress=False)
    ids = Tokenizer(pack).encode(VIM_STYLE)
    model = transformers.AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    want = _hf_perplexity(model, ids, 64, 32)
    with moepack.load(pack) as engine:
        got = perplexity(engine, ids, context=64, stride=32)
    assert abs(got.perplexity / want - 1) < 1e-3, (got.perplexity, want)
    assert got.perplexity < 100, got.perplexity


def test_eval_cli_json(pack, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    r = CliRunner().invoke(main, ["eval", str(pack), "--text", str(text), "--context", "64", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["context"] == 64 and out["stride"] == 32 and np.isfinite(out["perplexity"]) and out["perplexity"] > 1
    assert out["scored_tokens"] == out["text_tokens"] - 1
    bad = CliRunner().invoke(main, ["eval", str(pack), "--text", str(text), "--context", "8", "--stride", "9"])
    assert bad.exit_code != 0 and "--stride" in bad.output
