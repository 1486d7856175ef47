"""Reasoning models' replies split in two: the thinking section goes to ``reasoning_content``, the answer to
``content`` (streamed as their own delta fields), as DeepSeek's and vLLM's APIs do.

Each template family marks its thinking its own way; :data:`FORMATS` lists them as data: the substring of the chat
template that identifies the family, the markers around the thinking, and control text that opens the answer.
Whether a reply starts inside the thinking is read from the rendered prompt (DeepSeek-R1's ends with ``<think>``;
Qwen3's with thinking turned off ends with an empty ``<think></think>``). A request turns thinking off with
``reasoning_effort: "none"`` or ``chat_template_kwargs`` (``enable_thinking``, ``thinking``), where the template
supports it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from moepack.runtime.generation import held_back


@dataclass(frozen=True)
class ReasoningFormat:
    name: str
    detect: str  # found in the chat template of this family
    open: str  # opens the thinking
    close: str  # ends it
    after_close: str = ""  # control text the model writes between the thinking and the answer's own opening
    answer_open: str = ""  # opens the answer (control text, not content)


# Order matters: a template is matched by the first ``detect`` it contains.
FORMATS: tuple[ReasoningFormat, ...] = (
    # gpt-oss (harmony): <|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final<|message|>...
    ReasoningFormat("harmony", "<|channel|>", "<|channel|>analysis<|message|>", "<|end|>", "<|start|>assistant",
                    "<|channel|>final<|message|>"),
    # DeepSeek-R1 / V3.1+, Qwen3, GLM-4.5+, Kimi K2 thinking, MiniMax-M2
    ReasoningFormat("think", "</think>", "<think>", "</think>"),
)


def format_for(template: str | None) -> ReasoningFormat | None:
    """The reasoning format a chat template uses, or None when it has no thinking section."""
    if not template:
        return None
    return next((f for f in FORMATS if f.detect in template), None)


def starts_inside(fmt: ReasoningFormat, prompt: str) -> bool:
    """Whether the reply begins inside the thinking: the prompt opened it and did not close it."""
    i = prompt.rfind(fmt.open)
    return i >= 0 and prompt.find(fmt.close, i + len(fmt.open)) < 0 and not prompt[i + len(fmt.open):].strip()


def template_kwargs(req: Any) -> dict:
    """Template variables a request's reasoning options set (its own ``chat_template_kwargs`` win):
    ``reasoning_effort`` as gpt-oss's templates read it; "none" turns thinking off for Qwen3 / GLM
    (``enable_thinking``) and DeepSeek-V3.1 (``thinking``)."""
    effort = getattr(req, "reasoning_effort", None)
    if effort is None:
        return {}
    if effort == "none":
        return {"enable_thinking": False, "thinking": False}
    return {"reasoning_effort": "low" if effort == "minimal" else effort, "enable_thinking": True, "thinking": True}


class ReasoningSplit:
    """Text deltas in, (reasoning, content) deltas out. Markers are never emitted; text that may still become a
    marker is held back until it is decided."""

    def __init__(self, fmt: ReasoningFormat, inside: bool = False):
        self.fmt = fmt
        self.state = "reasoning" if inside else "start"  # start -> reasoning -> answer -> content
        self.buf = ""
        self.reasoning = ""  # everything emitted as reasoning (for the non-streamed reply)

    def _opening(self, final: bool, markers: tuple[str, ...]) -> str | None:
        """At the start of the reply or of the answer: the marker the buffer opens with (consumed), "" when it opens
        with none, None while undecided."""
        s = self.buf.lstrip()
        if not s and not final:  # blank so far: a marker may follow
            return None
        if not final and any(len(m) > len(s) and m.startswith(s) for m in markers):
            return None  # may still become (a longer) one
        for m in sorted(markers, key=len, reverse=True):
            if m and s.startswith(m):
                self.buf = s[len(m):]
                return m
        return ""

    def push(self, text: str, final: bool = False) -> tuple[str, str]:
        self.buf += text
        f = self.fmt
        r, c = "", ""
        while True:
            if self.state == "start":
                got = self._opening(final, (f.open, f.answer_open))
                if got is None:
                    break
                self.state = "reasoning" if got == f.open else "content"
            elif self.state == "reasoning":
                i = self.buf.find(f.close)
                if i >= 0:
                    r, self.buf, self.state = r + self.buf[:i], self.buf[i + len(f.close):], "answer"
                    continue
                keep = 0 if final else held_back(self.buf, [f.close])
                r, self.buf = r + self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                break
            elif self.state == "answer":  # control text before the answer, and the blank lines after </think>
                got = self._opening(final, (f.after_close + f.answer_open, f.answer_open, f.after_close))
                if got is None:
                    break
                self.buf = self.buf.lstrip() if got == "" else self.buf
                self.state = "content"
            else:
                c, self.buf = c + self.buf, ""
                break
        self.reasoning += r
        return r, c

    def finish(self) -> tuple[str, str]:
        return self.push("", final=True)


def split(fmt: ReasoningFormat | None, prompt: str, text: str) -> tuple[str | None, str]:
    """A whole reply as (reasoning or None, content)."""
    if fmt is None:
        return None, text
    s = ReasoningSplit(fmt, starts_inside(fmt, prompt))
    r1, c1 = s.push(text)
    r2, c2 = s.finish()
    return (r1 + r2) or None, c1 + c2


_START = re.compile(r"^start:", re.M)


def with_thinking(fmt: ReasoningFormat, lark: str, inside: bool, literal, answer_open: bool = True) -> str:
    """A grammar for the answer (``lark``, its rule ``start``) that lets the reply think first: the thinking is free
    text up to the closing marker. ``literal`` spells a marker as the tokenizer writes it (serve/constrain.py);
    ``answer_open``: the answer opens with the format's marker (harmony's final channel; not for tool calls, which
    open their own channel)."""
    body = _START.sub("answer:", lark, count=1)
    opening = "" if inside else literal(fmt.open) + " "
    after = " " + literal(fmt.after_close) if fmt.after_close else ""
    close = literal(fmt.close)
    if close.startswith("<["):  # a special token: free text cannot run into it
        think = f"think: {opening}/(.|\\n)*/ {close}{after}"
    else:  # a lazy terminal: the thinking ends at the first closing marker
        think = f"think: {opening}thought{after}\nthought[lazy]: /(.|\\n)*/ {close}"
    lead = f"{literal(fmt.answer_open)} " if answer_open and fmt.answer_open else ""
    return f"start: think{'' if inside else '?'} /[ \\n]*/ {lead}answer\n{think}\n{body}"
