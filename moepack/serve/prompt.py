"""Chat requests as prompts: OpenAI messages and tools rendered with the pack's chat template."""

from __future__ import annotations

import json
from typing import Any

from jinja2 import TemplateError

from moepack.errors import MoepackError
from moepack.serve import schemas as S
from moepack.serve.http import APIError
from moepack.serve.reasoning import template_kwargs
from moepack.serve.toolcalls import ToolFormat

RESERVED_TEMPLATE_VARS = {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"}


def _template_message(i: int, m: S.Message, object_args: bool = True) -> dict:
    """An OpenAI message as chat templates expect it; tool-call arguments parsed into a mapping unless
    ``object_args`` is False (templates differ: GLM iterates ``arguments.items()``, DeepSeek-V3 concatenates
    the JSON text)."""
    d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text() or ""}
    for k in ("name", "tool_call_id", "reasoning_content"):
        if getattr(m, k) is not None:
            d[k] = getattr(m, k)
    if m.tool_calls:
        calls = []
        for j, tc in enumerate(m.tool_calls):
            try:
                args = json.loads(tc.function.arguments)
            except ValueError:
                raise APIError(400, "tool call arguments must be JSON text",
                               param=f"messages.[{i}].tool_calls.[{j}].function.arguments", code="invalid_value")
            fn = {"name": tc.function.name, "arguments": args if object_args else tc.function.arguments}
            calls.append({"id": tc.id, "type": "function", "function": fn})
        d["tool_calls"] = calls
    return d


def render_chat(tok, messages: list[S.Message], tools: list | None, kwargs: dict) -> str:
    """The prompt for ``messages``: tool-call arguments as mappings first, as JSON text if the template fails on
    those (llama.cpp probes templates the same way)."""
    attempts = [True, False] if any(m.tool_calls for m in messages) else [True]
    for object_args in attempts:
        msgs = [_template_message(i, m, object_args) for i, m in enumerate(messages)]
        try:
            return tok.apply_chat_template(msgs, add_generation_prompt=True, tools=tools, **kwargs)
        except (TemplateError, MoepackError, TypeError, ValueError, KeyError, IndexError) as e:
            error = e
    raise APIError(400, f"the chat template rejected these messages: {error}", param="messages",
                   code="invalid_messages")


def chat_prompt(tok, tool_format: ToolFormat | None, req: S.ChatCompletionRequest) -> tuple[str, ToolFormat | None]:
    """The rendered prompt of a chat request, and the tool-call format to parse its reply with (None when the
    request offers no tools, or ``tool_choice`` is "none": then the reply is plain text)."""
    tools, fmt = None, None
    if req.tools and req.tool_choice != "none":
        if tool_format is None:
            raise APIError(400, "this model's chat template defines no tool calls", param="tools",
                           code="tools_unsupported")
        chosen = req.tool_choice.function.name if isinstance(req.tool_choice, S.NamedToolChoice) else None
        tools = [t.model_dump(exclude_none=True) for t in req.tools if chosen in (None, t.function.name)]
        fmt = tool_format
    kwargs = dict(req.chat_template_kwargs or {})
    if clash := RESERVED_TEMPLATE_VARS & kwargs.keys():
        raise APIError(400, f"chat_template_kwargs may not set {sorted(clash)}", param="chat_template_kwargs")
    return render_chat(tok, req.messages, tools, {**template_kwargs(req), **kwargs}), fmt
