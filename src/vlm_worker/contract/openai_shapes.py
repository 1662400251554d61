"""The OpenAI route's request and response shapes, and the translation to and from jobs.

Pure functions and pydantic models: no engine, no runner. ``serving.openai_route`` runs
the translated job. RunPod forwards ``POST …/openai/v1/chat/completions`` to the worker as a job whose input
is ``{"openai_route": "/v1/chat/completions", "openai_input": <request body>}``. This
module translates the body into a native job, runs it on the same ``JobRunner`` (same
engine, images, templates, batching and limits as native jobs), and translates the native
chunks back: one ``chat.completion`` object, or Server-Sent-Events text framed exactly as
OpenAI frames it (``data: {...}\\n\\n`` … ``data: [DONE]\\n\\n``).

Errors on this route use OpenAI's shape (``{"error": {message, type, param, code}}``).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vlm_worker.contract.errors import ErrorBody, InvalidInput
from vlm_worker.contract.job_schema import MAX_TOP_LOGPROBS, validation_error_to_invalid_input

ROUTE_CHAT = "/v1/chat/completions"
ROUTE_MODELS = "/v1/models"

#: Request fields OpenAI defines that this worker cannot honour: refused by name rather
#: than silently ignored, so a client never believes it got what it did not.
UNSUPPORTED = {
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "parallel_tool_calls": "tool calling is not supported",
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatRequest(BaseModel):
    """The subset of OpenAI's chat request (plus vLLM's sampling extras) that maps onto a job."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extra sampling fields, as its OpenAI server accepts them
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    # vLLM's extra: {json | regex | choice | grammar | json_object}, as on native jobs
    structured_outputs: dict[str, Any] | None = None


# --------------------------------------------------------------------- errors
def openai_error(
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: int | str | None = 400,
) -> dict[str, Any]:
    return {"error": ErrorBody(message=message, type=type, param=param, code=code)}


_TYPE_MAP = {
    "invalid_input": ("invalid_request_error", 400),
    "image_fetch": ("invalid_request_error", 400),
    "image_decode": ("invalid_request_error", 400),
    "prompt": ("invalid_request_error", 400),
    "prompt_too_long": ("invalid_request_error", 400),
    "timeout": ("timeout_error", 408),
    "engine_error": ("server_error", 500),
    "internal": ("server_error", 500),
}


def from_worker_error(
    body: dict[str, Any], aliases: dict[str, str] | None = None
) -> dict[str, Any]:
    """A native error chunk's body in OpenAI's shape; ``field`` becomes ``param``, named
    as the request named it (``aliases``: native field prefix -> request field)."""
    err_type, code = _TYPE_MAP.get(body.get("type", ""), ("server_error", 500))
    field = body.get("field")
    for native, own in (aliases or {}).items():
        if isinstance(field, str) and (field == native or field.startswith(native + ".")):
            field = own
            break
    if isinstance(field, str) and field.startswith("sampling_params."):
        field = field.removeprefix("sampling_params.")
    return openai_error(body.get("message", "error"), type=err_type, param=field, code=code)


# ------------------------------------------------------------- translation in
def parse_request(body: Any) -> ChatRequest:
    """Validate a chat request body; OpenAI features we lack are refused by name first."""
    if not isinstance(body, dict):
        raise InvalidInput("openai_input must be the JSON request body", field="openai_input")
    for name, why in UNSUPPORTED.items():
        if name in body:
            raise InvalidInput(f"{name}: {why}", field=name)
    try:
        return ChatRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_error_to_invalid_input(exc) from None


def to_native(req: ChatRequest) -> dict[str, Any]:
    """The native job input for an OpenAI chat request (errors name OpenAI's fields)."""
    if req.n != 1:
        raise InvalidInput(f"n: only n=1 is supported, got {req.n}", field="n")
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise InvalidInput(
            "set max_tokens or max_completion_tokens, not both", field="max_completion_tokens"
        )
    messages = []
    for i, msg in enumerate(req.messages):
        msg = dict(msg)
        role = msg.get("role")
        if role == "developer":
            msg["role"] = "system"
        elif role in ("tool", "function"):
            raise InvalidInput(
                f"messages[{i}].role: {role!r} messages are not supported",
                field=f"messages[{i}].role",
            )
        msg.pop("name", None)  # OpenAI's participant name has no place in the templates
        if msg.get("role") == "assistant" and msg.get("content") is None:
            raise InvalidInput(
                f"messages[{i}].content: assistant content is required",
                field=f"messages[{i}].content",
            )
        messages.append(msg)
    native: dict[str, Any] = {"messages": messages, "stream": req.stream}
    sampling = {
        "max_tokens": req.max_completion_tokens
        if req.max_completion_tokens is not None
        else req.max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "stop": req.stop,
        "seed": req.seed,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "repetition_penalty": req.repetition_penalty,
        "min_tokens": req.min_tokens,
        "ignore_eos": req.ignore_eos,
        "logit_bias": req.logit_bias,
    }
    native.update({k: v for k, v in sampling.items() if v is not None})
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidInput("top_logprobs: requires logprobs: true", field="top_logprobs")
    if req.logprobs:
        native["logprobs"] = req.top_logprobs or 0
    structured = structured_outputs(req)
    if structured is not None:
        native["structured_outputs"] = structured
    return native


def structured_outputs(req: ChatRequest) -> dict[str, Any] | None:
    """``response_format`` (OpenAI's) or ``structured_outputs`` (vLLM's) as the native
    job's ``sampling_params.structured_outputs``, as vLLM's server maps them."""
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        if req.structured_outputs is not None:
            raise InvalidInput(
                "structured_outputs: set response_format or structured_outputs, not both",
                field="structured_outputs",
            )
        if fmt.type == "json_object":
            return {"json_object": True}
        if fmt.json_schema is None:
            raise InvalidInput(
                "response_format.json_schema: required when type is 'json_schema'",
                field="response_format.json_schema",
            )
        return {"json": fmt.json_schema.schema_}
    return req.structured_outputs


def field_aliases(req: ChatRequest) -> dict[str, str]:
    """The request's own name for native fields an error may name."""
    aliases = {"sampling_params.logprobs": "top_logprobs" if req.top_logprobs else "logprobs"}
    if req.response_format is not None and req.response_format.type != "text":
        aliases["sampling_params.structured_outputs"] = "response_format"
    return aliases


# ------------------------------------------------------------ translation out
class ChatFormatter:
    """Builds OpenAI response objects for one request."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage

    def completion(self, final: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": final.get("text", "")},
                    "finish_reason": final.get("finish_reason"),
                    "logprobs": _logprobs(final),
                }
            ],
            "usage": final.get("usage"),
        }

    def chunk(
        self,
        delta: dict[str, Any],
        finish_reason: str | None = None,
        logprobs: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "delta": delta,
                    "finish_reason": finish_reason,
                    "logprobs": None if logprobs is None else {"content": logprobs},
                }
            ],
        }

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage,
        }


def _logprobs(chunk: dict[str, Any]) -> dict[str, Any] | None:
    return {"content": chunk["logprobs"]} if "logprobs" in chunk else None


def sse(obj: dict[str, Any] | str) -> str:
    data = (
        obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    )
    return f"data: {data}\n\n"
