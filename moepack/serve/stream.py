"""A generation job's events, relayed to its request: collected into one reply, or sent as server-sent events.

Chat and text completions stream through the same loop (:func:`sse_events`); what differs, the chunks, is
written by :class:`ChatChunks` or :class:`CompletionChunks` from the pydantic models in schemas.py.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import AsyncIterator, Iterator

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from moepack.runtime.generation import Usage
from moepack.runtime.sampling import Sampled
from moepack.serve import schemas as S
from moepack.serve.http import APIError
from moepack.serve.reasoning import ReasoningSplit
from moepack.serve.toolcalls import ToolCallStream, ToolFormat
from moepack.serve.worker import Delta, Done, Failed, Job


class Relay:
    """A job's events, moved from the worker thread onto this request's event loop."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def emit(self, ev) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)

    async def events(self, request: Request | None = None, poll: float = 0.25) -> AsyncIterator:
        """Yield events until Done/Failed; with ``request``, stop (cancelling the job) if the client leaves.

        The client is checked every ``poll`` seconds whether tokens are flowing or not (a long prefill).
        """
        checked = self.loop.time()

        async def gone() -> bool:
            nonlocal checked
            if request is None or self.loop.time() - checked < poll:
                return False
            checked = self.loop.time()
            return await request.is_disconnected()

        while True:
            get = asyncio.ensure_future(self.queue.get())
            while not get.done():
                await asyncio.wait({get}, timeout=poll)
                if not get.done() and await gone():
                    get.cancel()
                    raise ConnectionAbortedError("client disconnected")
            ev = get.result()
            yield ev
            if isinstance(ev, (Done, Failed)):
                return
            if await gone():
                raise ConnectionAbortedError("client disconnected")


def _failed(ev: Failed) -> APIError:
    return APIError(500, ev.message, "server_error", code="generation_failed")


async def collect(relay: Relay, job: Job, request: Request) -> tuple[str, list[Sampled], Done] | None:
    """A whole (non-streamed) reply: its text, its sampled tokens and how it ended; None if the client left."""
    parts, samples = [], []
    try:
        async for ev in relay.events(request):
            if isinstance(ev, Delta):
                parts.append(ev.text)
                samples.append(ev.sampled)
            elif isinstance(ev, Failed):
                raise _failed(ev)
            else:
                return "".join(parts), samples, ev
    except ConnectionAbortedError:
        return None
    finally:
        job.cancel()  # a no-op once finished; stops the generation when the client has gone
    raise APIError(500, "the generation ended without a result", "server_error")


# ---- usage and log-probabilities as OpenAI shapes them ---------------------------------------------


def usage_out(u: Usage) -> S.UsageOut:
    return S.UsageOut(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, total_tokens=u.total_tokens,
                      prompt_tokens_details=S.PromptTokensDetails(cached_tokens=u.cached_tokens))


def _piece(tokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


def chat_logprobs(tokenizer, s: Sampled) -> S.TokenLogprob:
    t = _piece(tokenizer, s.token)
    top = [(_piece(tokenizer, i), lp) for i, lp in s.top]
    return S.TokenLogprob(token=t, logprob=s.logprob, bytes=list(t.encode()),
                          top_logprobs=[S.TopLogprob(token=p, logprob=lp, bytes=list(p.encode())) for p, lp in top])


def completion_logprobs(tokenizer, samples: list[Sampled]) -> S.CompletionLogprobs:
    tokens, offsets, pos = [], [], 0
    for s in samples:
        t = _piece(tokenizer, s.token)
        tokens.append(t)
        offsets.append(pos)
        pos += len(t)
    return S.CompletionLogprobs(
        tokens=tokens, token_logprobs=[s.logprob for s in samples], text_offset=offsets,
        top_logprobs=[{_piece(tokenizer, i): lp for i, lp in s.top} for s in samples])


# ---- stream chunks ------------------------------------------------------------------------------


@dataclass
class StreamHead:
    """What every chunk of one reply repeats, and whether the request asked for a last chunk with the usage."""

    id: str
    created: int
    model: str
    fingerprint: str
    include_usage: bool


class ChatChunks:
    """``chat.completion.chunk``s: the role first, then content (held back while it may be a tool call's
    markup), then the tool calls and the finish reason."""

    usage_exclude: set[str] = set()

    def __init__(self, head: StreamHead, tokenizer, fmt: ToolFormat | None, logprobs: bool,
                 max_calls: int | None = None, reasoning: ReasoningSplit | None = None):
        self.head, self.tokenizer, self.logprobs = head, tokenizer, logprobs
        self.tools = ToolCallStream(fmt) if fmt else None
        self.max_calls, self.calls = max_calls, 0
        self.reasoning = reasoning  # splits a thinking model's reasoning_content from its content

    def chunk(self, delta: S.ChatDelta, finish: str | None = None, lps: list | None = None,
              ) -> S.ChatCompletionChunk:
        h = self.head
        choice = S.ChatChunkChoice(delta=delta, finish_reason=finish,
                                   logprobs=S.ChoiceLogprobs(content=lps) if lps is not None else None)
        return S.ChatCompletionChunk(id=h.id, created=h.created, model=h.model, system_fingerprint=h.fingerprint,
                                     choices=[choice])

    def opening(self) -> Iterator[S.ChatCompletionChunk]:
        yield self.chunk(S.ChatDelta(role="assistant", content=""))

    def delta(self, ev: Delta) -> Iterator[S.ChatCompletionChunk]:
        thought, text = self.reasoning.push(ev.text) if self.reasoning else ("", ev.text)
        lps = [chat_logprobs(self.tokenizer, ev.sampled)] if self.logprobs else None
        yield from self._content(thought, text, lps)

    def _content(self, thought: str, text: str, lps: list | None = None) -> Iterator[S.ChatCompletionChunk]:
        if thought:
            yield self.chunk(S.ChatDelta(reasoning_content=thought), lps=lps)
            lps = None
        text = self.tools.push(text) if self.tools else text
        if text or lps:
            yield self.chunk(S.ChatDelta(content=text), lps=lps)
        if self.tools:
            yield from self._calls(self.tools.complete())

    def _calls(self, calls: list[dict]) -> Iterator[S.ChatCompletionChunk]:
        """Each call as OpenAI streams one: id, type and name first, then its arguments."""
        for c in calls:
            if self.max_calls is not None and self.calls >= self.max_calls:
                return
            i, fn = self.calls, c["function"]
            self.calls += 1
            yield self.chunk(S.ChatDelta(tool_calls=[S.ToolCallDelta(
                index=i, id=c["id"], type="function", function=S.FunctionDelta(name=fn["name"], arguments=""))]))
            yield self.chunk(S.ChatDelta(tool_calls=[S.ToolCallDelta(
                index=i, function=S.FunctionDelta(arguments=fn["arguments"]))]))

    def closing(self, done: Done) -> Iterator[S.ChatCompletionChunk]:
        if self.reasoning:
            yield from self._content(*self.reasoning.finish())
        rest, calls = self.tools.finish() if self.tools else ("", [])
        if rest:
            yield self.chunk(S.ChatDelta(content=rest))
        yield from self._calls(calls)
        yield self.chunk(S.ChatDelta(), "tool_calls" if self.calls else done.finish_reason)

    def usage(self, done: Done) -> S.ChatCompletionChunk:
        h = self.head
        return S.ChatCompletionChunk(id=h.id, created=h.created, model=h.model, system_fingerprint=h.fingerprint,
                                     choices=[], usage=usage_out(done.usage))


class CompletionChunks:
    """``text_completion`` chunks: the echoed prompt first (with ``echo``), then the text, then the finish
    reason."""

    usage_exclude = {"system_fingerprint"}  # text completions' usage chunk has always been sent without it

    def __init__(self, head: StreamHead, tokenizer, prefix: str, logprobs: bool):
        self.head, self.tokenizer, self.prefix, self.logprobs = head, tokenizer, prefix, logprobs

    def chunk(self, text: str, finish: str | None = None, lp: S.CompletionLogprobs | None = None,
              ) -> S.CompletionChunk:
        h = self.head
        return S.CompletionChunk(id=h.id, created=h.created, model=h.model, system_fingerprint=h.fingerprint,
                                 choices=[S.CompletionChunkChoice(text=text, logprobs=lp, finish_reason=finish)])

    def opening(self) -> Iterator[S.CompletionChunk]:
        if self.prefix:
            yield self.chunk(self.prefix)

    def delta(self, ev: Delta) -> Iterator[S.CompletionChunk]:
        lp = completion_logprobs(self.tokenizer, [ev.sampled]) if self.logprobs else None
        if ev.text or lp is not None:
            yield self.chunk(ev.text, lp=lp)

    def closing(self, done: Done) -> Iterator[S.CompletionChunk]:
        yield self.chunk("", done.finish_reason)

    def usage(self, done: Done) -> S.CompletionChunk:
        h = self.head
        return S.CompletionChunk(id=h.id, created=h.created, model=h.model, choices=[], usage=usage_out(done.usage))


def _sse(obj: BaseModel | dict, exclude: set[str] | None = None) -> str:
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(exclude=exclude)
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def sse_events(relay: Relay, job: Job, chunks: ChatChunks | CompletionChunks) -> AsyncIterator[str]:
    """The reply as server-sent events ending in ``data: [DONE]``; a failed generation sends an error object
    first. The job is cancelled when this ends, so a client that leaves stops its generation."""
    skip = None if chunks.head.include_usage else {"usage"}
    try:
        for c in chunks.opening():
            yield _sse(c, skip)
        async for ev in relay.events():
            if isinstance(ev, Delta):
                for c in chunks.delta(ev):
                    yield _sse(c, skip)
            elif isinstance(ev, Failed):
                yield _sse(_failed(ev).body())
                break
            else:
                for c in chunks.closing(ev):
                    yield _sse(c, skip)
                if chunks.head.include_usage:
                    yield _sse(chunks.usage(ev), chunks.usage_exclude)
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # a no-op when finished; stops the generation when the client has gone


def event_stream(relay: Relay, job: Job, chunks: ChatChunks | CompletionChunks) -> StreamingResponse:
    return StreamingResponse(sse_events(relay, job, chunks), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def stream_head(req: S._Sampling, rid: str, created: int, model: str, fingerprint: str) -> StreamHead:
    return StreamHead(rid, created, model, fingerprint, bool(req.stream_options and req.stream_options.include_usage))
