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
    assert "needs at least 113.2 KiB" in line and "try --memory-budget 114KB" in line
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
