"""Tool calls in generated text, per chat-template family, as data.

Each family's template teaches the model one way of writing a call; :data:`FORMATS` lists them, each with the
substring that identifies the template, the marker that opens the calls, regexes for one call and how its
arguments are spelled. :func:`format_for` picks a format from a pack's template; :func:`parse` splits a
finished reply into content and OpenAI ``tool_calls``; :class:`ToolCallStream` does the same while
streaming (content flows until the opening marker, the calls come at the end).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from moepack.runtime.generation import held_back


@dataclass(frozen=True)
class ToolFormat:
    name: str
    detect: str  # found in the chat template when it writes calls this way
    start: str  # opens the tool-call part of a reply
    calls: tuple[str, ...]  # regexes for one call, with groups (name, args) or (json)
    args: str  # how arguments are spelled: a key of ARG_PARSERS
    noise: str | None = None  # a regex of control text removed from the content before the calls


def _json_or_text(v: str) -> Any:
    try:
        return json.loads(v)
    except (ValueError, RecursionError):
        return v


def _xml_params(pattern: str) -> Callable[[str], dict]:
    rx = re.compile(pattern, re.S)
    return lambda s: {m.group(1).strip(): _json_or_text(m.group(2).strip()) for m in rx.finditer(s)}


ARG_PARSERS: dict[str, Callable[[str], Any]] = {
    "json": lambda s: json.loads(s),
    "glm": _xml_params(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>"),
    "minimax": _xml_params(r'<parameter name="([^"]+)">(.*?)</parameter>'),
    "qwen3_coder": _xml_params(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>"),
}

# Order matters: a template is matched by the first ``detect`` it contains (GLM's also contains "<tool_call>").
FORMATS: tuple[ToolFormat, ...] = (
    ToolFormat("minimax_m2", "<minimax:tool_call>", "<minimax:tool_call>",
               (r'<invoke name="(?P<name>[^"]+)">(?P<args>.*?)</invoke>',), "minimax"),
    ToolFormat("glm4_moe", "<arg_key>", "<tool_call>",
               (r"<tool_call>\s*(?P<name>[^\n<]+?)\s*(?P<args>(?:<arg_key>.*?)?)</tool_call>",), "glm"),
    ToolFormat("kimi_k2", "<|tool_calls_section_begin|>", "<|tool_calls_section_begin|>",
               (r"<\|tool_call_begin\|>\s*(?:functions\.)?(?P<name>[^\s:<]+)(?::\d+)?\s*"
                r"<\|tool_call_argument_begin\|>(?P<args>.*?)<\|tool_call_end\|>",), "json"),
    ToolFormat("deepseek", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁begin｜>",
               (r"<｜tool▁call▁begin｜>function<｜tool▁sep｜>(?P<name>[^\n]+)\n```(?:json)?\n(?P<args>.*?)\n```"
                r"\s*<｜tool▁call▁end｜>",  # V3
                r"<｜tool▁call▁begin｜>(?P<name>[^<]+?)<｜tool▁sep｜>(?P<args>.*?)<｜tool▁call▁end｜>"),  # V3.1
               "json"),
    ToolFormat("mistral", "[TOOL_CALLS]", "[TOOL_CALLS]",
               (r"\[TOOL_CALLS\]\s*(?P<json>\[.*\])",  # v3: a JSON list of {"name", "arguments"}
                r"\[TOOL_CALLS\](?P<name>[^\[\s]+)\[ARGS\](?P<args>\{.*?\})(?=\[TOOL_CALLS\]|</s>|$)"),  # v11+
               "json"),
    ToolFormat("harmony", "<|channel|>", "to=functions.",  # gpt-oss; <|call|> ends the turn (an EOS token)
               (r"to=functions\.(?P<name>[^\s<]+)(?:<\|channel\|>)?[^<]*(?:<\|constrain\|>[^<]*)?<\|message\|>"
                r"(?P<args>.*?)(?:<\|call\|>|$)",), "json",
               r"<\|start\|>assistant|<\|channel\|>\w+|<\|message\|>|<\|end\|>"),
    ToolFormat("qwen3_coder", "<function=", "<tool_call>",  # Qwen3-Coder, Qwen3-Next variants: XML parameters
               (r"<function=(?P<name>[^>\n]+)>(?P<args>.*?)</function>",), "qwen3_coder"),
    ToolFormat("hermes", "<tool_call>", "<tool_call>",  # Qwen2.5, Qwen3 and others: JSON inside <tool_call> tags
               (r"<tool_call>\s*(?P<json>\{.*?\})\s*</tool_call>",), "json"),
)


def format_for(template: str | None) -> ToolFormat | None:
    """The tool-call format a chat template teaches, or None when it defines none."""
    if not template:
        return None
    return next((f for f in FORMATS if f.detect in template), None)


def _call(name: str, arguments: Any) -> dict:
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name.strip(), "arguments": arguments}}


def _from_json(obj: Any) -> list[dict]:
    objs = obj if isinstance(obj, list) else [obj]
    out = []
    for o in objs:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise ValueError("a tool call needs a name")
        out.append(_call(o["name"], o.get("arguments", o.get("parameters", {}))))
    return out


def parse(text: str, fmt: ToolFormat | None) -> tuple[str | None, list[dict]]:
    """Split a reply into (content before the calls or None, OpenAI tool_calls). Text whose calls do not parse
    is returned whole as content, as vLLM and llama.cpp do: a malformed call is the model's answer."""
    if fmt is None or fmt.start not in text:
        return text, []
    head, _, _ = text.partition(fmt.start)
    section = text[len(head):]
    calls: list[dict] = []
    try:
        for pattern in fmt.calls:
            for m in re.finditer(pattern, section, re.S):
                g = m.groupdict()
                if g.get("json") is not None:
                    calls += _from_json(json.loads(g["json"]))
                else:
                    calls.append(_call(g["name"], ARG_PARSERS[fmt.args](g["args"].strip() or "{}")))
            if calls:
                break
    except (ValueError, RecursionError):  # RecursionError: JSON nested too deep for Python's parser
        calls = []
    if not calls:
        return text, []
    if fmt.noise:
        head = re.sub(fmt.noise, "", head)
    head = head.strip()
    return head or None, calls


class ToolCallStream:
    """Streaming: pass content through until ``fmt.start`` appears; hold the rest and parse it at the end."""

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self.pending = ""
        self.section: str | None = None  # text from the opening marker on, once seen
        self.sent = 0  # calls already handed out by ``complete``

    def complete(self) -> list[dict]:
        """Calls of the section that are complete and not yet handed out (each once, with a stable id)."""
        if self.section is None:
            return []
        _, calls = parse(self.section, self.fmt)
        new = calls[self.sent :]
        self.sent += len(new)
        return new

    def push(self, piece: str) -> str:
        if self.section is not None:
            self.section += piece
            return ""
        buf = self.pending + piece
        i = buf.find(self.fmt.start)
        if i >= 0:
            self.section, self.pending = buf[i:], ""
            return buf[:i]
        keep = held_back(buf, [self.fmt.start])
        self.pending = buf[len(buf) - keep:]
        return buf[: len(buf) - keep]

    def finish(self) -> tuple[str, list[dict]]:
        """(content still to send, tool calls); an unparseable section is sent as content."""
        rest, self.pending = self.pending, ""
        if self.section is None:
            return rest, []
        content, calls = parse(self.section, self.fmt)
        if self.sent:  # calls were streamed already: the rest of them (a broken tail is dropped)
            return rest, calls[self.sent :]
        return (rest, calls) if calls else (rest + self.section, [])
