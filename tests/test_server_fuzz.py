"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis), in-process, bounded and derandomized.

Property: for schema-valid and schema-violating requests alike, no 5xx (the scripted engine never fails, so any
5xx is a server bug; 503 while loading is the only documented one and the model is loaded here), every response
conforms to the schema with a documented status and content type, schema-violating requests are rejected with a
4xx, and the server still answers a normal request afterwards with nothing left running. Not checked:
``positive_data_acceptance`` (schema-valid bodies may still be 400s, by rules the schema cannot state: a tool
message needs its tool_call_id, top_logprobs needs logprobs, the prompt must fit the context...).
MOEPACK_FUZZ_EXAMPLES raises the example count for a longer run. Both tests read one module-scoped fuzzing pass
(the ``fuzzed`` fixture), so either runs alone.
"""

from __future__ import annotations

import collections
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode
from starlette.testclient import TestClient

from moepack.runtime.tokenizer import Tokenizer
from moepack.serve.app import create_app
from tiny_pack import ScriptedEngine

KEY = "sk-fuzz"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = int(os.environ.get("MOEPACK_FUZZ_EXAMPLES", "60"))


class Fuzzed:
    """One bounded, derandomized fuzzing pass over a fresh app: every operation, schema-valid and
    schema-violating requests, EXAMPLES of each; what every case returned and every check that failed."""

    def __init__(self, app):
        self.app = app
        self.statuses: collections.Counter = collections.Counter()
        self.examples: collections.Counter = collections.Counter()  # (operation, mode) -> cases run
        self.failures: list[str] = []
        schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=AUTH)
        self.operations = [r.ok() for r in schema.get_all_operations()]
        for op in self.operations:
            for mode in GenerationMode:
                self._fuzz(op, mode)

    def _fuzz(self, op, mode: GenerationMode) -> None:
        @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def one(case):
            self.examples[(op.label, mode.value)] += 1
            try:
                r = case.call_and_validate(headers=AUTH,
                                           excluded_checks=[schemathesis.checks.positive_data_acceptance])
                self.statuses[r.status_code] += 1
                assert r.status_code < 500, r.text
            except Exception as e:  # noqa: BLE001 - every failing case is reported, the pass goes on
                self.failures.append(f"{op.label} ({mode.value}): {type(e).__name__}: {e}\n{case.as_curl_command()}")

        try:
            one()
        except Unsatisfiable:  # nothing the schema forbids (no body, unconstrained parameters): no negative case
            if mode is not GenerationMode.NEGATIVE:
                raise


@pytest.fixture(scope="module")
def fuzzed(pack) -> Fuzzed:
    tok = Tokenizer(pack)
    return Fuzzed(create_app(ScriptedEngine(tok, ["Hi there, fuzzer."]), tok, model_id="tiny", api_key=KEY))


def test_fuzz_api(fuzzed):
    """No 5xx, every response conforms to the schema, schema-violating requests get a 4xx."""
    assert not fuzzed.failures, f"{len(fuzzed.failures)} failing cases; the first:\n" + "\n\n".join(fuzzed.failures[:3])
    ran = {label for label, _ in fuzzed.examples}
    assert ran == {op.label for op in fuzzed.operations}, fuzzed.examples  # every operation was exercised
    posts = [op.label for op in fuzzed.operations if op.method.upper() == "POST"]
    assert posts and all(fuzzed.examples[(p, m.value)] >= EXAMPLES // 2 for p in posts for m in GenerationMode), \
        fuzzed.examples  # the request bodies, valid and invalid, were really fuzzed


def test_server_alive_after_fuzzing(fuzzed):
    """After the whole pass: the app still serves, and no request is left running."""
    assert sum(fuzzed.statuses.values()) >= EXAMPLES, fuzzed.statuses
    assert {200, 400} <= set(fuzzed.statuses), fuzzed.statuses
    with TestClient(fuzzed.app) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
                   headers=AUTH)
        assert r.status_code == 200, r.text
        s = c.get("/stats", headers=AUTH).json()["server"]
    assert s["active"] == 0 and s["queued"] == 0 and s["failed"] == 0, s
