"""The OpenAI-compatible HTTP server: ``create_app(engine, tokenizer)`` or ``create_app(loader=...)``.

Handlers validate (schemas.py), render the chat template (prompt.py), tokenize and check the context, then hand
a :class:`~moepack.serve.worker.Job` to the single generation worker and relay its events (stream.py), as
server-sent events when streaming. Parsing, validating (http.py), rendering and tokenizing run in worker threads,
so a big request never stalls the event loop and ``/health``. They are plain functions reading the served model from
``request.app.state.moepack`` (state.py); http.py guards the routes and shapes every error as OpenAI does.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from moepack import __version__
from moepack.runtime.memory import memory_stats
from moepack.serve import http
from moepack.serve.constrain import Constraint, GrammarError, request_grammar
from moepack.serve import schemas as S
from moepack.serve.http import MAX_BODY, APIError
from moepack.serve.prompt import chat_ids
from moepack.serve.reasoning import ReasoningSplit, starts_inside, with_thinking
from moepack.serve.reasoning import split as split_reasoning
from moepack.serve.state import Options, State
from moepack.serve.stream import (ChatChunks, CompletionChunks, Relay, chat_logprobs, collect, completion_logprobs,
                                  event_stream, stream_head, usage_out)
from moepack.serve.toolcalls import parse
from moepack.serve.worker import Job

log = logging.getLogger(__name__)

FINGERPRINT = f"moepack-{__version__}"

# ---- routes --------------------------------------------------------------------------------------

ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": S.ErrorResponse} for s in (400, 401, 404, 413, 503)}
# generation: 500 when it fails (an unreadable expert file...), server-sent events when streaming
_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {
    "type": "string", "description": "A JSON chunk (or an error object), then the last event: [DONE]."}}}
GENERATING = {**ERRORS, 500: {"model": S.ErrorResponse}, 200: {"content": {"text/event-stream": {
    "schema": _SSE_EVENT}}, "description": "The reply, or with stream: true its chunks as server-sent events."}}


def _state(request: Request) -> State:
    return request.app.state.moepack


# health and stats have no return annotation: FastAPI would take it for their response model (and schema).
async def health(request: Request):
    """200 once the model is loaded and the worker runs; 503 while loading."""
    _state(request).require_ready()
    return {"status": "ok"}


async def stats(request: Request):
    """Server counters (requests, cancellations, prefix-cache reuse, KV caches held), the engine's I/O and
    compute figures, and the process's memory."""
    st = _state(request)
    st.require_ready()
    return {"server": st.worker.stats(), "engine": st.engine.stats(), "memory": memory_stats()}


def _card(st: State, name: str) -> S.ModelCard:
    return S.ModelCard(id=name, created=st.created, context_length=st.context_length or None)


async def models(request: Request) -> S.ModelList:
    st = _state(request)
    return S.ModelList(data=[_card(st, name) for name in st.names()])


async def model(model_id: str, request: Request) -> S.ModelCard:
    st = _state(request)
    st.check_model(model_id)
    return _card(st, model_id)


def _submit(st: State, ids: list[int], max_tokens: int, req: S._Sampling, logprobs: int | None,
            skip_special: bool, constraint: Any = None) -> tuple[Relay, Job]:
    """Queue the generation on the worker; its events arrive through the returned relay."""
    relay = Relay()
    job = Job(ids, max_tokens, req.sampling(logprobs), relay.emit, req.stop_list(), skip_special, constraint)
    st.worker.submit(job)
    return relay, job


async def _constraint(st: State, req: S.ChatCompletionRequest, inside: bool) -> Constraint | None:
    """The grammar the reply must follow (``response_format``, or enforced tool calls), after the thinking of a
    reasoning model (``inside``: the prompt opened it), compiled off the event loop; 400 when invalid."""
    tools = bool(req.tools) and (req.tool_choice == "required" or isinstance(req.tool_choice, S.NamedToolChoice))
    param = "tools" if tools else "response_format"
    try:
        lark = request_grammar(st.grammars, req, st.tool_format, st.tokenizer.chat_template)
        if lark is not None and st.reasoning is not None:
            lark = with_thinking(st.reasoning, lark, inside, st.grammars.literal, answer_open=not tools)
        return None if lark is None else await run_in_threadpool(st.grammars.compile, lark)
    except GrammarError as e:
        raise APIError(400, f"invalid schema for {param}: {e}", param=param, code="invalid_json_schema")


async def chat_completions(req: S.ChatCompletionRequest, request: Request) -> S.ChatCompletion | Response:
    """Chat completion; ``stream: true`` answers with server-sent events ending in ``data: [DONE]``."""
    st = _state(request)
    st.require_ready()
    tok = st.tokenizer
    prompt, ids, fmt = await run_in_threadpool(chat_ids, tok, st.tool_format, req, st.renderer)
    max_tokens = st.budget(len(ids), req.token_limit())
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    think = st.reasoning  # the reply's thinking goes to reasoning_content: its markers must stay in the text
    inside = think is not None and starts_inside(think, prompt)
    constraint = await _constraint(st, req, inside)
    relay, job = _submit(st, ids, max_tokens, req, logprobs, skip_special=fmt is None and think is None,
                         constraint=constraint)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if req.stream:
        head = stream_head(req, rid, created, st.opts.model_id, FINGERPRINT)
        return event_stream(relay, job, ChatChunks(head, tok, fmt, logprobs is not None,
                                                   1 if req.parallel_tool_calls is False else None,
                                                   ReasoningSplit(think, inside) if think else None))
    got = await collect(relay, job, request)
    if got is None:
        return JSONResponse({}, status_code=499)  # nobody is listening
    text, samples, done = got
    reasoning, text = split_reasoning(think, prompt, text)
    content, calls = parse(text, fmt)
    if req.parallel_tool_calls is False:
        calls = calls[:1]
    finish = "tool_calls" if calls else done.finish_reason
    msg = S.AssistantMessage(content=content, reasoning_content=reasoning,
                             tool_calls=[S.ToolCallOut(**c) for c in calls] or None)
    lps = S.ChoiceLogprobs(content=[chat_logprobs(tok, x) for x in samples]) if logprobs is not None else None
    return S.ChatCompletion(id=rid, created=created, model=st.opts.model_id, system_fingerprint=FINGERPRINT,
                            choices=[S.ChatChoice(message=msg, finish_reason=finish, logprobs=lps)],
                            usage=usage_out(done.usage))


def _prompt_ids(tok, p: str | list[int]) -> list[int]:
    """A completion prompt's token ids (a worker thread: 8 MiB of text or ids take a while)."""
    if isinstance(p, str):
        ids = tok.encode(p)
    else:
        ids = list(p)
        vocab = getattr(tok, "vocab_size", None)
        if any(i < 0 or (vocab and i >= vocab) for i in ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
    if not ids:
        raise APIError(400, "the prompt encodes to no tokens", param="prompt")
    return ids


async def completions(req: S.CompletionRequest, request: Request) -> S.Completion | Response:
    """Plain text completion of a prompt (text or token ids)."""
    st = _state(request)
    st.require_ready()
    tok = st.tokenizer
    if req.echo and req.logprobs is not None:
        raise APIError(400, "echo with logprobs (prompt log-probabilities) is not supported", param="echo")
    p = req.prompt_value()
    ids = await run_in_threadpool(_prompt_ids, tok, p)
    max_tokens = st.budget(len(ids), req.max_tokens)
    relay, job = _submit(st, ids, max_tokens, req, req.logprobs, skip_special=True)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    prefix = (p if isinstance(p, str) else tok.decode(ids)) if req.echo else ""
    if req.stream:
        head = stream_head(req, rid, created, st.opts.model_id, FINGERPRINT)
        return event_stream(relay, job, CompletionChunks(head, tok, prefix, req.logprobs is not None))
    got = await collect(relay, job, request)
    if got is None:
        return JSONResponse({}, status_code=499)
    text, samples, done = got
    lp = completion_logprobs(tok, samples) if req.logprobs is not None else None
    return S.Completion(id=rid, created=created, model=st.opts.model_id, system_fingerprint=FINGERPRINT,
                        choices=[S.CompletionChoice(text=prefix + text, logprobs=lp, finish_reason=done.finish_reason)],
                        usage=usage_out(done.usage))


def add_routes(app: FastAPI) -> None:
    """The API on ``app``; its handlers find the served model on ``request.app.state.moepack``."""
    app.add_api_route("/health", health, methods=["GET"], responses={503: {"model": S.ErrorResponse}})
    app.add_api_route("/stats", stats, methods=["GET"], responses={s: {"model": S.ErrorResponse} for s in (401, 503)})
    app.add_api_route("/v1/models", models, methods=["GET"], response_model=S.ModelList, responses=ERRORS)
    app.add_api_route("/v1/models/{model_id:path}", model, methods=["GET"], response_model=S.ModelCard,
                      responses=ERRORS)
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], response_model=S.ChatCompletion,
                      responses=GENERATING)
    app.add_api_route("/v1/completions", completions, methods=["POST"], response_model=S.Completion,
                      responses=GENERATING)


# ---- the app ------------------------------------------------------------------------------------


def create_app(engine: Any = None, tokenizer: Any = None, *, loader: Callable[[], tuple[Any, Any]] | None = None,
               model_id: str = "moepack", api_key: str | None = None, max_body: int = MAX_BODY,
               context_length: int | None = None, parallel: int = 1, prompt_cache: int = 2,
               close_engine: bool = False, on_loaded: Callable[[Exception | None], None] | None = None,
               aliases: Sequence[str] = (), render_time_limit: float | None = None) -> FastAPI:
    """An app serving ``engine`` + ``tokenizer`` now, or what ``loader()`` returns once it has run in a thread
    (``/health`` answers 503 until then; ``on_loaded`` hears how it went). ``engine`` needs ``make_cache()``,
    ``forward(ids, cache)``, ``config`` and ``stats()`` (runtime/engine.py); tests inject a scripted one.
    ``aliases``: more names /v1/models lists; ``render_time_limit``: seconds a chat template may take."""
    if (engine is None) == (loader is None):
        raise ValueError("pass either engine and tokenizer, or loader")
    st = State(Options(model_id=model_id, aliases=tuple(aliases), api_key=api_key, max_body=max_body,
                       context_length=context_length, parallel=parallel, prompt_cache=prompt_cache,
                       render_time_limit=render_time_limit))

    def load() -> None:
        error = None
        try:
            st.attach(*loader())
        except Exception as e:  # reported by /health and every request, not a crash
            log.debug("loading the model failed", exc_info=True)
            st.load_error, error = str(e), e
        if on_loaded:
            on_loaded(error)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if loader is None:
            st.attach(engine, tokenizer)
        else:
            threading.Thread(target=load, name="moepack-load", daemon=True).start()
        yield
        st.close()
        if (close_engine or loader is not None) and st.engine is not None and hasattr(st.engine, "close"):
            st.engine.close()

    app = FastAPI(title="moepack", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API for a moepack model (experts streamed from SSD).")
    app.state.moepack = st
    http.install(app, max_body=max_body, api_key=api_key)
    add_routes(app)
    return app


def serve(pack: str | Path, host: str = "127.0.0.1", port: int = 8080, memory_budget: str | int | None = None,
          api_key: str | None = None, model_id: str | Sequence[str] | None = None, context_length: int | None = None,
          parallel: int = 1, log_level: str = "warning", announce: Callable[[str], None] = log.info,
          engine: Any = None, load_kwargs: dict | None = None) -> None:
    """Run the server until interrupted. It binds at once and loads the pack in the background; ``announce``
    hears "serving ... on URL" once both are done. A pack that fails to load (a budget too small, say) stops the
    server and raises here. ``model_id``: the name replies report (default: the pack folder's), or several, the
    first reported and all listed. ``engine``: one already loaded (rank 0 of a pipeline over several hosts,
    runtime/distributed/) instead of loading ``pack`` here; ``load_kwargs``: further options for
    ``moepack.load`` (verify, policy, prefetch). Every request is logged as one line (moepack.serve.access)."""
    import uvicorn

    import moepack
    from moepack.runtime.tokenizer import Tokenizer

    tok = Tokenizer(pack, verify=bool((load_kwargs or {}).get("verify")))  # validates the pack; fail before binding
    if not tok.chat_template:
        log.warning("%s has no chat template: /v1/chat/completions will answer 400, /v1/completions works", pack)
    names = [model_id] if isinstance(model_id, str) else list(model_id or []) or [Path(pack).resolve().name]
    t0 = time.perf_counter()
    failure: list[Exception] = []
    pending = {"loaded", "bound"}
    lock = threading.Lock()

    def done(step: str) -> None:  # "serving on" only once the model is loaded and the port is bound
        with lock:
            pending.discard(step)
            last = not pending
        if last:
            announce(f"model loaded in {time.perf_counter() - t0:.1f}s; serving {names[0]!r} on "
                     f"http://{host}:{port}/v1")

    def loaded(error: Exception | None) -> None:
        if error is None:
            done("loaded")
        else:
            failure.append(error)
            server.should_exit = True

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                done("bound")

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this address can use the model", host)
    logging.getLogger("moepack.serve.access").setLevel(logging.INFO)
    app = create_app(loader=lambda: (engine or moepack.load(pack, memory_budget=memory_budget, **(load_kwargs or {})), tok),
                     model_id=names[0], aliases=names[1:], api_key=api_key, context_length=context_length,
                     parallel=parallel, on_loaded=loaded)
    server = Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                   timeout_graceful_shutdown=5))
    server.run()
    if failure:
        raise failure[0]
