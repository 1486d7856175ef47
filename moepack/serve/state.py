"""What the server's handlers share, kept on ``app.state.moepack``: its options, the engine and tokenizer once
loaded, and the single generation worker."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from moepack.runtime.template import Renderer
from moepack.serve.constrain import Grammars
from moepack.serve.http import MAX_BODY, APIError
from moepack.serve.reasoning import ReasoningFormat
from moepack.serve.reasoning import format_for as reasoning_for
from moepack.serve.toolcalls import ToolFormat, format_for
from moepack.serve.worker import Worker

log = logging.getLogger(__name__)


@dataclass
class Options:
    model_id: str = "moepack"  # reported in every reply; requests may name any model (one is served)
    aliases: tuple[str, ...] = ()  # further names /v1/models lists (--served-model-name NAME, repeated)
    api_key: str | None = None
    max_body: int = MAX_BODY
    context_length: int | None = None  # default: the model's max_position_embeddings
    parallel: int = 1  # requests decoded together (runtime/batch.py); the rest wait in the queue
    prompt_cache: int = 2  # KV caches kept for prefix reuse
    render_time_limit: float | None = None  # seconds a chat template may render for (None: runtime/template.py's)


class State:
    """The served model and its worker. Set in ``attach`` once loaded (maybe in a thread, after the server has
    bound), so every handler asks ``require_ready`` first."""

    def __init__(self, opts: Options):
        self.opts = opts
        self.engine: Any = None
        self.tokenizer: Any = None
        self.worker: Worker | None = None
        self.renderer: Renderer | None = None  # chat templates, in a child process with a time limit
        self.tool_format: ToolFormat | None = None
        self.grammars: Grammars | None = None
        self.reasoning: ReasoningFormat | None = None  # the template's thinking section, if it has one
        self.context_length = 0
        self.created = int(time.time())
        self.load_error: str | None = None
        self.ready = threading.Event()

    def attach(self, engine: Any, tokenizer: Any) -> None:
        self.engine, self.tokenizer = engine, tokenizer
        cfg = getattr(engine, "config", {}) or {}
        self.context_length = self.opts.context_length or int(cfg.get("max_position_embeddings") or 4096)
        self.tool_format = format_for(tokenizer.chat_template)
        limit = self.opts.render_time_limit
        self.renderer = Renderer() if limit is None else Renderer(time_limit=limit)
        self.grammars = Grammars(tokenizer)
        self.reasoning = reasoning_for(tokenizer.chat_template)
        self.worker = Worker(engine, tokenizer, self.opts.parallel, self.opts.prompt_cache).start()
        self.ready.set()
        log.info("serving %s (context %d, tool calls: %s)", self.opts.model_id, self.context_length,
                 self.tool_format.name if self.tool_format else "none")

    def require_ready(self) -> None:
        if self.load_error:
            raise APIError(500, f"the model failed to load: {self.load_error}", "server_error", code="load_failed")
        if not self.ready.is_set():
            raise APIError(503, "the model is still loading; retry shortly", "server_error", code="model_loading")
        if getattr(self.engine, "healthy", True) is False:  # a pipeline that lost a host (runtime/distributed/)
            raise APIError(503, f"the model is unavailable: {self.engine.error}", "server_error", code="unhealthy")

    def names(self) -> list[str]:
        return [self.opts.model_id, *(a for a in self.opts.aliases if a != self.opts.model_id)]

    def check_model(self, model: str) -> None:
        """For GET /v1/models/{model}: a 404 unless it is one of the served names. (Completions take any name:
        clients send whatever they were configured with, and one model is served.)"""
        if model not in self.names():
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.opts.model_id!r}",
                           param="model", code="model_not_found")

    def close(self) -> None:
        if self.worker:
            self.worker.close()
        if self.renderer:
            self.renderer.close()

    def budget(self, n_prompt: int, limit: int | None) -> int:
        """Tokens a request may generate: ``limit`` (or the rest of the context), if the prompt leaves room."""
        room = self.context_length - n_prompt
        if room < (limit or 1):
            want = f" + {limit} requested tokens" if limit else ""
            raise APIError(400, f"this model's context is {self.context_length} tokens; the prompt has {n_prompt}"
                           f"{want}. Shorten the messages or lower max_tokens.",
                           param="messages" if limit is None else "max_tokens", code="context_length_exceeded")
        return limit or room
