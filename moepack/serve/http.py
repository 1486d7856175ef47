"""HTTP plumbing of the server, apart from what it serves: the guard (body size, API key), strict JSON bodies,
and every error in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``, including unknown routes,
invalid JSON and oversized bodies, so that OpenAI clients can read them.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from typing import Any, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)
access_log = logging.getLogger("moepack.serve.access")  # one line per request (`moepack serve` shows them)

MAX_BODY = 8 << 20
MAX_DEPTH = 64  # JSON nesting a request may have (tool parameter schemas are the deepest real ones)


class APIError(Exception):
    """An error answered to the client as OpenAI answers it (status, type, offending param, code)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# ---- the guard: body size and API key, before anything parses the request ------------------------


class Guard:
    """Pure ASGI middleware: one access-log line per request; 413 for bodies over ``max_body`` (declared or
    streamed), 401 without the API key on every route but /health (a load balancer's probe carries no key).

    The body is read here (bounded) and replayed to the app; later ``receive`` calls pass through, so the app
    still hears the client disconnect. A body is read as JSON whatever its Content-Type says, as llama-server
    reads it: clients send none, or curl's ``-d`` default, ``application/x-www-form-urlencoded``.
    """

    def __init__(self, app, max_body: int, api_key: str | None):
        self.app, self.max_body = app, max_body
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), 0

        async def sent(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.guarded(scope, receive, sent)
        finally:
            client = "%s:%s" % tuple(scope["client"]) if scope.get("client") else "-"
            access_log.info('%s "%s %s" %s %.3fs', client, scope["method"], scope["path"], status or "-",
                            time.perf_counter() - t0)

    async def guarded(self, scope, receive, send):
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
        if chunks:
            heads = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
            scope = {**scope, "headers": [*heads, (b"content-type", b"application/json")]}

        async def replay():
            return pending.pop() if pending else await receive()

        return await self.app(scope, replay, send)


# ---- validation errors as OpenAI's 400s -----------------------------------------------------------

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


def validation_error(exc: RequestValidationError) -> APIError:
    """The first of pydantic's complaints, worded and coded as OpenAI words and codes it."""
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


# ---- strict JSON bodies ---------------------------------------------------------------------------

_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how a surrogate gets into JSON text (UTF-8 has none)
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKET = np.zeros(128, np.int8)  # +1 for an opening bracket, -1 for a closing one, by ASCII code
_BRACKET[[ord("["), ord("{")]], _BRACKET[[ord("]"), ord("}")]] = 1, -1


def _nesting(text: str) -> int:
    """How deep arrays and objects nest in valid JSON ``text``, at C speed: strings removed, what is left is
    ASCII, and the depth is the highest running count of brackets opened minus closed."""
    skeleton = np.frombuffer(_STRING.sub("", text).encode("ascii"), np.uint8)
    return int(np.cumsum(_BRACKET[skeleton], dtype=np.int32).max(initial=0))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def parse_body(body: bytes) -> Any:
    """A request body as strict JSON (RFC 8259), checked before any handler or the model sees it: UTF-8 only,
    then :func:`parse_json`."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (at byte {e.start})", code="invalid_json")
    return parse_json(text)


def parse_json(text: str, what: str = "the request body", param: str | None = None) -> Any:
    """``text`` as strict JSON: no NaN/Infinity literals (Python's json would accept them), at most MAX_DEPTH
    levels of nesting (Python's own limit is a RecursionError), and no lone surrogates (a ``\\ud800`` escape
    decodes to a str that cannot be encoded back to UTF-8, which the tokenizer and the response writer would fail
    on). ``what`` and ``param`` name the text in errors (a body, or a JSON string inside one)."""
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise APIError(400, f"{what} nests deeper than {MAX_DEPTH} levels", param=param, code="invalid_json")
    except ValueError as e:
        raise APIError(400, f"{what} is not valid JSON: {e}", param=param, code="invalid_json")
    if _nesting(text) <= MAX_DEPTH and not _SURROGATE_ESCAPE.search(text):
        return obj  # nothing to find: the walk below (seconds for millions of nodes) only names what is wrong
    stack: list[tuple[Any, int, tuple]] = [(obj, 0, ())]
    while stack:  # iterative: a walk must not hit the recursion limit either
        node, depth, path = stack.pop()
        if isinstance(node, str):
            if not node.isascii() and _SURROGATE.search(node):
                raise APIError(400, "a string holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape)",
                               param=param or _param(path), code="invalid_value")
            continue
        if not isinstance(node, (dict, list)):
            continue
        if depth >= MAX_DEPTH:
            raise APIError(400, f"{what} nests deeper than {MAX_DEPTH} levels", param=param or _param(path[:1]),
                           code="invalid_json")
        for k, v in (node.items() if isinstance(node, dict) else enumerate(node)):
            if isinstance(k, str) and not k.isascii() and _SURROGATE.search(k):
                stack.append((k, depth, path))
            if isinstance(v, (str, dict, list)):
                stack.append((v, depth + 1, (*path, k)))
    return obj


def read_body(body: bytes, model: type[BaseModel] | None) -> Any:
    """A request body parsed (:func:`parse_body`) and validated against ``model``, as FastAPI would validate it.
    Runs in a worker thread: an 8 MiB body takes seconds, which must not stall the event loop (and /health)."""
    obj = parse_body(body)
    if model is None:
        return obj
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False)])


class JSONRoute(APIRoute):
    """Routes whose JSON body is parsed by :func:`parse_body` and validated in a worker thread
    (:func:`read_body`); FastAPI then finds the validated model (``request._json``, Starlette's cache) and takes it
    as it is (pydantic does not validate an instance of the model again), instead of parsing the body a second
    time, leniently, on the event loop."""

    def get_route_handler(self) -> Callable:
        handle = super().get_route_handler()
        body = self.dependant.body_params
        model = body[0].field_info.annotation if len(body) == 1 else None
        model = model if isinstance(model, type) and issubclass(model, BaseModel) else None

        async def parsed_first(request: Request):
            if raw := await request.body():  # the Guard has marked every body as JSON
                request._json = await run_in_threadpool(read_body, raw, model)
            return await handle(request)

        return parsed_first


# ---- every error in OpenAI's shape --------------------------------------------------------------


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    return validation_error(exc).response()


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "unknown_url", 405: "method_not_allowed"}.get(exc.status_code)
    msg = f"unknown route: {request.method} {request.url.path}" if exc.status_code == 404 else str(exc.detail)
    response = APIError(exc.status_code, msg, code=code).response()
    response.headers.update(exc.headers or {})  # a 405's Allow (RFC 9110)
    return response


async def _crash(request: Request, exc: Exception) -> JSONResponse:
    log.exception("request failed")
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").response()


def install(app: FastAPI, max_body: int, api_key: str | None) -> None:
    """Give ``app`` the guard, strict JSON bodies on its routes and OpenAI-shaped errors for every failure."""
    app.router.route_class = JSONRoute
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _crash)
    app.add_middleware(Guard, max_body=max_body, api_key=api_key)
