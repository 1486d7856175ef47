"""The pack's tokenizer (tokenizer.json through the `tokenizers` library) and chat template.

Templates render in a bounded jinja2 sandbox set up the way transformers renders them (runtime/template.py),
so a pack's template produces the same prompt it would under transformers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from moepack.errors import PackError
from moepack.runtime.template import render

log = logging.getLogger(__name__)

LONG_TEXT = 1 << 16  # characters from which encoding lets other threads run


def _token_str(tok: Any) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class Tokenizer:
    def __init__(self, pack: str | Path):
        root = Path(pack)
        path = root / "tokenizer.json"
        if not path.is_file():
            raise PackError(f"{root} has no tokenizer.json; convert from a checkpoint that ships one, or pass token ids")
        self._tok = HFTokenizer.from_file(str(path))
        cfg = json.loads((root / "tokenizer_config.json").read_text()) if (root / "tokenizer_config.json").is_file() else {}
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        template = cfg.get("chat_template")
        if (root / "chat_template.jinja").is_file():
            template = (root / "chat_template.jinja").read_text()
        elif (root / "chat_template.json").is_file():
            template = json.loads((root / "chat_template.json").read_text()).get("chat_template", template)
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))
        self.chat_template: str | None = template
        self.eos_token_ids = self._eos_ids(root)

    def _eos_ids(self, root: Path) -> set[int]:
        ids: set[int] = set()
        for name in ("generation_config.json", "config.json"):
            p = root / name
            if p.is_file():
                v = json.loads(p.read_text()).get("eos_token_id")
                if isinstance(v, int):
                    ids.add(v)
                elif isinstance(v, list):
                    ids.update(int(i) for i in v)
        if self.eos_token is not None and (i := self._tok.token_to_id(self.eos_token)) is not None:
            ids.add(i)
        return ids

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
        return render(self.chat_template, self.chat_variables(messages, add_generation_prompt, tools, **kwargs))

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
