"""The OpenAI-compatible HTTP server: ``create_app(engine, tokenizer)`` or ``create_app(loader=...)``.

Handlers validate (schemas.py), render the chat template, tokenize and check the context, then hand a
:class:`~moepack.serve.worker.Job` to the single generation worker and relay its events, as server-sent
events when streaming. Every error, including unknown routes, invalid JSON and oversized bodies, comes back
in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from jinja2 import TemplateError
from starlette.exceptions import HTTPException as StarletteHTTPException

from moepack import __version__
from moepack.errors import MoepackError
from moepack.runtime.generation import Usage
from moepack.runtime.sampling import Sampled
from moepack.serve import schemas as S
from moepack.serve.toolcalls import ToolCallStream, ToolFormat, format_for, parse
from moepack.serve.worker import Delta, Done, Failed, Job, Worker

log = logging.getLogger(__name__)

MAX_BODY = 8 << 20
FINGERPRINT = f"moepack-{__version__}"
RESERVED_TEMPLATE_VARS = {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"}


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _loading() -> APIError:
    return APIError(503, "the model is still loading; retry shortly", "server_error", code="model_loading")


# ---- the guard: body size and API key, before anything parses the request ------------------------


class Guard:
    """Pure ASGI middleware: 413 for bodies over ``max_body`` (declared or streamed), 401 without the API key on
    every route but /health (a load balancer's probe carries no key).

    The body is read here (bounded) and replayed to the app; later ``receive`` calls pass through, so the app
    still hears the client disconnect.
    """

    def __init__(self, app, max_body: int, api_key: str | None):
        self.app, self.max_body = app, max_body
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        raw = {k.lower(): v for k, v in scope["headers"]}
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in raw.items()}
        if self.api_key and scope["path"] != "/health":
            auth = raw.get(b"authorization", b"")
            given = auth[7:].strip() if auth[:7].lower() == b"bearer " else raw.get(b"x-api-key", b"")
            if not secrets.compare_digest(given, self.api_key):  # constant time: no timing oracle on the key
                err = APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key")
                return await err.response()(scope, receive, send)
        too_big = APIError(413, f"request body is larger than {self.max_body} bytes", code="request_too_large")
        try:
            if int(headers.get("content-length", "0")) > self.max_body:
                return await too_big.response()(scope, receive, send)
        except ValueError:
            return await APIError(400, "invalid Content-Length header").response()(scope, receive, send)
        chunks, size = [], 0
        if scope["method"] in ("POST", "PUT", "PATCH"):
            while True:
                msg = await receive()
                if msg["type"] != "http.request":
                    return  # the client left before sending its body
                size += len(msg.get("body", b""))
                if size > self.max_body:
                    return await too_big.response()(scope, receive, send)
                chunks.append(msg.get("body", b""))
                if not msg.get("more_body"):
                    break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}] if chunks else []

        async def replay():
            return pending.pop() if pending else await receive()

        return await self.app(scope, replay, send)


# ---- state -------------------------------------------------------------------------------------


@dataclass
class Options:
    model_id: str = "moepack"
    api_key: str | None = None
    max_body: int = MAX_BODY
    context_length: int | None = None  # default: the model's max_position_embeddings
    parallel: int = 1  # requests decoded in turn; the rest wait in the queue
    prompt_cache: int = 2  # KV caches kept for prefix reuse


class State:
    def __init__(self, opts: Options):
        self.opts = opts
        self.engine: Any = None
        self.tokenizer: Any = None
        self.worker: Worker | None = None
        self.tool_format: ToolFormat | None = None
        self.context_length = 0
        self.created = int(time.time())
        self.load_error: str | None = None
        self.ready = threading.Event()

    def attach(self, engine: Any, tokenizer: Any) -> None:
        self.engine, self.tokenizer = engine, tokenizer
        cfg = getattr(engine, "config", {}) or {}
        self.context_length = self.opts.context_length or int(cfg.get("max_position_embeddings") or 4096)
        self.tool_format = format_for(tokenizer.chat_template)
        self.worker = Worker(engine, tokenizer, self.opts.parallel, self.opts.prompt_cache).start()
        self.ready.set()
        log.info("serving %s (context %d, tool calls: %s)", self.opts.model_id, self.context_length,
                 self.tool_format.name if self.tool_format else "none")

    def require_ready(self) -> None:
        if self.load_error:
            raise APIError(500, f"the model failed to load: {self.load_error}", "server_error", code="load_failed")
        if not self.ready.is_set():
            raise _loading()
        if getattr(self.engine, "healthy", True) is False:  # a pipeline that lost a host (runtime/distributed.py)
            raise APIError(503, f"the model is unavailable: {self.engine.error}", "server_error", code="unhealthy")

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.opts.model_id:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.opts.model_id!r}",
                           param="model", code="model_not_found")


# ---- helpers -------------------------------------------------------------------------------------

_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*|dict\[.*|literal\[.*|function-.*|tagged-union\[.*"
                       r"|[A-Z]\w*)$")


def _param(loc: tuple) -> str | None:
    """pydantic's error location as OpenAI's ``param`` ("messages.[0].role"), without union type tags."""
    parts: list[str] = []
    for p in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif _TYPE_TAG.match(str(p)):
            break
        else:
            parts.append(str(p))
    return ".".join(parts) or None


def _validation_error(exc: RequestValidationError) -> APIError:
    errs = exc.errors()
    e = errs[0] if errs else {"msg": "invalid request", "loc": ()}
    if e.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {e.get('ctx', {}).get('error', e['msg'])}",
                        code="invalid_json")
    if e.get("type") == "extra_forbidden":  # OpenAI's answer to a parameter it does not know
        name = str(e["loc"][-1])
        return APIError(400, f"unrecognized request argument supplied: {name}", param=name, code="unknown_parameter")
    param = _param(tuple(e.get("loc", ())))
    msg = e["msg"].removeprefix("Value error, ")
    code = {"missing": "missing_required_parameter"}.get(e.get("type", ""), "invalid_value")
    if e.get("type", "").endswith("_type"):
        code = "invalid_type"
    if e.get("type") == "model_attributes_type":
        msg = "the request body must be a JSON object"
    return APIError(400, f"{param}: {msg}" if param else msg, param=param, code=code)


MAX_DEPTH = 64  # JSON nesting a request may have (tool parameter schemas are the deepest real ones)
_SURROGATE = re.compile("[\ud800-\udfff]")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def parse_body(body: bytes) -> Any:
    """A request body as strict JSON (RFC 8259), checked before any handler or the model sees it: UTF-8 only,
    no NaN/Infinity literals (Python's json would accept them), at most MAX_DEPTH levels of nesting (Python's own
    limit is a RecursionError), and no lone surrogates (a ``\\ud800`` escape decodes to a str that cannot
    be encoded back to UTF-8, which the tokenizer and the response writer would fail on)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (at byte {e.start})", code="invalid_json")
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise APIError(400, f"the request body nests deeper than {MAX_DEPTH} levels", code="invalid_json")
    except ValueError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json")
    stack: list[tuple[Any, int, tuple]] = [(obj, 0, ())]
    while stack:  # iterative: a walk must not hit the recursion limit either
        node, depth, path = stack.pop()
        if isinstance(node, str):
            if not node.isascii() and _SURROGATE.search(node):
                raise APIError(400, "a string holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape)",
                               param=_param(path), code="invalid_value")
            continue
        if not isinstance(node, (dict, list)):
            continue
        if depth >= MAX_DEPTH:
            raise APIError(400, f"the request body nests deeper than {MAX_DEPTH} levels", param=_param(path[:1]),
                           code="invalid_json")
        for k, v in (node.items() if isinstance(node, dict) else enumerate(node)):
            if isinstance(k, str) and not k.isascii() and _SURROGATE.search(k):
                stack.append((k, depth, path))
            if isinstance(v, (str, dict, list)):
                stack.append((v, depth + 1, (*path, k)))
    return obj


class JSONRoute(APIRoute):
    """Routes whose JSON body is parsed by :func:`parse_body`; FastAPI then uses the result (``request._json``,
    Starlette's cache) instead of parsing the body a second time, leniently."""

    def get_route_handler(self) -> Callable:
        handle = super().get_route_handler()

        async def parsed_first(request: Request):
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype == "application/json" or ctype.endswith("+json"):
                if body := await request.body():
                    request._json = parse_body(body)
            return await handle(request)

        return parsed_first


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
            try:
                args = json.loads(tc.function.arguments)
            except ValueError:
                raise APIError(400, "tool call arguments must be JSON text",
                               param=f"messages.[{i}].tool_calls.[{j}].function.arguments", code="invalid_value")
            fn = {"name": tc.function.name, "arguments": args if object_args else tc.function.arguments}
            calls.append({"id": tc.id, "type": "function", "function": fn})
        d["tool_calls"] = calls
    return d


def render_chat(tok, messages: list[S.Message], tools: list | None, kwargs: dict) -> str:
    """The prompt for ``messages``: tool-call arguments as mappings first, as JSON text if the template fails on
    those (llama.cpp probes templates the same way)."""
    attempts = [True, False] if any(m.tool_calls for m in messages) else [True]
    for object_args in attempts:
        msgs = [_template_message(i, m, object_args) for i, m in enumerate(messages)]
        try:
            return tok.apply_chat_template(msgs, add_generation_prompt=True, tools=tools, **kwargs)
        except (TemplateError, MoepackError, TypeError, ValueError, KeyError, IndexError) as e:
            error = e
    raise APIError(400, f"the chat template rejected these messages: {error}", param="messages",
                   code="invalid_messages")


def _piece(tokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


def _chat_logprobs(tokenizer, s: Sampled) -> S.TokenLogprob:
    t = _piece(tokenizer, s.token)
    top = [(_piece(tokenizer, i), lp) for i, lp in s.top]
    return S.TokenLogprob(token=t, logprob=s.logprob, bytes=list(t.encode()),
                          top_logprobs=[S.TopLogprob(token=p, logprob=lp, bytes=list(p.encode())) for p, lp in top])


def _usage(u: Usage) -> S.UsageOut:
    return S.UsageOut(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, total_tokens=u.total_tokens,
                      prompt_tokens_details=S.PromptTokensDetails(cached_tokens=u.cached_tokens))


def _sse(obj: Any) -> str:
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(exclude_none=False)
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Relay:
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


async def _collect(relay: _Relay, job: Job, request: Request) -> tuple[str, list[Sampled], Done] | None:
    """A whole (non-streamed) reply: its text, its sampled tokens and how it ended; None if the client left."""
    parts, samples = [], []
    try:
        async for ev in relay.events(request):
            if isinstance(ev, Delta):
                parts.append(ev.text)
                samples.append(ev.sampled)
            elif isinstance(ev, Failed):
                raise APIError(500, ev.message, "server_error", code="generation_failed")
            else:
                return "".join(parts), samples, ev
    except ConnectionAbortedError:
        return None
    finally:
        job.cancel()  # a no-op once finished; stops the generation when the client has gone
    raise APIError(500, "the generation ended without a result", "server_error")


# ---- the app ------------------------------------------------------------------------------------


def create_app(engine: Any = None, tokenizer: Any = None, *, loader: Callable[[], tuple[Any, Any]] | None = None,
               model_id: str = "moepack", api_key: str | None = None, max_body: int = MAX_BODY,
               context_length: int | None = None, parallel: int = 1, prompt_cache: int = 2,
               close_engine: bool = False, on_loaded: Callable[[Exception | None], None] | None = None) -> FastAPI:
    """An app serving ``engine`` + ``tokenizer`` now, or what ``loader()`` returns once it has run in a thread
    (``/health`` answers 503 until then; ``on_loaded`` hears how it went). ``engine`` needs ``make_cache()``,
    ``prefill(ids, cache)``, ``config`` and ``stats()`` (runtime/engine.py); tests inject a scripted one."""
    if (engine is None) == (loader is None):
        raise ValueError("pass either engine and tokenizer, or loader")
    st = State(Options(model_id, api_key, max_body, context_length, parallel, prompt_cache))

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
        if st.worker:
            st.worker.close()
        if (close_engine or loader is not None) and st.engine is not None and hasattr(st.engine, "close"):
            st.engine.close()

    app = FastAPI(title="moepack", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API for a moepack model (experts streamed from SSD).")
    app.state.moepack = st
    app.router.route_class = JSONRoute

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "unknown_url", 405: "method_not_allowed"}.get(exc.status_code)
        msg = (f"unknown route: {request.method} {request.url.path}" if exc.status_code == 404 else str(exc.detail))
        response = APIError(exc.status_code, msg, code=code).response()
        response.headers.update(exc.headers or {})  # a 405's Allow (RFC 9110)
        return response

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.exception("request failed")
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").response()

    errors = {s: {"model": S.ErrorResponse} for s in (400, 401, 404, 413, 503)}
    # generation: 500 when it fails (an unreadable expert file...), server-sent events when streaming
    sse_event = {"type": "object", "required": ["data"], "properties": {"data": {
        "type": "string", "description": "A JSON chunk (or an error object), then the last event: [DONE]."}}}
    generating = {**errors, 500: {"model": S.ErrorResponse}, 200: {"content": {"text/event-stream": {
        "schema": sse_event}}, "description": "The reply, or with stream: true its chunks as server-sent events."}}

    @app.get("/health", responses={503: {"model": S.ErrorResponse}})
    async def health():
        """200 once the model is loaded and the worker runs; 503 while loading."""
        st.require_ready()
        return {"status": "ok"}

    @app.get("/stats", responses={s: {"model": S.ErrorResponse} for s in (401, 503)})
    async def stats():
        """Server counters (requests, cancellations, prefix-cache reuse, KV caches held), the engine's I/O and
        compute figures, and the process's memory."""
        st.require_ready()
        return {"server": st.worker.stats(), "engine": st.engine.stats(), "memory": memory_stats()}

    @app.get("/v1/models", response_model=S.ModelList, responses=errors)
    async def models():
        return S.ModelList(data=[S.ModelCard(id=st.opts.model_id, created=st.created,
                                             context_length=st.context_length or None)])

    @app.get("/v1/models/{model_id:path}", response_model=S.ModelCard, responses=errors)
    async def model(model_id: str):
        st.check_model(model_id)
        return S.ModelCard(id=st.opts.model_id, created=st.created, context_length=st.context_length or None)

    def budget(req: S._Sampling, n_prompt: int, limit: int | None) -> int:
        room = st.context_length - n_prompt
        if room < (limit or 1):
            want = f" + {limit} requested tokens" if limit else ""
            raise APIError(400, f"this model's context is {st.context_length} tokens; the prompt has {n_prompt}{want}. "
                           "Shorten the messages or lower max_tokens.",
                           param="messages" if limit is None else "max_tokens", code="context_length_exceeded")
        return limit or room

    def submit(relay: _Relay, ids: list[int], max_tokens: int, req: S._Sampling, logprobs: int | None,
               skip_special: bool) -> Job:
        job = Job(ids, max_tokens, req.sampling(logprobs), relay.emit, req.stop_list(), skip_special)
        st.worker.submit(job)
        return job

    @app.post("/v1/chat/completions", response_model=S.ChatCompletion, responses=generating)
    async def chat_completions(req: S.ChatCompletionRequest, request: Request):
        """Chat completion; ``stream: true`` answers with server-sent events ending in ``data: [DONE]``."""
        st.require_ready()
        st.check_model(req.model)
        tok = st.tokenizer
        tools, fmt = None, None
        if req.tools and req.tool_choice != "none":
            if st.tool_format is None:
                raise APIError(400, "this model's chat template defines no tool calls", param="tools",
                               code="tools_unsupported")
            chosen = req.tool_choice.function.name if isinstance(req.tool_choice, S.NamedToolChoice) else None
            tools = [t.model_dump(exclude_none=True) for t in req.tools if chosen in (None, t.function.name)]
            fmt = st.tool_format
        kwargs = dict(req.chat_template_kwargs or {})
        if clash := RESERVED_TEMPLATE_VARS & kwargs.keys():
            raise APIError(400, f"chat_template_kwargs may not set {sorted(clash)}", param="chat_template_kwargs")
        ids = tok.encode(render_chat(tok, req.messages, tools, kwargs), add_special_tokens=False)
        if not ids:
            raise APIError(400, "the rendered prompt is empty", param="messages")
        max_tokens = budget(req, len(ids), req.token_limit())
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        relay = _Relay()
        job = submit(relay, ids, max_tokens, req, logprobs, skip_special=fmt is None)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            usage_chunks = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_chat_stream(relay, job, rid, created, fmt, usage_chunks),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        got = await _collect(relay, job, request)
        if got is None:
            return JSONResponse({}, status_code=499)  # nobody is listening
        text, samples, done = got
        content, calls = parse(text, fmt)
        finish = "tool_calls" if calls else done.finish_reason
        msg = S.AssistantMessage(content=content, tool_calls=[S.ToolCallOut(**c) for c in calls] or None)
        lps = S.ChoiceLogprobs(content=[_chat_logprobs(tok, x) for x in samples]) if logprobs is not None else None
        return S.ChatCompletion(id=rid, created=created, model=st.opts.model_id, system_fingerprint=FINGERPRINT,
                                choices=[S.ChatChoice(message=msg, finish_reason=finish, logprobs=lps)],
                                usage=_usage(done.usage))

    async def _chat_stream(relay: _Relay, job: Job, rid: str, created: int, fmt: ToolFormat | None,
                           usage_chunks: bool) -> AsyncIterator[str]:
        tools = ToolCallStream(fmt) if fmt else None
        logprobs = job.params.logprobs is not None

        def chunk(delta: dict, finish: str | None = None, lps: list | None = None) -> str:
            c = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": st.opts.model_id,
                 "system_fingerprint": FINGERPRINT,
                 "choices": [{"index": 0, "delta": delta, "logprobs": {"content": lps} if lps is not None else None,
                              "finish_reason": finish}]}
            if usage_chunks:
                c["usage"] = None
            return _sse(c)

        try:
            yield chunk({"role": "assistant", "content": ""})
            async for ev in relay.events():
                if isinstance(ev, Delta):
                    text = tools.push(ev.text) if tools else ev.text
                    lps = [_chat_logprobs(st.tokenizer, ev.sampled).model_dump()] if logprobs else None
                    if text or lps:
                        yield chunk({"content": text}, lps=lps)
                elif isinstance(ev, Failed):
                    yield _sse(APIError(500, ev.message, "server_error", code="generation_failed").body())
                    break
                else:
                    rest, calls = tools.finish() if tools else ("", [])
                    if rest:
                        yield chunk({"content": rest})
                    for i, c in enumerate(calls):
                        yield chunk({"tool_calls": [{"index": i, **c}]})
                    yield chunk({}, "tool_calls" if calls else ev.finish_reason)
                    if usage_chunks:
                        yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                                    "model": st.opts.model_id, "system_fingerprint": FINGERPRINT, "choices": [],
                                    "usage": _usage(ev.usage).model_dump()})
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # a no-op when finished; stops the generation when the client has gone

    @app.post("/v1/completions", response_model=S.Completion, responses=generating)
    async def completions(req: S.CompletionRequest, request: Request):
        """Plain text completion of a prompt (text or token ids)."""
        st.require_ready()
        st.check_model(req.model)
        tok = st.tokenizer
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs (prompt log-probabilities) is not supported", param="echo")
        p = req.prompt_value()
        if isinstance(p, str):
            ids = tok.encode(p)
        else:
            ids = list(p)
            vocab = getattr(tok, "vocab_size", None)
            if any(i < 0 or (vocab and i >= vocab) for i in ids):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        if not ids:
            raise APIError(400, "the prompt encodes to no tokens", param="prompt")
        max_tokens = budget(req, len(ids), req.max_tokens)
        relay = _Relay()
        job = submit(relay, ids, max_tokens, req, req.logprobs, skip_special=True)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prefix = (p if isinstance(p, str) else tok.decode(ids)) if req.echo else ""
        if req.stream:
            usage_chunks = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_completion_stream(relay, job, rid, created, prefix, usage_chunks),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        got = await _collect(relay, job, request)
        if got is None:
            return JSONResponse({}, status_code=499)
        text, samples, done = got
        lp = _completion_logprobs(tok, samples) if req.logprobs is not None else None
        return S.Completion(id=rid, created=created, model=st.opts.model_id, system_fingerprint=FINGERPRINT,
                            choices=[S.CompletionChoice(text=prefix + text, logprobs=lp,
                                                        finish_reason=done.finish_reason)],
                            usage=_usage(done.usage))

    async def _completion_stream(relay: _Relay, job: Job, rid: str, created: int, prefix: str,
                                 usage_chunks: bool) -> AsyncIterator[str]:
        def chunk(text: str, finish: str | None = None, lp: Any = None) -> str:
            c = {"id": rid, "object": "text_completion", "created": created, "model": st.opts.model_id,
                 "system_fingerprint": FINGERPRINT,
                 "choices": [{"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}]}
            if usage_chunks:
                c["usage"] = None
            return _sse(c)

        try:
            if prefix:
                yield chunk(prefix)
            async for ev in relay.events():
                if isinstance(ev, Delta):
                    lp = _completion_logprobs(st.tokenizer, [ev.sampled]).model_dump() \
                        if job.params.logprobs is not None else None
                    if ev.text or lp:
                        yield chunk(ev.text, lp=lp)
                elif isinstance(ev, Failed):
                    yield _sse(APIError(500, ev.message, "server_error", code="generation_failed").body())
                    break
                else:
                    yield chunk("", ev.finish_reason)
                    if usage_chunks:
                        yield _sse({"id": rid, "object": "text_completion", "created": created,
                                    "model": st.opts.model_id, "choices": [], "usage": _usage(ev.usage).model_dump()})
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()

    app.add_middleware(Guard, max_body=max_body, api_key=api_key)
    return app


def memory_stats() -> dict:
    """Resident set size of this process (None where neither /proc nor psutil tells) and MLX's allocator figures."""
    rss = None
    try:
        import psutil

        rss = psutil.Process().memory_info().rss
    except ImportError:
        try:
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    import mlx.core as mx

    return {"rss_bytes": rss, "mlx_active_bytes": mx.get_active_memory(), "mlx_cache_bytes": mx.get_cache_memory()}


def _completion_logprobs(tokenizer, samples: list[Sampled]) -> S.CompletionLogprobs:
    tokens, offsets, pos = [], [], 0
    for s in samples:
        t = _piece(tokenizer, s.token)
        tokens.append(t)
        offsets.append(pos)
        pos += len(t)
    return S.CompletionLogprobs(
        tokens=tokens, token_logprobs=[s.logprob for s in samples], text_offset=offsets,
        top_logprobs=[{_piece(tokenizer, i): lp for i, lp in s.top} for s in samples])


def serve(pack: str | Path, host: str = "127.0.0.1", port: int = 8080, memory_budget: str | int | None = None,
          api_key: str | None = None, model_id: str | None = None, context_length: int | None = None,
          parallel: int = 1, log_level: str = "warning", announce: Callable[[str], None] = log.info,
          engine: Any = None, load_kwargs: dict | None = None) -> None:
    """Run the server until interrupted. It binds at once and loads the pack in the background; a pack that
    fails to load (a budget too small, say) stops the server and raises here. ``engine``: one already loaded
    (rank 0 of a pipeline over several hosts, runtime/distributed.py) instead of loading ``pack`` here;
    ``load_kwargs``: further options for ``moepack.load`` (verify, policy, prefetch)."""
    import uvicorn

    import moepack
    from moepack.runtime.tokenizer import Tokenizer

    tok = Tokenizer(pack)  # a pack without a tokenizer cannot serve: fail before binding
    if not tok.chat_template:
        log.warning("%s has no chat template: /v1/chat/completions will answer 400, /v1/completions works", pack)
    t0 = time.perf_counter()
    failure: list[Exception] = []

    def loaded(error: Exception | None) -> None:
        if error is None:
            announce(f"model loaded in {time.perf_counter() - t0:.1f}s; ready")
        else:
            failure.append(error)
            server.should_exit = True

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this address can use the model", host)
    app = create_app(loader=lambda: (engine or moepack.load(pack, memory_budget=memory_budget, **(load_kwargs or {})), tok),
                     model_id=model_id or Path(pack).resolve().name, api_key=api_key, context_length=context_length,
                     parallel=parallel, on_loaded=loaded)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=5))
    server.run()
    if failure:
        raise failure[0]
