"""Constrained decoding: the next token is drawn only from those a grammar allows (llguidance).

Requests name what their reply must be (``response_format`` json_object or json_schema, an enforced tool call);
:class:`Grammars` compiles that into an llguidance grammar over the pack's own tokenizer, and each generation gets a
:class:`Constraint`. The mask of allowed tokens is computed on a helper thread while the forward pass for the same
position runs (``start`` before the pass, ``allowed`` after it), so it costs no time when the pass is the longer
of the two. llguidance was picked by measurement (tools/bench_grammar.py, README "Structured outputs"): tens of
microseconds per token on a 129k vocabulary, milliseconds to compile a schema, one 8 MiB wheel with no
dependencies on macOS arm64 and Linux.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# One thread computes every request's masks: each mask is short, and requests' steps come one after another.
_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moepack-grammar")

# JSON as compact as the models write it, and a reply that cannot run on forever in whitespace.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = {"type": "object"}


class GrammarError(ValueError):
    """The request's schema or grammar is invalid (the server answers 400)."""


def lark_literal(text: str) -> str:
    """A lark string literal matching ``text`` exactly."""
    return json.dumps(text, ensure_ascii=False)


def json_rule(schema: dict) -> str:
    """A lark expression for JSON valid against ``schema`` (llguidance's inline ``%json``)."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS}, ensure_ascii=False)


class Grammars:
    """Compiles grammars for one tokenizer (the pack's). The llguidance tokenizer is built on first use (about a
    second for a 129k vocabulary) and shared by every request."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._ll = None
        self._lock = threading.Lock()

    @property
    def ll_tokenizer(self):
        with self._lock:
            if self._ll is None:
                import llguidance

                raw = self.tokenizer._tok.to_str()  # the tokenizers library's own JSON
                eos = sorted(self.tokenizer.eos_token_ids)
                self._ll = llguidance.LLTokenizer(raw, eos_token=eos or None)
            return self._ll

    def special(self, text: str) -> str | None:
        """``<[id]>``, llguidance's spelling of a special token, when ``text`` is one; None otherwise."""
        i = self.tokenizer.token_to_id(text)
        if i is not None and self.ll_tokenizer.is_special_token(i):
            return f"<[{i}]>"
        return None

    def literal(self, text: str) -> str:
        """``text`` as the model writes it: its special token when it is one, else the string."""
        return self.special(text) or lark_literal(text)

    @staticmethod
    def json_schema(schema: dict | None) -> str:
        """The lark grammar of JSON valid against ``schema`` (None: any JSON object)."""
        if schema is not None and not isinstance(schema, dict):
            raise GrammarError("the JSON schema must be an object")
        return "start: " + json_rule(schema if schema is not None else ANY_OBJECT) + "\n"

    def compile(self, lark: str) -> "Constraint":
        """A fresh constraint for one generation; GrammarError (with llguidance's message) when invalid."""
        import llguidance

        tok = self.ll_tokenizer
        grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        error = llguidance.LLMatcher.validate_grammar(grammar, tok)
        if error:
            raise GrammarError(error)
        m = llguidance.LLMatcher(tok, grammar, log_level=0)
        if m.is_error():
            raise GrammarError(m.get_error())
        return Constraint(m, tok.vocab_size)


class Constraint:
    """One generation's grammar state. Per position: ``start()`` before the forward pass (the mask is computed on
    the grammar thread meanwhile), ``allowed(n)`` once the logits are there, ``accept(token)`` after the draw."""

    def __init__(self, matcher: Any, vocab: int):
        self.matcher = matcher
        self.vocab = vocab
        self.bits = np.zeros((vocab + 31) // 32, dtype=np.int32)
        self._pending: Future | None = None

    def _compute(self) -> None:
        self.matcher.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)

    def start(self) -> None:
        if self._pending is None:
            self._pending = _POOL.submit(self._compute)

    def allowed(self, n: int) -> np.ndarray:
        """Boolean [n]: which of the model's ``n`` logits may be drawn (ids past the tokenizer's never)."""
        self.start()
        self._pending.result()
        self._pending = None
        mask = np.unpackbits(self.bits.view(np.uint8), bitorder="little").astype(bool)[: self.vocab]
        if n == mask.size:
            return mask
        out = np.zeros(n, dtype=bool)
        k = min(n, mask.size)
        out[:k] = mask[:k]
        return out

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            log.warning("the grammar rejected token %d: %s", token, self.matcher.get_error())

    @property
    def done(self) -> bool:
        """The grammar is complete and nothing may follow (only an end-of-sequence token)."""
        return self.matcher.is_stopped()

    def close(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None


def response_grammar(grammars: Grammars, fmt: Any) -> str | None:
    """The lark grammar a chat request's ``response_format`` asks for; None for text (or no format)."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return grammars.json_schema(None)
    return grammars.json_schema(fmt.json_schema.schema_)


# ---- enforced tool calls ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CallSyntax:
    """How one template family writes its tool calls, as text around the parts the grammar fills in.

    ``call`` is a sequence of literals and the placeholders NAME, ARGS (the arguments as JSON), PARAMS (the
    arguments as the family's XML-like parameters, written one by one by ``param``, with KEY and VALUE), and
    INDEX (a call counter), CALL_OBJECT (the JSON object {"name", "arguments"}) or JSON_LIST (all calls as one
    JSON list of those). Literals that are special tokens of the tokenizer become those tokens. ``detect``:
    a substring of the chat template that selects this variant of the family (the first that matches wins).
    """

    open: str
    call: tuple[str, ...]
    sep: str
    close: str
    param: tuple[str, ...] = ()
    detect: str = ""
    parallel: bool = True  # several calls in one reply


NAME, ARGS, PARAMS, INDEX = "\0name", "\0args", "\0params", "\0index"
CALL_OBJECT, JSON_LIST = "\0call", "\0list"  # {"name": ..., "arguments": ...}; a JSON list of those
KEY, VALUE = "\0key", "\0value"  # in ``param``

# keyed by toolcalls.ToolFormat.name; each entry lists the family's variants, the most specific first
CALL_SYNTAX: dict[str, tuple[CallSyntax, ...]] = {
    "hermes": (CallSyntax("", ("<tool_call>\n", CALL_OBJECT, "\n</tool_call>"), "\n", ""),),
    "deepseek": (
        CallSyntax("<｜tool▁calls▁begin｜>", ("<｜tool▁call▁begin｜>", "function", "<｜tool▁sep｜>", NAME, "\n```json\n",
                                               ARGS, "\n```", "<｜tool▁call▁end｜>"), "\n", "<｜tool▁calls▁end｜>",
                   detect="```json"),  # V3
        CallSyntax("<｜tool▁calls▁begin｜>", ("<｜tool▁call▁begin｜>", NAME, "<｜tool▁sep｜>", ARGS, "<｜tool▁call▁end｜>"),
                   "", "<｜tool▁calls▁end｜>"),  # V3.1 and later
    ),
    "kimi_k2": (CallSyntax("<|tool_calls_section_begin|>", ("<|tool_call_begin|>", "functions.", NAME, ":", INDEX,
                                                             "<|tool_call_argument_begin|>", ARGS, "<|tool_call_end|>"),
                           "", "<|tool_calls_section_end|>"),),
    "glm4_moe": (CallSyntax("", ("<tool_call>", NAME, "\n", PARAMS, "</tool_call>"), "\n", "",
                            ("<arg_key>", KEY, "</arg_key>\n<arg_value>", VALUE, "</arg_value>\n")),),
    "minimax_m2": (CallSyntax("<minimax:tool_call>\n", ('<invoke name="', NAME, '">\n', PARAMS, "</invoke>"), "\n",
                              "\n</minimax:tool_call>", ('<parameter name="', KEY, '">', VALUE, "</parameter>\n")),),
    "qwen3_coder": (CallSyntax("", ("<tool_call>\n<function=", NAME, ">\n", PARAMS, "</function>\n</tool_call>"), "\n",
                               "", ("<parameter=", KEY, ">\n", VALUE, "\n</parameter>\n")),),
    "mistral": (CallSyntax("", ("[TOOL_CALLS]", NAME, "[ARGS]", ARGS), "", "", detect="[ARGS]"),  # v11 and later
                CallSyntax("[TOOL_CALLS]", (JSON_LIST,), "", "")),  # v3: one JSON list of calls
    # gpt-oss: the generation prompt ends with <|start|>assistant; <|call|> (an end token) closes the call
    "harmony": (CallSyntax("", ("<|channel|>", "commentary to=functions.", NAME, " ", "<|constrain|>", "json",
                                "<|message|>", ARGS), "", "", parallel=False),),
}


def _call_object(tool: dict) -> dict:
    """JSON schema of {"name": ..., "arguments": ...} for one tool (hermes' and Mistral v3's calls)."""
    fn = tool["function"]
    return {"type": "object", "properties": {"name": {"const": fn["name"]},
                                             "arguments": fn.get("parameters") or ANY_OBJECT},
            "required": ["name", "arguments"], "additionalProperties": False}


def syntax_for(fmt_name: str, template: str | None) -> CallSyntax | None:
    variants = CALL_SYNTAX.get(fmt_name, ())
    return next((v for v in variants if not v.detect or (template and v.detect in template)), None)


def tool_grammar(grammars: Grammars, syntax: CallSyntax, tools: list[dict], parallel: bool) -> str:
    """The lark grammar of a reply that is nothing but tool calls to ``tools`` (one, or with ``parallel`` one or
    more), in ``syntax``."""
    lit = grammars.literal
    many = parallel and syntax.parallel
    if syntax.call == (JSON_LIST,):  # the calls are one JSON list
        items = {"anyOf": [_call_object(t) for t in tools]}
        return f"start: {lit(syntax.open)} " + json_rule({"type": "array", "items": items, "minItems": 1,
                                                          **({} if many else {"maxItems": 1})}) + "\n"
    rules, alts = [], []
    for i, tool in enumerate(tools):
        fn = tool["function"]
        schema = fn.get("parameters") or ANY_OBJECT
        parts = []
        for piece in syntax.call:
            if piece == NAME:
                parts.append(lark_literal(fn["name"]))
            elif piece == ARGS:
                parts.append(json_rule(schema))
            elif piece == INDEX:
                parts.append("/[0-9]{1,4}/")
            elif piece == CALL_OBJECT:
                parts.append(json_rule(_call_object(tool)))
            elif piece == PARAMS:
                parts.append(_params_rule(syntax, schema, lit))
            else:
                parts.append(lit(piece))
        rules.append(f"call_{i}: " + " ".join(p for p in parts if p))
        alts.append(f"call_{i}")
    sep = lit(syntax.sep) if syntax.sep else ""
    body = f"call ({sep} call)*" if many else "call"
    head = " ".join(x for x in (lit(syntax.open) if syntax.open else "", body,
                                lit(syntax.close) if syntax.close else "") if x)
    return "\n".join([f"start: {head}", "call: " + " | ".join(alts), *rules]) + "\n"


def _params_rule(syntax: CallSyntax, schema: dict, lit) -> str:
    """Parameters written one by one (GLM, MiniMax, Qwen3-Coder): each value as JSON valid for its own schema,
    required ones in schema order, the others optional."""
    props: dict = schema.get("properties") or {}
    required = set(schema.get("required") or [])
    out = []
    for key, sub in props.items():
        parts = []
        for piece in syntax.param:
            if piece == KEY:
                parts.append(lark_literal(key))
            elif piece == VALUE:
                parts.append(json_rule(sub if isinstance(sub, dict) else {}))
            else:
                parts.append(lit(piece))
        one = "(" + " ".join(parts) + ")"
        out.append(one if key in required else one + "?")
    return " ".join(out) if out else ""


def request_grammar(grammars: Grammars, req: Any, tool_format: Any, template: str | None) -> str | None:
    """The grammar a chat request's reply must follow: tool calls when ``tool_choice`` is "required" or names a
    function (in the template family's own call syntax), else what ``response_format`` asks for; None: free text."""
    choice = req.tool_choice
    named = getattr(getattr(choice, "function", None), "name", None)
    if req.tools and (choice == "required" or named):
        syntax = syntax_for(tool_format.name, template) if tool_format is not None else None
        if syntax is None:
            raise GrammarError(f"tool calls cannot be enforced for this model's template "
                               f"({tool_format.name if tool_format else 'no tool-call format'}); use tool_choice auto")
        tools = [t.model_dump(exclude_none=True) for t in req.tools if named in (None, t.function.name)]
        return tool_grammar(grammars, syntax, tools, req.parallel_tool_calls is not False)
    return response_grammar(grammars, req.response_format)
