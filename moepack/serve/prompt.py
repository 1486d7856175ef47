"""Chat requests as prompts: OpenAI messages and tools rendered with the pack's chat template, then tokenized.

:func:`chat_ids` is the whole step; the server runs it in a worker thread (rendering and tokenizing an 8 MiB
request takes seconds) and renders in a child process with a time limit (runtime/template.py).
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Callable

from jinja2 import TemplateError

from moepack.errors import MoepackError
from moepack.runtime.template import TemplateLimitError
from moepack.serve import schemas as S
from moepack.serve.http import APIError, parse_json
from moepack.serve.reasoning import template_kwargs
from moepack.serve.toolcalls import ToolFormat

log = logging.getLogger(__name__)

RESERVED_TEMPLATE_VARS = {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"}

Render = Callable[[str, dict[str, Any]], str]  # (template, variables) -> text: runtime.template.Renderer
_TOOLS_WARNED: weakref.WeakSet = weakref.WeakSet()  # tokenizers whose ignored tools were already logged


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
            # as strict as a request body: deep nesting would be a RecursionError in json or in the template
            args = parse_json(tc.function.arguments, "tool call arguments",
                              param=f"messages.[{i}].tool_calls.[{j}].function.arguments")
            fn = {"name": tc.function.name, "arguments": args if object_args else tc.function.arguments}
            calls.append({"id": tc.id, "type": "function", "function": fn})
        d["tool_calls"] = calls
    return d


def render_chat(tok, messages: list[S.Message], tools: list | None, kwargs: dict, render: Render | None = None) -> str:
    """The prompt for ``messages``: tool-call arguments as mappings first, as JSON text if the template fails on
    those (llama.cpp probes templates the same way). ``render``: where to render (in-process without it)."""
    attempts = [True, False] if any(m.tool_calls for m in messages) else [True]
    for object_args in attempts:
        msgs = [_template_message(i, m, object_args) for i, m in enumerate(messages)]
        try:
            if render is None:
                return tok.apply_chat_template(msgs, add_generation_prompt=True, tools=tools, **kwargs)
            return render(tok.chat_template, tok.chat_variables(msgs, add_generation_prompt=True, tools=tools, **kwargs))
        except TemplateLimitError as e:  # no second attempt: it would hit the same limit
            raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages",
                           code="chat_template_limit")
        except (TemplateError, MoepackError, TypeError, ValueError, KeyError, IndexError) as e:
            error = e
    raise APIError(400, f"the chat template rejected these messages: {error}", param="messages",
                   code="invalid_messages")


def chat_prompt(tok, tool_format: ToolFormat | None, req: S.ChatCompletionRequest,
                render: Render | None = None) -> tuple[str, ToolFormat | None]:
    """The rendered prompt of a chat request, and the tool-call format to parse its reply with (None when the
    request offers no tools, ``tool_choice`` is "none", or the template defines no tool calls: then the tools are
    ignored, as editors send them to every model, and the reply is plain text)."""
    tools, fmt = None, None
    if req.tools and req.tool_choice != "none":
        if tool_format is None:
            if tok not in _TOOLS_WARNED:
                _TOOLS_WARNED.add(tok)
                log.warning("requests send tools, but this model's chat template defines no tool calls: the tools "
                            "are left out of its prompts")
        else:
            chosen = req.tool_choice.function.name if isinstance(req.tool_choice, S.NamedToolChoice) else None
            tools = [t.model_dump(exclude_none=True) for t in req.tools if chosen in (None, t.function.name)]
            fmt = tool_format
    kwargs = dict(req.chat_template_kwargs or {})
    if clash := RESERVED_TEMPLATE_VARS & kwargs.keys():
        raise APIError(400, f"chat_template_kwargs may not set {sorted(clash)}", param="chat_template_kwargs")
    return render_chat(tok, req.messages, tools, {**template_kwargs(req), **kwargs}, render), fmt


def chat_ids(tok, tool_format: ToolFormat | None, req: S.ChatCompletionRequest,
             render: Render | None = None) -> tuple[str, list[int], ToolFormat | None]:
    """The rendered prompt, its token ids and the tool-call format (:func:`chat_prompt`)."""
    prompt, fmt = chat_prompt(tok, tool_format, req, render)
    ids = tok.encode(prompt, add_special_tokens=False)
    if not ids:
        raise APIError(400, "the rendered prompt is empty", param="messages")
    return prompt, ids, fmt
