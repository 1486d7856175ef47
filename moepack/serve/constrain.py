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
