"""The pack's tokenizer (tokenizer.json through the `tokenizers` library) and chat template.

Templates render in a bounded jinja2 sandbox set up the way transformers renders them (runtime/template.py),
so a pack's template produces the same prompt it would under transformers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2 import TemplateError
from tokenizers import Tokenizer as HFTokenizer

from moepack.errors import MoepackError, PackError
from moepack.formats.files import parse_json, read_pack_file
from moepack.runtime.template import compile_template, render

if TYPE_CHECKING:
    from moepack.formats.reader import PackReader

log = logging.getLogger(__name__)

LONG_TEXT = 1 << 16  # characters from which encoding lets other threads run


class TemplateRefused(MoepackError):
    """The chat template refused a conversation (its ``raise_exception``, or an error while rendering)."""


def _token_str(tok: Any) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


TOKENIZER_BYTES = 256 << 20  # tokenizer.json: the largest real ones (Gemma, ~34 MB) with room to spare
SIDE_BYTES = 16 << 20  # tokenizer_config.json (added tokens can be MBs), config.json, generation_config.json
TEMPLATE_BYTES = 1 << 20  # a chat template


def _side_object(data: bytes | None, where: Path, what: str) -> dict:
    if data is None:
        return {}
    d = parse_json(data, where, what)
    if type(d) is not dict:
        raise PackError(f"{where}: must be a JSON object, not {type(d).__name__}; the pack's {what} is damaged")
    return d


def _template(value: Any, where: Path) -> str | None:
    """A chat template as checkpoints store it: text, or named templates [{"name", "template"}, ...] (the
    "default" one, else the first)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                                 and isinstance(t.get("template"), str) for t in value):
        named = {t["name"]: t["template"] for t in value}
        return named.get("default", next(iter(named.values())))
    raise PackError(f"{where}: chat_template must be text or a list of {{\"name\", \"template\"}} objects, "
                    f"not {type(value).__name__}")


class Tokenizer:
    """``pack``: a directory with tokenizer.json, or a PackReader. A directory that holds a pack (manifest.json) is
    validated as one first; every file is read through the pack's containment rules (formats/files.py), and with
    ``verify`` checked against the manifest's blake3."""

    def __init__(self, pack: "str | Path | PackReader", verify: bool = False):
        from moepack.formats.reader import PackReader

        reader = pack if isinstance(pack, PackReader) else None
        root = reader.root if reader else Path(pack).expanduser()
        if reader is None and ((root / "manifest.json").exists() or (root / ".moepack").is_dir()
                               or any(root.glob("*.safetensors"))):
            reader = PackReader(root, verify=verify)  # a pack is validated; a checkpoint is told to convert

        def read(rel: str, max_bytes: int) -> bytes | None:
            if reader is not None:
                return reader.side_file(rel, max_bytes)
            try:
                return read_pack_file(root, rel, max_bytes)
            except FileNotFoundError:
                return None

        data = read("tokenizer.json", TOKENIZER_BYTES)
        if data is None:
            raise PackError(f"{root} has no tokenizer.json; convert from a checkpoint that ships one, or pass token ids")
        try:
            self._tok = HFTokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # the tokenizers library raises plain Exceptions for a malformed file
            raise PackError(f"{root / 'tokenizer.json'}: not a tokenizer the tokenizers library can load "
                            f"({str(e)[:200]})") from None
        cfg = _side_object(read("tokenizer_config.json", SIDE_BYTES), root / "tokenizer_config.json", "tokenizer config")
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        template = _template(cfg.get("chat_template"), root / "tokenizer_config.json")
        if (text := read("chat_template.jinja", TEMPLATE_BYTES)) is not None:
            try:
                template = text.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PackError(f"{root / 'chat_template.jinja'}: not UTF-8 text ({e})") from None
        elif (data := read("chat_template.json", TEMPLATE_BYTES)) is not None:
            where = root / "chat_template.json"
            template = _template(_side_object(data, where, "chat template").get("chat_template", template), where)
        self.chat_template: str | None = template
        if template:
            self._compiled(template)  # a syntax error is the pack's fault: say so before anything runs
        self.eos_token_ids = self._eos_ids(root, read)

    def _eos_ids(self, root: Path, read) -> set[int]:
        ids: set[int] = set()
        for name in ("generation_config.json", "config.json"):
            v = _side_object(read(name, SIDE_BYTES), root / name, name).get("eos_token_id")
            values = v if isinstance(v, list) else [] if v is None else [v]
            for i in values:
                if type(i) is not int or not 0 <= i < (1 << 31):
                    raise PackError(f"{root / name}: eos_token_id {str(v)[:60]} is not a token id (or a list of them)")
                ids.add(i)
        if self.eos_token is not None and (i := self._tok.token_to_id(self.eos_token)) is not None:
            ids.add(i)
        return ids

    def _compiled(self, template: str):
        """The template compiled in the bounded sandbox (runtime/template.py, cached); a syntax error is a
        PackError."""
        try:
            return compile_template(template)
        except TemplateError as e:
            raise PackError(f"the pack's chat template does not compile: {type(e).__name__}: {e}") from None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) < LONG_TEXT:
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        # encode_batch releases the GIL while it works; encode holds it throughout (seconds for megabytes of text,
        # during which no other thread of the process runs: the server's event loop, its generation worker)
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def chat_variables(self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None,
                       **kwargs: Any) -> dict[str, Any]:
        """What the chat template is rendered with, by transformers' names."""
        if not self.chat_template:
            raise PackError("this pack's tokenizer has no chat template; use a plain prompt instead of chat messages")
        return dict(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                    bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None,
                            **kwargs: Any) -> str:
        """Render ``messages`` in this process (bounded values and output, no time limit: the server renders in a
        child process, runtime/template.py); the template refusing them (``raise_exception``, a failing
        expression, a limit) is a TemplateRefused naming the template's message."""
        variables = self.chat_variables(messages, add_generation_prompt, tools, **kwargs)
        self._compiled(self.chat_template)
        try:
            return render(self.chat_template, variables)
        except (TemplateError, TypeError, ValueError, LookupError, ArithmeticError) as e:
            raise TemplateRefused(f"the chat template refused these messages: {type(e).__name__}: {e}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        """Render then tokenize; the template already carries BOS and other special tokens."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs), add_special_tokens=False)


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, holding back incomplete UTF-8 sequences.

    Decodes only a short window (the previous piece's tokens plus the new ones) and returns the text the new
    tokens add to it, so a long reply costs linear time and tokenizers that drop a leading space at the start
    of a decode still join up correctly.
    """

    def __init__(self, tok: Tokenizer, skip_special_tokens: bool = True):
        self.tok = tok
        self.skip_special_tokens = skip_special_tokens  # False keeps markers such as tool-call tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the window
        self._read = 0  # tokens before this have been turned into text

    def _delta(self) -> str:
        prefix = self.tok.decode(self.ids[self._prefix : self._read], self.skip_special_tokens)
        full = self.tok.decode(self.ids[self._prefix :], self.skip_special_tokens)
        return full[len(prefix) :]

    def push(self, token: int) -> str:
        self.ids.append(token)
        piece = self._delta()
        if not piece or piece.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return piece

    def flush(self) -> str:
        piece = self._delta()
        self._prefix = self._read = len(self.ids)
        return piece
