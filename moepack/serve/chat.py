"""``moepack chat``: a terminal REPL over a pack, in the manner of ``mlx_lm.chat`` and ``ollama run``.

:class:`ChatSession` keeps the conversation and its KV cache: every turn renders the whole conversation with
the pack's chat template and prefills only the tokens the cache does not already hold. :func:`repl` is the
loop around it: commands, multi-line input between triple quotes, Ctrl-C stops a reply (keeping what came
so far and the session), Ctrl-D exits.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Iterator, TextIO

from moepack.runtime.generation import Generation, PromptCache, TextStream
from moepack.runtime.sampling import SamplingParams
from moepack.serve.reasoning import ReasoningSplit, starts_inside
from moepack.serve.reasoning import format_for as reasoning_for
from moepack.units import human_bytes

HELP = """Commands:
  /help                 this help
  /reset                forget the conversation (keeps the system message)
  /system [TEXT]        set the system message (no TEXT: show it; /system "" clears it)
  /set [NAME VALUE]     set a sampling option (no arguments: show them all):
                        temp, top_p, top_k, min_p, repetition_penalty, presence_penalty,
                        frequency_penalty, seed (or "none"), max_tokens
  /think [on|off]       show or hide a thinking model's reasoning (shown dimmed; never kept in the conversation)
  /stats                conversation length, cache and I/O figures
  /quit                 exit (also /exit, /bye, Ctrl-D)
Multi-line input: a line with only \"\"\" starts it and another ends it.
Ctrl-C stops the reply being written; the conversation goes on."""

DIM, UNDIM = "\x1b[2m", "\x1b[0m"  # reasoning is printed dimmed

# /set names -> (SamplingParams field or "max_tokens", parser)
OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "temp": ("temperature", float),
    "temperature": ("temperature", float),
    "top_p": ("top_p", float),
    "top_k": ("top_k", int),
    "min_p": ("min_p", float),
    "repetition_penalty": ("repetition_penalty", float),
    "repeat_penalty": ("repetition_penalty", float),
    "presence_penalty": ("presence_penalty", float),
    "frequency_penalty": ("frequency_penalty", float),
    "seed": ("seed", lambda v: None if v.lower() == "none" else int(v)),
    "max_tokens": ("max_tokens", int),
}
RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0), "top_p": (1e-9, 1.0), "top_k": (0, 1 << 31), "min_p": (0.0, 1.0),
    "repetition_penalty": (1e-9, 10.0), "presence_penalty": (-2.0, 2.0), "frequency_penalty": (-2.0, 2.0),
    "max_tokens": (1, 1 << 31),
}


@dataclass
class TurnStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated: int = 0
    prompt_s: float = 0.0
    gen_s: float = 0.0
    bytes_read: int = 0
    tokens_forwarded: int = 0
    hits: int = 0
    lookups: int = 0
    interrupted: bool = False

    def line(self) -> str:
        tps = (self.generated - 1) / self.gen_s if self.generated > 1 and self.gen_s > 0 else 0.0
        per_tok = self.bytes_read / self.tokens_forwarded if self.tokens_forwarded else 0
        hit = self.hits / self.lookups if self.lookups else 0.0
        return (f"[{self.generated} tokens, {tps:.1f} tok/s | prompt {self.prompt_tokens} tokens "
                f"({self.cached_tokens} cached) | read {human_bytes(per_tok)}/token | hit rate {hit:.0%}"
                f"{' | stopped' if self.interrupted else ''}]")


class Turn:
    """One reply being generated: iterate for text pieces, then ``finish()`` (also after a KeyboardInterrupt)."""

    def __init__(self, session: "ChatSession", prompt: list[int]):
        self.session = session
        cache, reused = session.cache.take(prompt, session.engine.make_cache)
        self.gen = Generation(session.engine, prompt, session.max_tokens_for(len(prompt)), session.params,
                              session.tokenizer.eos_token_ids, cache, reused)
        fmt = session.reasoning  # a thinking model: its markers must stay in the text to be split off
        self.text = TextStream(session.tokenizer, skip_special_tokens=fmt is None)
        tail = session.tokenizer.decode(prompt[-16:], skip_special_tokens=False) if fmt else ""
        self.split = ReasoningSplit(fmt, starts_inside(fmt, tail)) if fmt else None
        self.answer = ""  # the reply without its reasoning: what the conversation keeps
        self.dimmed = False  # reasoning is being printed (dimmed)
        self.stats = TurnStats(prompt_tokens=len(prompt), cached_tokens=reused)
        self._before = session.engine.stats()
        self._t0 = time.perf_counter()
        self._first: float | None = None
        self.finished = False

    def __iter__(self) -> Iterator[str]:
        for s in self.gen:
            if self._first is None:
                self._first = time.perf_counter()
            if s.token in self.session.tokenizer.eos_token_ids:
                break
            yield from self._show(self.text.push(s.token))
        yield from self._show(self.text.flush(), final=True)

    def _show(self, piece: str, final: bool = False) -> Iterator[str]:
        """Text to print: the answer as it comes, the reasoning dimmed (or nothing, when hidden)."""
        if self.split is None:
            self.answer += piece
            if piece:
                yield piece
            return
        thought, text = self.split.push(piece, final)
        if thought and self.session.show_reasoning:
            yield ("" if self.dimmed else DIM) + thought
            self.dimmed = True
        if self.dimmed and (text or final):
            yield UNDIM
            self.dimmed = False
        self.answer += text
        if text:
            yield text

    def fail(self) -> None:
        """The reply failed (an expert that cannot be read): forget the question and this turn's KV cache (its
        layers may hold part of a step), keep the conversation before it."""
        if not self.finished:
            self.finished = True
            self.session.messages.pop()

    def finish(self, interrupted: bool = False) -> TurnStats:
        """Keep the reply (even a partial one) and the KV cache for the next turn."""
        if self.finished:
            return self.stats
        self.finished = True
        end = time.perf_counter()
        self.gen.settle()
        self.session.cache.put(self.gen.tokens, self.gen.cache)
        if interrupted:
            for _ in self._show(self.text.flush(), final=True):
                pass
        reply = self.answer
        if reply or not interrupted:
            self.session.messages.append({"role": "assistant", "content": reply})
        else:  # stopped before a word: as if the question was never asked
            self.session.messages.pop()
        after = self.session.engine.stats()
        st = self.stats
        st.generated, st.interrupted = len(self.gen.generated), interrupted
        st.prompt_s = (self._first or end) - self._t0
        st.gen_s = end - (self._first or end)
        st.bytes_read = after.get("bytes_read", 0) - self._before.get("bytes_read", 0)
        st.tokens_forwarded = after.get("tokens", 0) - self._before.get("tokens", 0)
        st.hits = after.get("hits", 0) - self._before.get("hits", 0)
        st.lookups = st.hits + after.get("misses", 0) - self._before.get("misses", 0)
        self.session.turns.append(st)
        return st


class ChatSession:
    def __init__(self, engine: Any, tokenizer: Any, system: str | None = None,
                 params: SamplingParams = SamplingParams(temperature=0.7), max_tokens: int = 1024,
                 context_length: int | None = None):
        self.engine, self.tokenizer = engine, tokenizer
        self.system = system or None
        self.params = params
        self.max_tokens = max_tokens
        cfg = getattr(engine, "config", {}) or {}
        self.context_length = context_length or int(cfg.get("max_position_embeddings") or 4096)
        self.messages: list[dict] = []
        self.cache = PromptCache(1)
        self.turns: list[TurnStats] = []
        self.reasoning = reasoning_for(getattr(tokenizer, "chat_template", None))
        self.show_reasoning = True

    def conversation(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def max_tokens_for(self, n_prompt: int) -> int:
        return max(0, min(self.max_tokens, self.context_length - n_prompt))

    def ask(self, text: str) -> Turn:
        """Start the reply to a user message; the caller iterates the turn and then calls ``finish``."""
        self.messages.append({"role": "user", "content": text})
        try:
            prompt = self.tokenizer.encode_chat(self.conversation())
            if len(prompt) >= self.context_length:
                raise ValueError(f"the conversation ({len(prompt)} tokens) fills the model's context of "
                                 f"{self.context_length}; /reset to start over")
            return Turn(self, prompt)
        except BaseException:  # also KeyboardInterrupt: the question was never asked
            self.messages.pop()
            raise

    def reset(self) -> None:
        self.messages.clear()
        self.cache.clear()

    def set_option(self, name: str, value: str) -> str:
        """Apply ``/set name value``; returns what was set or raises ValueError with a message for the user."""
        if name not in OPTIONS:
            raise ValueError(f"unknown option {name!r}; options: {', '.join(sorted(OPTIONS))}")
        key, conv = OPTIONS[name]
        try:
            v = conv(value)
        except ValueError:
            raise ValueError(f"invalid value {value!r} for {name}") from None
        if key in RANGES and v is not None and not RANGES[key][0] <= v <= RANGES[key][1]:
            lo, hi = RANGES[key]
            raise ValueError(f"{name} must be between {lo:g} and {hi:g}")
        if key == "max_tokens":
            self.max_tokens = v
        else:
            self.params = replace(self.params, **{key: v})
        return f"{key} = {v}"

    def settings(self) -> str:
        vals = {f.name: getattr(self.params, f.name) for f in fields(self.params) if f.name != "logprobs"}
        vals["max_tokens"] = self.max_tokens
        return "  ".join(f"{k}={v}" for k, v in vals.items())

    def stats(self) -> str:
        s = self.engine.stats()
        held = self.cache.entries[0][0] if self.cache.entries else []
        gen = sum(t.generated for t in self.turns)
        lines = [
            f"turns {len(self.turns)}, messages {len(self.messages)}, KV cache {len(held)} tokens "
            f"of a {self.context_length}-token context, {gen} tokens generated",
            f"engine: {s.get('tokens', 0)} tokens forwarded, read {human_bytes(s.get('bytes_read', 0))} in "
            f"{s.get('reads', 0)} reads, hit rate {s.get('hit_rate', 0.0):.1%}, "
            f"I/O wait {s.get('io_wait_s', 0.0):.2f}s, "
            f"compute {s.get('compute_s', 0.0):.2f}s, {s.get('slots', '?')} expert slots ({s.get('io_mode', '?')})",
        ]
        return "\n".join(lines)


# ---- the loop ---------------------------------------------------------------------------------------


def read_message(read: Callable[[str], str]) -> str:
    """One user message: a line, or the lines between two ``\"\"\"`` lines (raises EOFError / KeyboardInterrupt)."""
    line = read(">>> ")
    if line.strip() != '"""' and not line.lstrip().startswith('"""'):
        return line
    first = line.lstrip()[3:]
    if first.rstrip().endswith('"""') and first.strip() != "":  # """one line"""
        return first.rstrip()[:-3]
    lines = [first] if first.strip() else []
    while True:
        line = read("... ")
        if line.rstrip().endswith('"""'):
            last = line.rstrip()[:-3]
            if last:
                lines.append(last)
            return "\n".join(lines)
        lines.append(line)


def repl(session: ChatSession, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
    def say(text: str = "") -> None:
        out.write(text + "\n")
        out.flush()

    say("Type a message, /help for commands, Ctrl-D or /quit to exit.")
    while True:
        try:
            text = read_message(read)
        except EOFError:
            say()
            return
        except KeyboardInterrupt:
            say("\n(Ctrl-D or /quit exits)")
            continue
        if not text.strip():
            continue
        if text.startswith("/"):
            name, _, arg = text.strip().partition(" ")
            arg = arg.strip()
            if name in ("/quit", "/exit", "/bye"):
                return
            if name == "/help":
                say(HELP)
            elif name == "/reset":
                session.reset()
                say("conversation cleared")
            elif name == "/system":
                if not arg:
                    say(f"system: {session.system!r}")
                else:
                    session.system = None if arg in ('""', "''") else arg
                    say(f"system message {'cleared' if session.system is None else 'set'}")
            elif name == "/set":
                if not arg:
                    say(session.settings())
                else:
                    key, _, value = arg.partition(" ")
                    try:
                        say(session.set_option(key, value.strip()))
                    except ValueError as e:
                        say(f"error: {e}")
            elif name == "/think":
                if arg in ("on", "off"):
                    session.show_reasoning = arg == "on"
                say(f"reasoning {'shown' if session.show_reasoning else 'hidden'}"
                    f"{'' if session.reasoning else ' (this model has no thinking section)'}")
            elif name == "/stats":
                say(session.stats())
            else:
                say(f"unknown command {name}; /help lists them")
            continue
        try:
            turn = session.ask(text)
        except KeyboardInterrupt:
            say()
            continue
        except Exception as e:
            say(f"error: {e}")
            continue
        interrupted = False
        try:
            for piece in turn:
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            interrupted = True
        except Exception as e:  # e.g. an ExpertReadError: that turn fails, the conversation goes on
            turn.fail()
            say(f"\nerror: {e}\n(that reply failed and was dropped; the conversation goes on)")
            continue
        finally:
            if turn.dimmed:  # stopped inside the reasoning
                out.write(UNDIM)
            st = turn.finish(interrupted)
        say()
        say(st.line())
