"""What agent frameworks rely on, against the real server on the tiny random-weight pack (tests/tiny_pack.py) with
the official `openai` client: structured outputs (random weights: only the grammar can make them valid), enforced
tool calls, the reasoning split and concurrent requests batched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from conftest import TIMEOUT, err, free_port, run_app, wait_healthy

KEY = "sk-agents"


@pytest.fixture(scope="module")
def server(pack):
    """`moepack serve` on the tiny pack, 4 requests decoded together."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moepack.cli", "serve", str(pack), "--port", str(port),
                             "--api-key", KEY, "--parallel", "4", "--model-id", "tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "MOEPACK_API_KEY": ""})
    try:
        wait_healthy(base, proc)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, timeout=TIMEOUT, max_retries=0)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ---- structured outputs -----------------------------------------------------------------------------


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    name: str = Field(max_length=6)
    age: int = Field(ge=0, le=30)
    vaccinated: bool
    tags: list[Literal["old", "young", "loud"]] = Field(max_length=2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parse_with_a_pydantic_model(client, seed):
    """beta.chat.completions.parse: the reply validates against the model, whatever the random weights say."""
    r = client.beta.chat.completions.parse(model="tiny", messages=ask("Describe a pet"), response_format=Pet,
                                           max_tokens=200, temperature=1.0, seed=seed)
    pet = r.choices[0].message.parsed
    assert isinstance(pet, Pet), r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"


def test_json_object_streamed(client):
    stream = client.chat.completions.create(model="tiny", messages=ask("JSON please"), max_tokens=300, seed=5,
                                            response_format={"type": "json_schema", "json_schema": {
                                                "name": "flag", "strict": True, "schema": {
                                                    "type": "object", "properties": {"ok": {"type": "boolean"}},
                                                    "required": ["ok"], "additionalProperties": False}}},
                                            stream=True, temperature=1.0)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert isinstance(json.loads(text)["ok"], bool)


def test_json_object_without_schema(client):
    r = client.chat.completions.create(model="tiny", messages=ask("JSON"), max_tokens=400, seed=3, temperature=0.7,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":  # an unbounded object may run out of tokens; a finished one parses
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.startswith("{")


@pytest.mark.parametrize("fmt", [
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(["}}},
    {"type": "json_schema"},
    {"type": "yaml"},
])
def test_invalid_schema_is_400(server, fmt):
    r = httpx.post(f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=TIMEOUT,
                   json={"messages": ask("hi"), "response_format": fmt, "max_tokens": 5})
    assert r.status_code == 400, r.text
    e = err(r)
    assert e["type"] == "invalid_request_error" and e["param"].startswith("response_format"), e
