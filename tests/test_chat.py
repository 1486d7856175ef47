"""`moepack chat`: the session logic in-process, then the real REPL in a pseudo-terminal (pexpect) through a
multi-turn conversation, every command, multi-line input, Ctrl-C during a reply and at the prompt, Ctrl-D."""

from __future__ import annotations

import io
import os
import re
import sys

import pexpect
import pytest

from moepack.runtime.sampling import SamplingParams
from moepack.serve.chat import ChatSession, read_message, repl
from conftest import TIMEOUT
from tiny_pack import reference

SUMMARY = (r"\[(\d+) tokens, [\d.]+ tok/s \| prompt (\d+) tokens \((\d+) cached\) \| read .*?/token \| "
           r"hit rate \d+%( \| stopped)?\]")


def expected(ref, messages, n) -> str:
    engine, tok = ref
    return reference(engine, tok, tok.encode_chat(messages), n)[0]


# ---- in-process --------------------------------------------------------------------------------


def test_session_keeps_conversation_and_cache(ref):
    engine, tok = ref
    s = ChatSession(engine, tok, system="Be brief.", params=SamplingParams(temperature=0), max_tokens=6)
    convo = [{"role": "system", "content": "Be brief."}]
    for i, q in enumerate(["Hello", "Tell me more", "And the fox?"]):
        turn = s.ask(q)
        reply = "".join(turn)
        st = turn.finish()
        convo.append({"role": "user", "content": q})
        assert reply == expected(ref, convo, 6)  # the cached turns give what a fresh run gives
        convo.append({"role": "assistant", "content": reply})
        assert s.messages == convo[1:]
        assert st.prompt_tokens == len(tok.encode_chat(convo[:-1]))
        assert (st.cached_tokens > 0) == (i > 0) and st.generated == 6
    s.reset()
    assert s.messages == [] and s.cache.entries == []


def test_set_options(ref):
    s = ChatSession(*ref)
    assert s.set_option("temp", "0.2") == "temperature = 0.2" and s.params.temperature == 0.2
    assert s.set_option("max_tokens", "5") == "max_tokens = 5" and s.max_tokens == 5
    s.set_option("seed", "none")
    assert s.params.seed is None
    for name, value in [("temp", "hot"), ("temp", "3"), ("top_p", "0"), ("bogus", "1"), ("top_k", "1.5")]:
        with pytest.raises(ValueError):
            s.set_option(name, value)
    assert "temperature=0.2" in s.settings() and "max_tokens=5" in s.settings()


def test_read_message_multiline():
    def reader(lines):
        it = iter(lines)
        return lambda prompt: next(it)

    assert read_message(reader(["hello"])) == "hello"
    assert read_message(reader(['"""', "line one", "", "line two", '"""'])) == "line one\n\nline two"
    assert read_message(reader(['"""first', 'last"""'])) == "first\nlast"
    assert read_message(reader(['"""one line"""'])) == "one line"


def test_repl_commands_in_process(ref):
    engine, tok = ref
    s = ChatSession(engine, tok, params=SamplingParams(temperature=0), max_tokens=3)
    lines = iter(["/help", "/set temp 0", "/system Be brief.", "/system", "Hi", "/stats", "/nope", "/reset",
                  "/stats", "/quit", "never read"])
    out = io.StringIO()
    repl(s, lambda prompt: next(lines), out)
    text = out.getvalue()
    assert "Commands:" in text and "temperature = 0.0" in text and "system: 'Be brief.'" in text
    assert "turns 1, messages 2" in text and "unknown command /nope" in text and "conversation cleared" in text
    assert "messages 0" in text and re.search(SUMMARY, text)
    assert next(lines) == "never read"  # /quit ended the loop


# ---- the real REPL in a pseudo-terminal -------------------------------------------------------


def reply_of(child: pexpect.spawn, sent: str) -> tuple[str, re.Match]:
    """Wait for the summary line after a reply; the reply is what came between the echoed input and it."""
    child.expect(SUMMARY)
    before = child.before
    i = before.find(sent + "\r\n")
    assert i >= 0, before
    text = before[i + len(sent) + 2:]
    assert text.endswith("\r\n"), text
    return text[:-2].replace("\r\n", "\n"), child.match


def test_chat_repl_in_a_terminal(pack, ref):
    env = {**os.environ, "TERM": "dumb", "PYTHONUNBUFFERED": "1"}
    child = pexpect.spawn(sys.executable, ["-m", "moepack.cli", "chat", str(pack), "--temp", "0", "--max-tokens", "8",
                                           "--system", "Be brief."], env=env, encoding="utf-8", timeout=TIMEOUT,
                          dimensions=(50, 400))
    try:
        child.expect("Type a message")
        child.expect(">>> ")
        convo = [{"role": "system", "content": "Be brief."}]

        # a multi-turn conversation: each reply is what a fresh run of the whole conversation writes
        for i, q in enumerate(["Hello", "Tell me more"]):
            child.sendline(q)
            text, m = reply_of(child, q)
            convo.append({"role": "user", "content": q})
            assert text == expected(ref, convo, 8)
            convo.append({"role": "assistant", "content": text})
            assert int(m.group(1)) == 8 and int(m.group(2)) == len(ref[1].encode_chat(convo[:-1]))
            assert (int(m.group(3)) > 0) == (i > 0)  # the KV cache carried over to the second turn
            child.expect(">>> ")

        child.sendline("/help")
        child.expect("Commands:")
        child.expect(">>> ")
        child.sendline("/stats")
        child.expect(r"turns 2, messages 4, KV cache \d+ tokens")
        child.expect(">>> ")
        child.sendline("/set temp 0.5")
        child.expect("temperature = 0.5")
        child.sendline("/set")
        child.expect("temperature=0.5")
        child.sendline("/set temp warm")
        child.expect("error: invalid value 'warm' for temp")
        child.sendline("/set temp 0")
        child.expect("temperature = 0")
        child.sendline("/system You are a fox.")
        child.expect("system message set")
        child.sendline("/system")
        child.expect("system: 'You are a fox.'")
        child.sendline("/reset")
        child.expect("conversation cleared")
        child.sendline("/stats")
        child.expect("turns 2, messages 0")
        child.expect(">>> ")

        # multi-line input is one message
        for line in ['"""', "first line", "second line", '"""']:
            child.sendline(line)
        child.expect(SUMMARY)
        convo = [{"role": "system", "content": "You are a fox."},
                 {"role": "user", "content": "first line\nsecond line"}]
        assert int(child.match.group(2)) == len(ref[1].encode_chat(convo))
        child.expect(">>> ")
        child.sendline("/stats")
        child.expect("messages 2")
        child.expect(">>> ")

        # Ctrl-C stops a long reply and keeps the session
        child.sendline("/set max_tokens 3000")
        child.expect("max_tokens = 3000")
        child.expect(">>> ")
        child.sendline("Go on")
        child.expect(r"Go on\r\n(?s:.){4}")  # some of the reply has been written
        child.sendintr()
        child.expect(SUMMARY)
        assert child.match.group(4) == " | stopped" and int(child.match.group(1)) < 3000
        child.expect(">>> ")
        child.sendline("/stats")
        child.expect("messages 4")  # the partial reply was kept
        child.expect(">>> ")
        child.sendline("/set max_tokens 3")
        child.expect(">>> ")
        child.sendline("Still there?")
        child.expect(SUMMARY)
        assert int(child.match.group(3)) > 0
        child.expect(">>> ")

        # Ctrl-C at the prompt does not exit; Ctrl-D does, cleanly
        child.sendintr()
        child.expect(r"Ctrl-D or /quit exits")
        child.expect(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before
