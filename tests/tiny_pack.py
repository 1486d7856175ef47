"""A tiny Qwen3-MoE pack (random weights, trained BPE tokenizer, Qwen2.5-style template with tools) for the
server and chat tests, a scripted engine that writes a given reply, and a reference generator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moepack.runtime.generation import Generation, TextStream
from moepack.runtime.sampling import SamplingParams

# Qwen2.5's template (tools in the system turn, calls as JSON in <tool_call> tags, results in <tool_response>).
QWEN_TOOLS_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


def build_pack(root: Path) -> Path:
    """Write and convert a ~0.5 MB Qwen3-MoE checkpoint whose vocabulary is exactly the tokenizer's."""
    from moepack.convert.pipeline import convert
    from moepack.demo import SyntheticSpec, write_checkpoint, write_tokenizer

    probe = root / "probe"
    probe.mkdir(parents=True)
    write_tokenizer(probe, 512)
    vocab = len(json.loads((probe / "tokenizer.json").read_text())["model"]["vocab"])
    spec = SyntheticSpec(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                         vocab_size=vocab, seed=3)
    ckpt = write_checkpoint(root / "ckpt", spec)
    cfg_path = ckpt / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = QWEN_TOOLS_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return convert(str(ckpt), root / "tiny-pack", progress=False, workers=1)


def reference(engine, tok, ids: list[int], max_tokens: int, params: SamplingParams = SamplingParams(),
              stop: tuple[str, ...] = (), skip_special_tokens: bool = True) -> tuple[str, list[int]]:
    """What a fresh generation (own KV cache, no server) writes: (text, token ids). The server keeps special
    tokens in chat replies when the template defines tool calls (their markers may be special tokens)."""
    gen = Generation(engine, ids, max_tokens, params, tok.eos_token_ids)
    text = TextStream(tok, stop, skip_special_tokens)
    out = []
    for s in gen:
        out.append(s.token)
        if s.token not in tok.eos_token_ids:
            text.push(s.token)
        if text.stopped:
            break
    text.flush()
    return text.text, out


class FakeCache:
    def __init__(self):
        self.tokens: list[int] = []

    @property
    def offset(self) -> int:
        return len(self.tokens)

    def trim(self, n: int) -> None:
        del self.tokens[len(self.tokens) - n:]


class ScriptedEngine:
    """Stands in for Engine: after any prompt it writes ``replies[i]`` for the i-th prompt it sees (then EOS).

    The next token is the one that continues the longest part of the script the fed tokens end with, so it works
    with prefix-cache reuse like a real model would.
    """

    def __init__(self, tok, replies: list[str], vocab: int | None = None):
        self.tok = tok
        self.vocab = vocab or tok.vocab_size
        eos = min(tok.eos_token_ids)
        self.scripts = [tok.encode(r, add_special_tokens=False) + [eos] for r in replies]
        self.prompts = 0
        self.config = {"max_position_embeddings": 4096}
        self.seen: list[list[int]] = []  # prompts as fed, for assertions

    def make_cache(self) -> list[FakeCache]:
        return [FakeCache()]

    def forward(self, ids, cache, logits: str = "last") -> np.ndarray:
        """The engine interface: logits [1, vocab] of the last position fed."""
        return self.prefill(ids, cache)[None]

    def prefill(self, ids, cache) -> np.ndarray:
        c = cache[0]
        if len(ids) > 1 or not c.tokens:  # a new prompt (a decode step feeds one token)
            script = self.scripts[min(self.prompts, len(self.scripts) - 1)]
            self.prompts += 1
            c.script = script
            self.seen.append(c.tokens + list(ids))
        c.tokens += list(ids)
        script = c.script
        k = next(k for k in range(len(script) - 1, -1, -1) if k == 0 or c.tokens[-k:] == script[:k])
        logits = np.full(self.vocab, -10.0, dtype=np.float32)
        logits[script[k]] = 10.0
        return logits

    def stats(self) -> dict:
        return {"tokens": 0, "bytes_read": 0}
