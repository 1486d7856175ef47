"""A newcomer's first hour and memory in containers (issue #12): budgets as people write them, budgets that
cannot fit under a cgroup limit, one-line errors for what users type, generate's options validated like the
server's, the demo's output, Ctrl-C."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from moepack.cli import main
from moepack.errors import UsageError
from moepack.runtime import memory
from moepack.units import parse_bytes, suggest_bytes

# The most common words of English, and of Vim's help: about half of the words of any English help text.
VOCAB = """the of and to a in is it you that he was for on are with as his they be at one have this from or had by
not but what some we can out other were all there when up use your how said an each she which do their time if will
way about many then them write would like so these her long make thing see him two has look more day could go come
did no most my over know than call first who may down side been now find any new work part take get place made live
where after back little only round man year came show every good me give our under name very through just form
sentence great think say help low line differ turn cause much mean before move right boy old too same tell does set
three want air well also play small end put home read hand port large spell add even land here must big high such
follow act why ask men change went light kind off need house picture try us again animal point mother world near
build self earth father file files buffer buffers window windows cursor command commands mode option options text
insert normal visual character characters key keys register line lines word words value default vim see used using
example set string number list function argument arguments variable name type first last next previous current
position column row screen display pattern search replace match matches when then else endif let call return
"""


def one_line_error(result) -> str:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.lower().startswith("error")]
    assert len(lines) == 1, result.output
    return lines[0]


# ---- budgets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,expect", [
    ("8GB", 8 << 30), ("512MiB", 512 << 20), ("1.5G", 3 << 29), ("12e9", 12 * 10**9), ("12_000MB", 12000 << 20),
    ("12000000000", 12 * 10**9), (" 9 MB ", 9 << 20), ("60%", 600), (4096, 4096),
])
def test_budget_spellings_accepted(text, expect):
    assert parse_bytes(text, of=1000) == expect


@pytest.mark.parametrize("text,expect", [
    ("12gigs", "unknown unit 'gigs'"), ("-1", "must be positive"), ("0", "must be positive"),
    ("12,5GB", "use a dot for decimals"), ("150%", "at most 100"), ("1__0MB", "cannot read"), ("GB", "cannot read"),
    ("1e400", "must be positive"),
])
def test_budget_spellings_refused_in_one_line(text, expect):
    with pytest.raises(UsageError, match=expect):
        parse_bytes(text, of=1000)


def test_percent_means_available_memory(monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda: 10 << 30)
    monkeypatch.setattr(memory, "cgroup_memory", lambda *a: None)
    assert memory.parse_budget("60%") == 6 << 30


@pytest.mark.parametrize("n,spelled", [(9332326, "9MB"), (1 << 20, "1MB"), (3 << 29, "1.5GB"), (100, "100")])
def test_suggested_budget_is_short_and_enough(n, spelled):
    assert suggest_bytes(n) == spelled and parse_bytes(spelled) >= n


@pytest.mark.parametrize("budget,expect", [
    ("12gigs", "unknown unit"), ("-1", "must be positive"), ("12,5GB", "use a dot"),
])
def test_cli_budget_errors_are_one_line(pack, budget, expect):
    r = CliRunner().invoke(main, ["generate", str(pack), "-p", "hi", "--max-tokens", "2", "--memory-budget", budget])
    assert expect in one_line_error(r)


def test_budget_too_small_in_human_units_with_the_flag(pack):
    r = CliRunner().invoke(main, ["generate", str(pack), "-p", "hi", "--max-tokens", "2", "--memory-budget", "1KB"])
    line = one_line_error(r)
    # the tiny pack streams its embedding: the minimum is the dense part without it, plus one token's row
    assert "needs at least 82.7 KiB" in line and "try --memory-budget 83KB" in line
    suggested = line.split("try --memory-budget ")[1].split()[0]
    r = CliRunner().invoke(main, ["generate", str(pack), "-p", "hi", "--max-tokens", "2", "--memory-budget", suggested])
    assert r.exit_code == 0, r.output  # the suggestion works


@pytest.fixture(params=["v2", "v1"])
def cgroup(request, tmp_path, monkeypatch):
    """A fake memory cgroup of 1 GiB with 256 MiB in use, through the module's seams (CGROUP_ROOT, PROC_CGROUP)."""
    fs, proc = tmp_path / "fs", tmp_path / "cgroup"
    if request.param == "v2":
        proc.write_text("0::/box\n")
        (fs / "box").mkdir(parents=True)
        (fs / "box" / "memory.max").write_text(f"{1 << 30}\n")
        (fs / "box" / "memory.current").write_text(f"{256 << 20}\n")
    else:
        proc.write_text("5:devices:/\n4:memory:/box\n")
        (fs / "memory" / "box").mkdir(parents=True)
        (fs / "memory" / "box" / "memory.limit_in_bytes").write_text(f"{1 << 30}\n")
        (fs / "memory" / "box" / "memory.usage_in_bytes").write_text(f"{256 << 20}\n")
    monkeypatch.setattr(memory, "CGROUP_ROOT", fs)
    monkeypatch.setattr(memory, "PROC_CGROUP", proc)
    monkeypatch.setattr(memory.sys, "platform", "linux")
    return 768 << 20


def test_default_budget_stays_inside_the_cgroup(pack, cgroup):
    import moepack

    assert memory.default_budget() <= 0.6 * cgroup
    with moepack.load(pack, heat=False) as eng:
        assert eng.plan.budget <= 0.6 * cgroup


def test_explicit_budget_over_the_cgroup_limit_refused_with_the_numbers(pack, cgroup):
    r = CliRunner().invoke(main, ["generate", str(pack), "-p", "hi", "--memory-budget", "12GB"])
    line = one_line_error(r)
    assert "12.0 GiB cannot fit in this container" in line and "1.0 GiB" in line and "768.0 MiB" in line
    assert "try --memory-budget 461MB" in line  # 60% of what is left
    r = CliRunner().invoke(main, ["generate", str(pack), "-p", "hi", "--max-tokens", "2", "--memory-budget", "200MB"])
    assert r.exit_code == 0, r.output


# ---- generate ------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,expect", [
    (["--temp", "-1"], "--temp -1.0 is out of range [0.0, 2.0]"),
    (["--temp", "nan"], "--temp nan is out of range"),
    (["--top-p", "5"], "--top-p 5.0 is out of range (0.0, 1.0]"),
    (["--top-p", "0"], "--top-p 0.0 is out of range"),
    (["--max-tokens", "-3"], "--max-tokens -3 is out of range [1,"),
    (["--top-k", "-5"], "--top-k -5 is out of range"),
    (["--system", "Be brief."], "--system is a chat message: add --chat"),
])
def test_generate_validates_like_the_server(pack, args, expect):
    r = CliRunner().invoke(main, ["generate", str(pack), "-p", "hi", *args])
    assert expect in one_line_error(r)


def test_generate_empty_prompt_and_non_utf8_stdin(pack):
    assert "the prompt is empty" in one_line_error(CliRunner().invoke(main, ["generate", str(pack), "-p", ""]))
    r = CliRunner().invoke(main, ["generate", str(pack), "-p", "-"], input=b"caf\xe9 au lait\n")
    assert "standard input is not UTF-8 text (byte 3" in one_line_error(r)
    r = CliRunner().invoke(main, ["generate", str(pack), "-p", "-", "--max-tokens", "2"], input="café\n".encode())
    assert r.exit_code == 0, r.output


def test_generate_says_when_it_stops_at_the_context_limit(pack, tmp_path):
    copy = Path(shutil.copytree(pack, tmp_path / "pack"))
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 12}))
    r = CliRunner().invoke(main, ["generate", str(copy), "-p", "The quick brown fox", "--max-tokens", "50"])
    assert r.exit_code == 0 and "stopped at the model's context limit of 12 tokens" in r.output, r.output
    r = CliRunner().invoke(main, ["generate", str(copy), "-p", "The quick brown fox " * 5])
    assert "the model's context holds 12" in one_line_error(r)


def test_generate_ctrl_c_exits_quietly_with_130(pack, monkeypatch):
    from moepack.runtime.engine import BaseEngine

    def interrupted(*a, **k):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(BaseEngine, "generate", interrupted)
    r = CliRunner().invoke(main, ["generate", str(pack), "-p", "hi"])
    assert r.exit_code == 130 and "Aborted" not in r.output and "Traceback" not in r.output, r.output


def test_checkpoint_where_a_pack_is_expected_says_convert(tmp_path):
    from moepack.demo import SyntheticSpec, write_checkpoint

    ckpt = write_checkpoint(tmp_path / "ckpt", SyntheticSpec(hidden_size=64, num_hidden_layers=1, num_experts=4,
                                                            num_experts_per_tok=2, moe_intermediate_size=32,
                                                            vocab_size=512))
    for cmd in (["generate", str(ckpt), "-p", "hi"], ["inspect", str(ckpt)], ["chat", str(ckpt)]):
        line = one_line_error(CliRunner().invoke(main, cmd))
        assert "is a Hugging Face checkpoint, not a pack; convert it first: moepack convert" in line, line
    (tmp_path / "half" / ".moepack").mkdir(parents=True)
    line = one_line_error(CliRunner().invoke(main, ["inspect", str(tmp_path / "half")]))
    assert "unfinished conversion; re-run the same `moepack convert` command" in line


# ---- the demo --------------------------------------------------------------------------------------


def test_demo_budget_in_human_units_next_steps_and_no_replacement_characters(tmp_path):
    r = CliRunner().invoke(main, ["demo", "--dir", str(tmp_path), "--max-tokens", "40"])
    assert r.exit_code == 0, r.output
    assert "\ufffd" not in r.output
    budget_line = next(line for line in r.output.splitlines() if line.startswith("4/4"))
    assert "KiB (--memory-budget " in budget_line or "MiB (--memory-budget " in budget_line, budget_line
    assert "bytes" not in budget_line
    assert r.output.rstrip().splitlines()[-3].strip().startswith("moepack convert")
    assert "Next" in r.output


def test_demo_prints_words_from_its_training_text(tmp_path):
    """The shipped model learned English from Vim's help: most of what the demo prints are words of its vocabulary
    (a random model's output is mostly fragments), and nothing is written next to the shipped checkpoint."""
    import re

    from moepack.demo import DEMO_MODEL, DEMO_PROMPT

    before = sorted(p.name for p in DEMO_MODEL.iterdir())
    r = CliRunner().invoke(main, ["demo", "--dir", str(tmp_path), "--max-tokens", "60"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in DEMO_MODEL.iterdir()) == before
    text = r.output.split("experts stream from disk):", 1)[1].split("  (", 1)[0]
    assert text.strip().startswith(DEMO_PROMPT)
    words = re.findall(r"[A-Za-z]{2,}", text[len(DEMO_PROMPT) + 1:])
    common = set(re.findall(r"[a-z]{2,}", VOCAB.lower()))
    assert len(words) >= 20, text
    assert sum(w.lower() in common for w in words) / len(words) > 0.6, text


# ---- chat ------------------------------------------------------------------------------------------


def test_chat_repl_survives_an_expert_read_error(ref):
    import io

    from moepack.errors import ExpertReadError
    from moepack.runtime.sampling import SamplingParams
    from moepack.serve.chat import ChatSession, repl

    engine, tok = ref

    class Flaky:
        """The engine, whose forward pass fails once (as a damaged expert file would)."""

        def __init__(self):
            self.failed = False

        def forward(self, *a, **k):
            if not self.failed:
                self.failed = True
                raise ExpertReadError("experts/000/0001.bin: cannot read expert 1 of layer 0 (Input/output error)")
            return engine.forward(*a, **k)

        def __getattr__(self, name):
            return getattr(engine, name)

    s = ChatSession(Flaky(), tok, params=SamplingParams(temperature=0), max_tokens=3)
    lines = iter(["Hello", "Hello again", "/stats", "/quit"])
    out = io.StringIO()
    repl(s, lambda prompt: next(lines), out)
    text = out.getvalue()
    assert "error: experts/000/0001.bin: cannot read expert 1" in text and "the conversation goes on" in text
    assert "turns 1, messages 2" in text  # the failed turn left nothing; the next one answered
    assert [m["content"] for m in s.messages][0] == "Hello again"
