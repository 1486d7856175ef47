"""Request and response bodies of the OpenAI-compatible API, as pydantic models.

Types are strict (``"0.7"`` is not a temperature, ``1.0`` is not a token count) and ranges are OpenAI's, so a
malformed request is answered with a 400 naming the field before it can reach the model. An unknown top-level
parameter is a 400 too (``unknown_parameter``, as OpenAI answers): a sampling option this server does not
implement (``logit_bias``, llama.cpp's ``mirostat``...) must not be silently dropped.
OpenAI's parameters that change nothing here (``user``, ``metadata``, ``store``, ``service_tier``) are accepted
and ignored. Inside messages and tools, unknown keys are ignored: clients send back the assistant messages they
received, with keys such as ``refusal`` or ``annotations``. Lists stop at their first bad item (``fail_fast``):
8 MiB of ``[{}, {}, ...]`` would otherwise build millions of errors, seconds of work holding the GIL.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from moepack.runtime.sampling import SamplingParams

MAX_STOP = 16
FAIL_FAST = Field(fail_fast=True)  # for lists inside a union (a field's own Field takes fail_fast=True)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


# ---- requests -------------------------------------------------------------------------------


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str = Field(min_length=1)
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[TextPart], FAIL_FAST] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, fail_fast=True)
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        for part in content if isinstance(content, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                raise ValueError(f"content parts of type {kind!r} are not supported: this server runs a text-only "
                                 'model; send text, or parts of type "text"')
        return content

    @model_validator(mode="after")
    def _check(self) -> "Message":
        if self.role != "assistant" and self.content is None:
            raise ValueError(f"a {self.role} message needs content")
        if self.role == "assistant" and self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs content or tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def text(self) -> str | None:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content


class FunctionDef(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_\-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """``text`` (no constraint), ``json_object`` (any JSON object) or ``json_schema`` (JSON valid against the
    schema); both JSON kinds are enforced by constrained decoding (serve/constrain.py)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _check(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs json_schema")
        return self


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: str | None = Field(None, description="Served model id (see /v1/models); optional here.")
    max_tokens: int | None = Field(None, ge=1,
                                   description="Tokens to generate at most (default: the rest of the context).")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="Keep the k most likely tokens (0 or -1: off).")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: str | Annotated[list[str], FAIL_FAST] | None = None
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    metadata: dict[str, str] | None = Field(None, description="Accepted and ignored.")
    store: bool | None = Field(None, description="Accepted and ignored (nothing is stored).")
    service_tier: str | None = Field(None, description="Accepted and ignored.")

    @model_validator(mode="after")
    def _check_stop(self) -> "_Sampling":
        stops = self.stop_list()
        if len(stops) > MAX_STOP:
            raise ValueError(f"stop takes at most {MAX_STOP} sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling(self, logprobs: int | None) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=max(self.top_k, 0),
                              min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              seed=self.seed, logprobs=logprobs)


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1, fail_fast=True)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, fail_fast=True)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = Field(
        None, description="Thinking models: \"none\" turns thinking off where the template can (Qwen3, GLM, "
        "DeepSeek-V3.1); other values reach templates that read them (gpt-oss).")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="Extra variables for the chat template, "
                                                        "e.g. {\"enable_thinking\": false}.")

    @model_validator(mode="after")
    def _check_chat(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tools:
            if self.tool_choice.function.name not in {t.function.name for t in self.tools}:
                raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], FAIL_FAST] | Annotated[list[int], FAIL_FAST] | Annotated[
            list[Annotated[list[int], FAIL_FAST]], FAIL_FAST] = Field(
        description="Text or token ids; a list must hold exactly one prompt (n=1, no batching).")
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = Field(None, ge=1, le=1)
    suffix: None = Field(None, description="Not supported (no fill-in-the-middle).")

    @model_validator(mode="after")
    def _check_prompt(self) -> "CompletionRequest":
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ValueError("one prompt per request (a list of prompts must have exactly one)")
        if p == [] or p == [[]] or p == "":
            raise ValueError("prompt must not be empty")
        return self

    def prompt_value(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            return p[0]  # type: ignore[return-value]
        return p  # type: ignore[return-value]


# ---- responses ------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageOut
    system_fingerprint: str | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageOut
    system_fingerprint: str | None = None


# ---- stream chunks (``stream: true``) ---------------------------------------------------------


class _Delta(BaseModel):
    """Keys left None are omitted, as in OpenAI's deltas."""

    @model_serializer(mode="wrap")
    def _omit_none(self, handler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class FunctionDelta(_Delta):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Delta):
    """A call's first delta has its id, type and name (arguments ""), the next ones its arguments, as OpenAI sends."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


class ChatDelta(_Delta):
    """What a chunk adds to the reply (``{}`` ends it). ``reasoning_content``: the thinking section of a reasoning
    model, apart from the answer."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class CompletionChunkChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class _Chunk(BaseModel):
    """Fields of every chunk. ``usage`` is sent (null until the last chunk) only when the request asked for it
    with ``stream_options.include_usage``; the writer leaves it out otherwise."""

    id: str
    object: str
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[Any]
    usage: UsageOut | None = None


class ChatCompletionChunk(_Chunk):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class CompletionChunk(_Chunk):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChunkChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moepack"
    context_length: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
