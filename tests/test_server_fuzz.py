"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis), in-process, bounded and derandomized.

Property: for schema-valid and schema-violating requests alike, no 5xx (the scripted engine never fails, so any
5xx is a server bug; 503 while loading is the only documented one and the model is loaded here), every response
conforms to the schema with a documented status and content type, schema-violating requests are rejected with a
4xx, and the server still answers a normal request afterwards with nothing left running. Not checked:
``positive_data_acceptance`` (schema-valid bodies may still be 400s, by rules the schema cannot state: a tool
message needs its tool_call_id, top_logprobs needs logprobs, the prompt must fit the context...).
MOEPACK_FUZZ_EXAMPLES raises the example count for a longer run.
"""

from __future__ import annotations

import collections
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from starlette.testclient import TestClient

from moepack.runtime.tokenizer import Tokenizer
from moepack.serve.app import create_app
from tiny_pack import ScriptedEngine, build_pack

KEY = "sk-fuzz"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = int(os.environ.get("MOEPACK_FUZZ_EXAMPLES", "60"))
STATUSES: collections.Counter = collections.Counter()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tok = Tokenizer(build_pack(tmp_path_factory.mktemp("fuzz")))
    return create_app(ScriptedEngine(tok, ["Hi there, fuzzer."]), tok, model_id="tiny", api_key=KEY)


@pytest.fixture(scope="module")
def api(served):
    return schemathesis.openapi.from_asgi("/openapi.json", served, headers=AUTH)


schema = schemathesis.pytest.from_fixture("api")


@schema.parametrize()
@settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_fuzz_api(case):
    response = case.call_and_validate(headers=AUTH, excluded_checks=[schemathesis.checks.positive_data_acceptance])
    STATUSES[response.status_code] += 1
    assert response.status_code < 500, response.text


def test_server_alive_after_fuzzing(served):
    """Runs after the fuzzing (file order): the app still serves, and no request is left running."""
    if not STATUSES:
        pytest.skip("checks what test_fuzz_api left behind; run it too")
    assert sum(STATUSES.values()) >= EXAMPLES, STATUSES
    assert {200, 400} <= set(STATUSES), STATUSES
    with TestClient(served) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
                   headers=AUTH)
        assert r.status_code == 200, r.text
        s = c.get("/stats", headers=AUTH).json()["server"]
    assert s["active"] == 0 and s["queued"] == 0 and s["failed"] == 0, s
