"""Hostile or careless clients, and expert files that fail while the server runs (RELIABILITY.md, "Server").

Bad input is sent in-process to an app over a scripted engine that records every prompt it is fed: each request
must get OpenAI's error shape with the right status and code, and the oracle for "nothing reached the model" is
that the engine saw no prompt and the worker counted no request. The fault tests serve a copy of the tiny pack
with the smallest memory budget (two expert slots, so every token re-reads its experts) and break one expert
file under the running server. Error classes test_serve.py already covers (wrong types, ranges, 413...) are not
repeated here.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import sys
import threading
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from click.testing import CliRunner
from fastapi.testclient import TestClient
from jinja2 import TemplateError
from pydantic import ValidationError

import moepack
from moepack.runtime.template import Renderer, TemplateLimitError, render
from moepack.runtime.tokenizer import Tokenizer
from moepack.serve import http as http_module
from moepack.serve import prompt as prompt_module
from moepack.serve import schemas as S
from moepack.serve.app import create_app
from moepack.serve.http import MAX_DEPTH
from conftest import HELLO, TIMEOUT, err, minimum_budget, run_app
from tiny_pack import ScriptedEngine, reference

KEY = "sk-hostile"
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def tok(pack):
    return Tokenizer(pack)


@contextmanager
def scripted(tok, **kw):
    """A TestClient over a scripted engine; yields (client, engine, worker)."""
    engine = ScriptedEngine(tok, ["Hi there."])
    with TestClient(create_app(engine, tok, model_id="tiny", **kw), raise_server_exceptions=False) as c:
        yield c, engine, c.app.state.moepack.worker


def nothing_reached_the_model(engine, worker) -> None:
    assert engine.seen == [] and worker.counters.requests == 0, (engine.seen, worker.counters)


# ---- bodies that are not (strict) JSON -----------------------------------------------------------

NESTED = 10_000
RAW_BAD = [  # (raw body, code, param)
    (b'{"messages":' + b"[" * NESTED + b"]" * NESTED + b"}", "invalid_json", None),
    (b'{"a":' * NESTED + b"1" + b"}" * NESTED, "invalid_json", None),
    (b'{"messages":[{"role":"user","content":"\xff\xfe caf\xe9"}]}', "invalid_json", None),  # not UTF-8
    (b'\xef\xbb\xbf{"messages":[{"role":"user","content":"x"}]}', "invalid_json", None),  # a UTF-8 BOM
    (b'{"messages":[{"role":"user","content":"\\ud800"}]}', "invalid_value", "messages.[0].content"),
    (b'{"messages":[{"role":"user","content":"x"}],"stop":["\\udc00"]}', "invalid_value", "stop.[0]"),
    (b'{"messages":[{"role":"user","content":"x"}],"chat_template_kwargs":{"\\ud83d":1}}', "invalid_value",
     "chat_template_kwargs"),
]


@pytest.mark.parametrize("body,code,param", RAW_BAD, ids=["arrays-10k", "objects-10k", "latin-1", "bom",
                                                           "lone-surrogate", "surrogate-in-stop", "surrogate-key"])
def test_malformed_bodies(tok, body, code, param):
    with scripted(tok) as (c, engine, worker):
        r = c.post(CHAT, content=body, headers=JSON)
        assert r.status_code == 400, r.text
        e = err(r)
        assert (e["code"], e["param"], e["type"]) == (code, param, "invalid_request_error"), e
        nothing_reached_the_model(engine, worker)


def test_nesting_limit_inside_fields(tok):
    """Nesting is capped at MAX_DEPTH wherever it is (Python's json would allow ~1000, then RecursionError)."""
    def nest(n):
        return json.loads('{"a":' * n + "1" + "}" * n)

    with scripted(tok) as (c, engine, worker):
        deep_tool = {"type": "function", "function": {"name": "f", "parameters": nest(MAX_DEPTH)}}
        for field, value in [("chat_template_kwargs", nest(MAX_DEPTH)), ("tools", [deep_tool])]:
            r = c.post(CHAT, json={"messages": HELLO, field: value})
            assert r.status_code == 400 and err(r)["param"] == field and err(r)["code"] == "invalid_json", r.text
        nothing_reached_the_model(engine, worker)
        ok = {"type": "function", "function": {"name": "f", "parameters": nest(MAX_DEPTH - 6)}}
        r = c.post(CHAT, json={"messages": HELLO, "tools": [ok], "max_tokens": 3})
        assert r.status_code == 200, r.text


def test_a_surrogate_pair_is_not_a_lone_surrogate(tok):
    with scripted(tok) as (c, engine, _):
        r = c.post(CHAT, content=b'{"messages":[{"role":"user","content":"smile \\ud83d\\ude00"}],"max_tokens":2}',
                   headers=JSON)
        assert r.status_code == 200, r.text
        assert "smile \U0001f600" in tok.decode(engine.seen[0], skip_special_tokens=False)


FLOATS = ["temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_not_json(tok, literal):
    """Python's json accepts NaN and Infinity; RFC 8259 and OpenAI do not, and NaN would pass range checks."""
    with scripted(tok) as (c, engine, worker):
        for field in FLOATS:
            body = f'{{"messages":[{{"role":"user","content":"x"}}],"{field}":{literal}}}'.encode()
            r = c.post(CHAT, content=body, headers=JSON)
            assert r.status_code == 400 and err(r)["code"] == "invalid_json" and literal in err(r)["message"], r.text
        r = c.post(COMPLETIONS, content=f'{{"prompt":"x","temperature":{literal}}}'.encode(), headers=JSON)
        assert r.status_code == 400 and err(r)["code"] == "invalid_json"
        nothing_reached_the_model(engine, worker)


NEGATIVE = [({"temperature": -0.1}, "temperature"), ({"top_p": -1.0}, "top_p"), ({"min_p": -0.5}, "min_p"),
            ({"repetition_penalty": -1.0}, "repetition_penalty"), ({"max_tokens": -5}, "max_tokens"),
            ({"seed": -(2**63) - 1}, "seed"), ({"seed": 2**64}, "seed"), ({"top_logprobs": -1, "logprobs": True},
                                                                          "top_logprobs")]


def test_negative_and_out_of_range_values(tok):
    with scripted(tok) as (c, engine, worker):
        for change, param in NEGATIVE:
            r = c.post(CHAT, json={"messages": HELLO, **change})
            assert r.status_code == 400 and err(r)["param"] == param, (change, r.text)
        r = c.post(COMPLETIONS, json={"prompt": [1, -3]})
        assert r.status_code == 400 and err(r)["param"] == "prompt"
        nothing_reached_the_model(engine, worker)


def test_extreme_valid_sampling_values_generate(tok):
    """Edges that pass validation must sample, not crash: a 5e-324 temperature divided the logits to inf and a
    5e-324 repetition penalty made inf logits (inf - inf = NaN probabilities) before the sampler shifted first."""
    with scripted(tok) as (c, engine, worker):
        def ask(**change):
            r = c.post(CHAT, json={"messages": HELLO, "max_tokens": 3, **change})
            assert r.status_code == 200, (change, r.text)
            return r.json()["choices"][0]["message"]["content"]

        greedy = ask(temperature=0)
        # each of these leaves only the scripted token possible, so the reply is the greedy one
        assert ask(temperature=5e-324) == greedy
        assert ask(temperature=1.0, repetition_penalty=5e-324) == greedy
        assert ask(temperature=2.0, top_k=10**30, top_p=5e-324, min_p=1.0) == greedy
        for change in [{"seed": -(2**63)}, {"seed": 2**64 - 1}, {"repetition_penalty": 10.0, "temperature": 0.5}]:
            ask(**change)
        assert worker.counters.failed == 0


# ---- context and token limits -------------------------------------------------------------------


def test_max_tokens_far_beyond_the_context_is_400(tok):
    """Like OpenAI and vLLM (llama-server would clamp): a 400 naming max_tokens, not a silently shorter answer."""
    with scripted(tok, context_length=64) as (c, engine, worker):
        for change in [{"max_tokens": 10**30}, {"max_tokens": 2**63}, {"max_completion_tokens": 2**64 + 1},
                       {"max_tokens": 64}]:
            r = c.post(CHAT, json={"messages": HELLO, **change})
            assert r.status_code == 400, r.text
            e = err(r)
            assert e["code"] == "context_length_exceeded" and e["param"] == "max_tokens", e
        r = c.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 2**70})
        assert r.status_code == 400 and err(r)["code"] == "context_length_exceeded"
        # a chat prompt alone over the context names the messages
        r = c.post(CHAT, json={"messages": [{"role": "user", "content": "word " * 200}]})
        assert r.status_code == 400 and err(r)["param"] == "messages", r.text
        nothing_reached_the_model(engine, worker)
        # no max_tokens: the rest of the context, exactly
        r = c.post(COMPLETIONS, json={"prompt": [5] * 60, "max_tokens": None})
        assert r.status_code == 200 and r.json()["usage"]["total_tokens"] <= 64


# ---- unknown fields -----------------------------------------------------------------------------


def test_unknown_top_level_parameters_are_400(tok):
    """As OpenAI: an argument this server does not implement is named in a 400, never silently dropped."""
    with scripted(tok) as (c, engine, worker):
        unknown = [("logit_bias", {"5": 10}), ("guided_json", {}), ("mirostat", 2), ("Temperature", 0.5), ("str", 1)]
        # response_format is implemented for chat (constrained decoding), not for text completions
        for url, base, extra in [(CHAT, {"messages": HELLO}, []),
                                 (COMPLETIONS, {"prompt": "x"}, [("response_format", {"type": "json_object"})])]:
            for name, value in unknown + extra:
                r = c.post(url, json={**base, name: value})
                assert r.status_code == 400, (url, name, r.text)
                e = err(r)
                assert (e["code"], e["param"]) == ("unknown_parameter", name) and name in e["message"], e
        nothing_reached_the_model(engine, worker)


def test_known_openai_fields_and_nested_extras_are_accepted(tok):
    with scripted(tok) as (c, engine, worker):
        msgs = [{"role": "user", "content": "Hi", "extra": 1},
                {"role": "assistant", "content": "Hello", "refusal": None, "annotations": [], "audio": None},
                {"role": "user", "content": "Again"}]
        r = c.post(CHAT, json={"messages": msgs, "max_tokens": 2, "user": "u-1", "metadata": {"k": "v"},
                               "store": False, "service_tier": "auto"})
        assert r.status_code == 200, r.text
        r = c.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 2, "user": "u-2", "store": True})
        assert r.status_code == 200, r.text
        assert worker.counters.requests == 2


# ---- API key and bind address -------------------------------------------------------------------


def test_api_key_guards_every_route_but_health(tok, monkeypatch):
    compared = []
    real = http_module.secrets.compare_digest
    monkeypatch.setattr(http_module.secrets, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    with scripted(tok, api_key=KEY) as (c, engine, worker):
        paths = {r.path.replace("{model_id:path}", "tiny") for r in c.app.routes} | {"/nowhere", "/v1/nowhere"}
        assert {"/docs", "/openapi.json", "/stats", "/v1/models", CHAT, COMPLETIONS} <= paths
        for path in sorted(paths - {"/health"}):
            for method in ("GET", "POST"):
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {KEY}x"},
                                {"Authorization": f"Bearer {KEY[:-1]}"}, {"Authorization": KEY},
                                {"X-API-Key": "nope"}):
                    r = c.request(method, path, headers=headers, json={"messages": HELLO})
                    assert r.status_code == 401 and err(r)["code"] == "invalid_api_key", (method, path, headers)
        nothing_reached_the_model(engine, worker)
        assert c.get("/health").status_code == 200  # no key needed
        for headers in ({"Authorization": f"Bearer {KEY}"}, {"authorization": f"bearer  {KEY} "},
                        {"X-API-Key": KEY}):
            for path in ("/stats", "/openapi.json", "/v1/models", "/docs"):
                assert c.get(path, headers=headers).status_code == 200, (path, headers)
        r = c.post(CHAT, json={"messages": HELLO, "max_tokens": 2}, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200
    assert compared and all(b == KEY.encode() for _, b in compared)  # every check went through compare_digest


def test_non_ascii_api_key(tok):
    key = "clé-secrète"
    with scripted(tok, api_key=key) as (c, _, _):
        assert c.get("/v1/models", headers={"X-API-Key": key.encode()}).status_code == 200
        assert c.get("/v1/models", headers={"X-API-Key": "cle-secrete"}).status_code == 401


def test_serve_binds_loopback_unless_told(pack, monkeypatch):
    """What `moepack serve` hands uvicorn: 127.0.0.1 without --host; another address only when asked (and then a
    warning when there is no key)."""
    from moepack.cli import main

    seen = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: seen.append(self.config.host))
    monkeypatch.delenv("MOEPACK_API_KEY", raising=False)
    r = CliRunner().invoke(main, ["serve", str(pack), "--port", "1"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["serve", str(pack), "--port", "1", "--host", "0.0.0.0"])
    assert r.exit_code == 0, r.output
    assert seen == ["127.0.0.1", "0.0.0.0"]


# ---- expert files that fail under a running server ----------------------------------------------

FOX = "The quick brown fox jumps over the lazy dog"


@pytest.fixture
def faulty(pack, tmp_path):
    """A copy of the pack served at its minimum budget (2 expert slots: every token re-reads its experts), with
    heat-profile warm start off; yields (base url, engine)."""
    copy = shutil.copytree(pack, tmp_path / "pack")
    minimum = minimum_budget(copy)
    engine = moepack.load(copy, memory_budget=minimum, heat=False)
    assert engine.plan.n_slots == 2
    with run_app(create_app(engine, Tokenizer(copy), model_id="tiny", parallel=2, close_engine=True)) as base:
        yield base, engine


def experts_used(engine, ids: list[int]) -> set:
    engine.store.heat.clear()
    engine.forward(ids, engine.make_cache())
    return set(engine.store.heat)


def break_file(kind: str, path: str, engine, monkeypatch):
    """Truncate, delete or make unreadable (EIO from the read) one expert file; returns how to restore it."""
    data = open(path, "rb").read()
    if kind == "truncated":
        os.truncate(path, len(data) // 3)
    elif kind == "deleted":
        os.remove(path)
    else:
        io = engine.store.io
        real = io.read_into

        def read_into(p, buf, offset=0):
            if p == path:
                raise OSError(errno.EIO, os.strerror(errno.EIO), p)
            return real(p, buf, offset)

        monkeypatch.setattr(io, "read_into", read_into)
        return lambda: monkeypatch.setattr(io, "read_into", real)

    def restore():
        with open(path, "wb") as f:
            f.write(data)

    return restore


@pytest.mark.parametrize("kind", ["truncated", "deleted", "eio"])
def test_a_broken_expert_file_fails_only_the_requests_that_need_it(pack, faulty, tok, kind, monkeypatch):
    base, engine = faulty
    fox = tok.encode(FOX)
    single = [[5], [7], [100]]  # one-token prompts: one forward pass, two experts per layer
    fox_experts = experts_used(engine, fox)  # the server is idle: its engine may be probed directly
    spared = set.union(*(experts_used(engine, ids) for ids in single))
    # a layer-0 expert the fox needs and the one-token prompts do not (layer 0: later layers' reads evict it
    # from the two slots before each request ends, so it is always read again)
    victim = min(k for k in fox_experts - spared if k[0] == 0)
    path = str(engine.reader.expert_file(*victim))
    ref_engine = moepack.load(pack, heat=False)  # the intact pack, every expert resident
    want_fox = reference(ref_engine, tok, fox, 4)[0]
    want_single = [reference(ref_engine, tok, ids, 1)[0] for ids in single]
    ref_engine.close()

    def complete(prompt, stream=False):
        return httpx.post(f"{base}{COMPLETIONS}", json={"prompt": prompt, "max_tokens": 4 if prompt == fox else 1,
                                                        "temperature": 0, "stream": stream}, timeout=TIMEOUT)

    assert complete(fox).json()["choices"][0]["text"] == want_fox
    restore = break_file(kind, path, engine, monkeypatch)
    # the request that needs the file: an OpenAI-shaped 500 naming it, streamed or not
    r = complete(fox)
    assert r.status_code == 500, r.text
    e = err(r)
    assert e["type"] == "server_error" and path in e["message"], e
    r = complete(fox, stream=True)
    lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and path in json.loads(lines[-2][6:])["error"]["message"]
    # requests that do not need it go on, alone or while the broken one fails beside them
    for ids, want in zip(single, want_single):
        r = complete(ids)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want, r.text
    results = {}
    threads = [threading.Thread(target=lambda p=p: results.__setitem__(str(p), complete(p))) for p in [fox, *single]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[str(fox)].status_code == 500
    assert [results[str(ids)].json()["choices"][0]["text"] for ids in single] == want_single
    # put the file back: the same request works again, with the reference answer (no stale slot or KV cache)
    restore()
    r = complete(fox)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want_fox, r.text
    s = httpx.get(f"{base}/stats", timeout=TIMEOUT).json()["server"]
    assert s["failed"] == 3 and s["active"] == 0 and s["queued"] == 0, s
    assert s["kv_caches"] <= 2  # the failed requests' caches were dropped, not kept


# ---- the event loop stays free: /health answers while a request is parsed, validated, rendered, tokenized -----

GATED = {  # the steps that take seconds on an 8 MiB body, each looked up where the server calls it
    "parse": (http_module, "parse_body"),
    "validate": (S.ChatCompletionRequest, "model_validate"),
    "render": (prompt_module, "render_chat"),
    "tokenize": (Tokenizer, "encode"),
}


@pytest.mark.parametrize("step", GATED)
def test_health_answers_while_a_request_is_being_processed(tok, monkeypatch, step):
    """Each heavy step of a chat request is held at a gate: /health must answer while it is held (on the event
    loop, the held step would stall every route until released)."""
    entered, release, expired = threading.Event(), threading.Event(), threading.Event()
    owner, name = GATED[step]
    real = getattr(owner, name)

    def gated(*args, **kwargs):
        if not entered.is_set():
            entered.set()
            if not release.wait(30):  # never released: /health could not answer while the step was held
                expired.set()
        return real(*args, **kwargs)

    engine = ScriptedEngine(tok, ["Hi there."])
    with run_app(create_app(engine, tok, model_id="tiny")) as base:
        monkeypatch.setattr(owner, name, gated)
        done = {}
        big = threading.Thread(target=lambda: done.update(r=httpx.post(
            f"{base}{CHAT}", json={"messages": HELLO, "max_tokens": 2}, timeout=TIMEOUT)))
        big.start()
        assert entered.wait(TIMEOUT), f"the request never reached {step}"
        health = httpx.get(f"{base}/health", timeout=TIMEOUT)
        held = "r" not in done and not expired.is_set()
        release.set()
        big.join(TIMEOUT)
    assert health.status_code == 200 and held, f"/health waited for the request's {step}"
    assert done["r"].status_code == 200, done["r"].text


def test_long_texts_are_tokenized_without_holding_the_gil(pack):
    """Tokenizing megabytes takes seconds; `tokenizers`' encode holds the GIL throughout, so even in a worker
    thread it stalled the event loop. Oracle without timings: with forced GIL switches off (a 100 s interval), this
    thread runs while the other is inside the tokenizer only if the tokenizer lets go of the GIL."""
    tok = Tokenizer(pack)
    text = "Hello there, how are you? " * 20_000
    want = tok._tok.encode(text, add_special_tokens=False).ids
    entered, main_ran, seen = threading.Event(), threading.Event(), []

    class Watched:  # the tokenizers object, noting on return whether this thread got to run meanwhile
        def __init__(self, real):
            self.real = real

        def __getattr__(self, name):
            f = getattr(self.real, name)

            def call(*args, **kwargs):
                out = f(*args, **kwargs)
                seen.append(main_ran.is_set())
                return out

            return call if name in ("encode", "encode_batch") else f

    tok._tok = Watched(tok._tok)
    got = {}

    def encode():
        entered.set()
        got["ids"] = tok.encode(text, add_special_tokens=False)

    old = sys.getswitchinterval()
    sys.setswitchinterval(100.0)
    try:
        t = threading.Thread(target=encode)
        t.start()
        entered.wait(TIMEOUT)
        main_ran.set()
        t.join(TIMEOUT)
    finally:
        sys.setswitchinterval(old)
    assert got["ids"] == want
    assert seen == [True], "the tokenizer held the GIL for the whole encoding"


def test_an_8mib_request_of_empty_messages(tok):
    """8 MiB of `{"messages": [{}, {}, ...]}` (2.8 million messages) froze the server for 35 s: the walk over the
    body on the event loop, then pydantic building an error for every message. Now: a 400 naming the first message
    (lists stop at their first bad item, the body is not walked node by node). That /health answers while such a
    request is worked on, without timings: test_health_answers_while_a_request_is_being_processed."""
    body = b'{"messages":[' + b",".join([b"{}"] * ((8 << 20) // 3 - 10)) + b"]}"
    assert len(body) <= 8 << 20
    engine = ScriptedEngine(tok, ["Hi there."])
    with run_app(create_app(engine, tok, model_id="tiny")) as base:
        done = {}
        big = threading.Thread(target=lambda: done.update(r=httpx.post(f"{base}{CHAT}", content=body, headers=JSON,
                                                                      timeout=TIMEOUT)))
        big.start()
        assert httpx.get(f"{base}/health", timeout=TIMEOUT).status_code == 200
        big.join(TIMEOUT)
        r = done["r"]
        assert r.status_code == 400 and err(r)["param"] == "messages.[0].role", r.text
        assert engine.seen == []
    with pytest.raises(ValidationError) as e:
        S.ChatCompletionRequest.model_validate(json.loads(body))
    assert e.value.error_count() == 1  # not 2.8 million errors, built while holding the GIL


# ---- chat templates are code from the pack --------------------------------------------------------------

HOSTILE = {  # template -> what the 400 says
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}": "did not finish within",
    '{{ "x" * 3000000000 }}': "repeats a value",
    "{{ 9 ** (9 ** 9) }}": "bits",
    '{% for i in range(100000) %}{{ "y" * 1000 }}{% endfor %}': "output is over",
}


def template_tok(pack, template: str) -> Tokenizer:
    t = Tokenizer(pack)
    t.chat_template = template
    return t


@pytest.mark.parametrize("template,says", HOSTILE.items(), ids=["nested-loops", "3GB-string", "huge-power", "output"])
def test_hostile_chat_templates_are_stopped(pack, template, says):
    """A pack's template cannot freeze the server: a render runs in a child process, killed past its time limit;
    huge values and output are refused. /health answers while it runs; the next request renders again."""
    hostile = template_tok(pack, template)
    engine = ScriptedEngine(hostile, ["Hi there."])
    with run_app(create_app(engine, hostile, model_id="tiny", render_time_limit=4)) as base:
        done = {}
        chat = threading.Thread(target=lambda: done.update(r=httpx.post(f"{base}{CHAT}", json={"messages": HELLO},
                                                                       timeout=TIMEOUT)))
        chat.start()
        assert httpx.get(f"{base}/health", timeout=TIMEOUT).status_code == 200
        chat.join(TIMEOUT)
        r = done["r"]
        assert r.status_code == 400 and err(r)["code"] == "chat_template_limit" and says in err(r)["message"], r.text
        assert engine.seen == []
        hostile.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
        r = httpx.post(f"{base}{CHAT}", json={"messages": HELLO, "max_tokens": 2}, timeout=TIMEOUT)
        assert r.status_code == 200, r.text


def test_the_render_process_is_killed_at_its_time_limit_and_memory_limit():
    renderer = Renderer(time_limit=2, memory_limit=256 << 20)
    try:
        loops = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
        with pytest.raises(TemplateLimitError, match="within 2s"):
            renderer(loops, {})
        if sys.platform.startswith("linux"):  # elsewhere only the time limit holds memory back
            doubling = ('{% set ns = namespace(s="x") %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}'
                        "{% endfor %}{{ ns.s|length }}")
            with pytest.raises(TemplateLimitError, match="memory"):
                renderer(doubling, {})
        with pytest.raises(TemplateError, match="no"):
            renderer("{{ raise_exception('no') }}", {})
        assert renderer("{{ a }}!", {"a": "ok"}) == "ok!"  # a fresh process after each kill
    finally:
        renderer.close()


def test_in_process_rendering_refuses_huge_values():
    """The CLI's chat renders in-process: the same checks (no child process, no time limit) stop huge values."""
    with pytest.raises(TemplateLimitError):
        render('{{ "x" * 3000000000 }}', {})
    with pytest.raises(TemplateLimitError):
        render("{{ [0] * 100000 * 100000 }}", {})
    assert render("{{ 'ab' * 3 }}{{ 2 ** 10 }}", {}) == "ababab1024"


# ---- deep JSON inside a tool call's arguments ---------------------------------------------------------------


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 900, 100_000])
def test_deep_tool_call_arguments_are_400(tok, depth):
    """Tool-call arguments are JSON text inside a string: held to the body's nesting limit (was a 500
    RecursionError from json, or from the template's tojson)."""
    args = "[" * depth + "]" * depth
    msgs = HELLO + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": args}}]}]
    with scripted(tok) as (c, engine, worker):
        r = c.post(CHAT, json={"messages": msgs, "max_tokens": 2})
        assert r.status_code == 400, r.text
        e = err(r)
        assert e["code"] == "invalid_json" and e["param"] == "messages.[1].tool_calls.[0].function.arguments", e
        nothing_reached_the_model(engine, worker)


# ---- real clients ---------------------------------------------------------------------------------------


def test_bodies_are_json_whatever_their_content_type(tok):
    """Clients that send no Content-Type, or curl -d's application/x-www-form-urlencoded, are read as JSON."""
    body = json.dumps({"messages": HELLO, "max_tokens": 2}).encode()
    with scripted(tok) as (c, engine, worker):
        for ctype in (None, "application/x-www-form-urlencoded", "text/plain", "application/json; charset=utf-8"):
            r = c.post(CHAT, content=body, headers={"Content-Type": ctype} if ctype else {})
            assert r.status_code == 200, (ctype, r.text)
        assert worker.counters.requests == 4


def test_any_model_name_is_served_and_aliases_are_listed(tok):
    with scripted(tok, aliases=["gpt-4o", "tiny"]) as (c, engine, worker):
        for model in ("tiny", "gpt-4o", "some-other-name"):
            r = c.post(CHAT, json={"model": model, "messages": HELLO, "max_tokens": 2})
            assert r.status_code == 200 and r.json()["model"] == "tiny", r.text
        r = c.post(COMPLETIONS, json={"model": "x", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == "tiny", r.text
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["tiny", "gpt-4o"]
        assert c.get("/v1/models/gpt-4o").json()["id"] == "gpt-4o"
        assert err(c.get("/v1/models/nope"))["code"] == "model_not_found"


def test_response_format_text_is_accepted(tok):
    with scripted(tok) as (c, engine, worker):
        r = c.post(CHAT, json={"messages": HELLO, "max_tokens": 2, "response_format": {"type": "text"}})
        assert r.status_code == 200, r.text
        r = c.post(CHAT, json={"messages": HELLO, "response_format": {"type": "grammar"}})
        assert r.status_code == 400 and err(r)["param"] == "response_format.type", r.text
        assert worker.counters.requests == 1


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def test_tools_for_a_template_without_tool_calls_are_ignored(pack, caplog):
    """Editors send tools to every model: a template that defines no tool calls renders without them (a warning
    is logged once), instead of a 400."""
    plain = template_tok(pack, "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    engine = ScriptedEngine(plain, ["Hi there."])
    with caplog.at_level(logging.WARNING, logger="moepack.serve.prompt"):
        with TestClient(create_app(engine, plain, model_id="tiny", prompt_cache=0),
                        raise_server_exceptions=False) as c:
            for tools in (None, [WEATHER], [WEATHER]):
                r = c.post(CHAT, json={"messages": HELLO, "max_tokens": 2, "tools": tools})
                assert r.status_code == 200 and r.json()["choices"][0]["message"]["tool_calls"] is None, r.text
    assert engine.seen[0] == plain.encode("<user>Hello", add_special_tokens=False)
    assert engine.seen[1] == engine.seen[0] and engine.seen[2] == engine.seen[0]  # the same prompt, tools or not
    warned = [r for r in caplog.records if "defines no tool calls" in r.getMessage()]
    assert len(warned) == 1


def test_image_parts_are_a_clear_400(tok):
    with scripted(tok) as (c, engine, worker):
        for part in ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
                     {"type": "input_audio", "input_audio": {"data": "AA", "format": "wav"}}):
            msgs = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}]
            r = c.post(CHAT, json={"messages": msgs})
            assert r.status_code == 400, r.text
            e = err(r)
            assert e["param"] == "messages.[0].content" and part["type"] in e["message"], e
            assert "text-only" in e["message"], e
        nothing_reached_the_model(engine, worker)
