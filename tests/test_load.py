"""A short run of tools/load_test.py (10 clients for 10 s against `moepack serve` on loopback); the full run (50
clients, 2 minutes) and its figures are in RELIABILITY.md. A timed run: opt in with MOEPACK_LOAD_TEST=1 or
`-m load` (the ``load`` marker, tests/conftest.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


def load_tool():
    path = Path(__file__).resolve().parent.parent / "tools" / "load_test.py"
    spec = importlib.util.spec_from_file_location("load_test", path)
    mod = sys.modules["load_test"] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.load
def test_short_load_run():
    report = load_tool().run(clients=10, seconds=10, log=lambda _: None)
    assert report["failures"] == [], report
    assert report["ok"] > 0 and report["disconnected"] > 0 and report["rejected"] > 0, report  # every path ran
    assert report["server_delta"]["cancelled"] > 0, report  # abandoned streams were cancelled on the server
