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
from typing import Any, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vlm_worker.contract.errors import ErrorBody, InvalidInput
from vlm_worker.contract.job_schema import validation_error_to_invalid_input

ROUTE_CHAT = "/v1/chat/completions"
ROUTE_COMPLETIONS = "/v1/completions"
ROUTE_MODELS = "/v1/models"

#: Request fields OpenAI defines that this worker cannot honour: refused by name rather
#: than silently ignored, so a client never believes it got what it did not.
UNSUPPORTED = {
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
}


RequestT = TypeVar("RequestT", bound=BaseModel)


class ToolReader(Protocol):
    """What the chat formatter needs of tool calling (``serving.tool_calls.ToolCalls``)."""

    def message(
        self, text: str, token_ids: list[int] | None, finish_reason: str | None
    ) -> tuple[dict[str, Any], str]: ...

    def delta(
        self, index: int, text: str, token_ids: list[int] | None, finished: bool
    ) -> dict[str, Any] | None: ...

    def stream_finish_reason(self, index: int, finish_reason: str | None) -> str: ...


#: Completions fields this worker cannot honour.
UNSUPPORTED_COMPLETIONS = {
    "suffix": "suffix (insertion) is not supported",
    "best_of": "best_of is not supported",
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingRequest(BaseModel):
    """The fields OpenAI's chat and completions requests share (plus vLLM's extras)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(1, ge=1)
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
    # vLLM's extra: {json | regex | choice | grammar | json_object}, as on native jobs
    structured_outputs: dict[str, Any] | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class GroundingRequest(BaseModel):
    """The worker's extra (``extra_body={"grounding": {...}}`` in the ``openai`` client):
    the request's messages are a grounding job's (one screenshot, the element's
    description); the answer comes back with a ``grounding`` object beside ``choices``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    constrain: bool | None = None
    system_prompt: str | None = None


class ChatRequest(SamplingRequest):
    """The subset of OpenAI's chat request that maps onto a job."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    # read by vLLM's own request model and tool parsers (serving.tool_calls)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    grounding: GroundingRequest | None = None


class CompletionRequest(SamplingRequest):
    """OpenAI's (legacy) completions request: a text prompt, continued as it is."""

    prompt: str | list[str] = Field(min_length=1)
    # OpenAI's and vLLM's default for this route, unlike chat's
    max_tokens: int | None = 16
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False


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
    return _parse(body, ChatRequest, UNSUPPORTED)


def parse_completion_request(body: Any) -> CompletionRequest:
    return _parse(body, CompletionRequest, UNSUPPORTED_COMPLETIONS)


def _parse(body: Any, model: type[RequestT], refused: dict[str, str]) -> RequestT:
    if not isinstance(body, dict):
        raise InvalidInput("openai_input must be the JSON request body", field="openai_input")
    for name, why in refused.items():
        if name in body:
            raise InvalidInput(f"{name}: {why}", field=name)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise validation_error_to_invalid_input(exc) from None


def to_native(req: ChatRequest) -> dict[str, Any]:
    """The native job input for an OpenAI chat request (errors name OpenAI's fields)."""
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
        elif role == "function":
            raise InvalidInput(
                f"messages[{i}].role: 'function' messages (deprecated by OpenAI) are not "
                "supported; send 'tool' messages",
                field=f"messages[{i}].role",
            )
        msg.pop("name", None)  # OpenAI's participant name has no place in the templates
        if msg.get("role") == "assistant" and msg.get("content") is None:
            if not msg.get("tool_calls"):
                raise InvalidInput(
                    f"messages[{i}].content: assistant content is required (or tool_calls)",
                    field=f"messages[{i}].content",
                )
            msg["content"] = None
        messages.append(msg)
    native: dict[str, Any] = {"messages": messages, **_sampling(req)}
    if req.chat_template_kwargs is not None:
        native["chat_template_kwargs"] = req.chat_template_kwargs
    if req.mm_processor_kwargs is not None:
        native["mm_processor_kwargs"] = req.mm_processor_kwargs
    if req.max_completion_tokens is not None:
        native["max_tokens"] = req.max_completion_tokens
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidInput("top_logprobs: requires logprobs: true", field="top_logprobs")
    if req.logprobs:
        native["logprobs"] = req.top_logprobs or 0
    structured = structured_outputs(req)
    if structured is not None:
        native["structured_outputs"] = structured
    if req.grounding is not None:
        native["task"] = "grounding"
        native |= req.grounding.model_dump(exclude_none=True)
    return native


def completion_to_native(req: CompletionRequest) -> dict[str, Any]:
    """The native job for a completions request: a raw prompt, no chat template."""
    prompt = req.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise InvalidInput(
                f"prompt: one prompt per request is served, got {len(prompt)}", field="prompt"
            )
        prompt = prompt[0]
    if not prompt:
        raise InvalidInput("prompt: must not be empty", field="prompt")
    native: dict[str, Any] = {"prompt": prompt, **_sampling(req)}
    if req.logprobs is not None:
        native["logprobs"] = req.logprobs
        if req.echo:  # the prompt's tokens are echoed with theirs, as vllm serve does
            native["prompt_logprobs"] = req.logprobs
    if req.structured_outputs is not None:
        native["structured_outputs"] = req.structured_outputs
    return native


def _sampling(req: SamplingRequest) -> dict[str, Any]:
    sampling = {
        "n": req.n if req.n != 1 else None,
        "stream": req.stream,
        "max_tokens": req.max_tokens,
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
    return {k: v for k, v in sampling.items() if v is not None}


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


def field_aliases(req: ChatRequest | CompletionRequest) -> dict[str, str]:
    """The request's own name for native fields an error may name."""
    if isinstance(req, CompletionRequest):
        return {"sampling_params.prompt_logprobs": "logprobs", "messages": "prompt"}
    aliases = {"sampling_params.logprobs": "top_logprobs" if req.top_logprobs else "logprobs"}
    if req.response_format is not None and req.response_format.type != "text":
        aliases["sampling_params.structured_outputs"] = "response_format"
    if req.grounding is not None:
        aliases |= {"constrain": "grounding.constrain", "task": "grounding"}
    return aliases


# ------------------------------------------------------------ translation out
class ChatFormatter:
    """Builds OpenAI response objects for one request."""

    def __init__(
        self,
        model: str,
        include_usage: bool,
        top_logprobs: int = 0,
        n: int = 1,
        tools: ToolReader | None = None,
    ) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        self.top_logprobs = top_logprobs
        self.n = n
        #: Reads tool calls out of answers (``serving.tool_calls``), when the request has tools.
        self.tools = tools

    def _message(self, choice: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        text, reason = choice.get("text", ""), choice.get("finish_reason")
        if self.tools is None:
            return {"role": "assistant", "content": text}, reason
        return self.tools.message(text, choice.get("token_ids"), reason)

    def logprobs(self, entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
        """OpenAI's ``choice.logprobs``: per token, the first ``top_logprobs`` entries of
        vLLM's step, as ``vllm serve``'s chat route cuts them."""
        if entries is None:
            return None
        return {
            "content": [
                {
                    "token": e["token"],
                    "logprob": -9999.0 if e["logprob"] is None else e["logprob"],
                    "bytes": e["bytes"],
                    "top_logprobs": (e["top_logprobs"] or [])[: self.top_logprobs],
                }
                for e in entries
            ]
        }

    def completion(self, final: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": choice.get("index", 0),
                    "message": message,
                    "finish_reason": reason,
                    "logprobs": self.logprobs(choice.get("logprobs")),
                }
                for choice in final.get("choices", [final])
                for message, reason in [self._message(choice)]
            ],
            "usage": final.get("usage"),
            **({"grounding": final["grounding"]} if "grounding" in final else {}),
        }

    def chunk(
        self,
        delta: dict[str, Any],
        finish_reason: str | None = None,
        logprobs: list[dict[str, Any]] | None = None,
        index: int = 0,
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": index,
                    "delta": delta,
                    "finish_reason": finish_reason,
                    "logprobs": self.logprobs(logprobs),
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


def sse(obj: dict[str, Any] | str) -> str:
    data = (
        obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    )
    return f"data: {data}\n\n"


class CompletionFormatter:
    """Builds OpenAI ``text_completion`` objects for one completions request, echo and
    logprobs included, as ``vllm serve`` builds them."""

    def __init__(self, model: str, req: CompletionRequest, prompt: str) -> None:
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = req.include_usage
        self.top_logprobs = req.logprobs
        self.echo = req.echo
        self.prompt = prompt
        self._echoed: set[int] = set()  # choices whose text began with the prompt
        self._text_len: dict[int, int] = {}  # each choice's generated text streamed so far
        self._prompt_logprobs: list[dict[str, Any]] | None = None

    def _with_echo(
        self, chunk: dict[str, Any], index: int
    ) -> tuple[str, list[dict[str, Any]] | None]:
        """This chunk's text and logprob entries, the prompt's put first once per choice
        if echoed."""
        text, entries = chunk.get("text", ""), chunk.get("logprobs")
        self._prompt_logprobs = chunk.get("prompt_logprobs") or self._prompt_logprobs
        if self.echo and index not in self._echoed:
            self._echoed.add(index)
            text = self.prompt + text
            if entries is not None:
                entries = [*(self._prompt_logprobs or []), *entries]
        return text, entries

    def logprobs(self, entries: list[dict[str, Any]] | None, offset: int) -> dict[str, Any] | None:
        """The completions route's logprobs: parallel lists, and per token a dict of the
        step's first ``logprobs + 1`` entries (OpenAI returns one more than asked)."""
        if entries is None or self.top_logprobs is None:
            return None
        offsets, at = [], offset
        for e in entries:
            offsets.append(at)
            at += len(e["token"])
        return {
            "text_offset": offsets,
            "token_logprobs": [e["logprob"] for e in entries],
            "tokens": [e["token"] for e in entries],
            "top_logprobs": [
                None
                if e["top_logprobs"] is None
                else {t["token"]: t["logprob"] for t in e["top_logprobs"][: self.top_logprobs + 1]}
                for e in entries
            ],
        }

    def _choice(self, chunk: dict[str, Any], offset: int | None) -> dict[str, Any]:
        index = chunk.get("index", 0)
        text, entries = self._with_echo(chunk, index)
        start = self._text_len.get(index, 0) if offset is None else offset
        if offset is None:
            self._text_len[index] = start + len(chunk.get("text", ""))
        return {
            "index": index,
            "text": text,
            "logprobs": self.logprobs(entries, start),
            "finish_reason": chunk.get("finish_reason"),
        }

    def completion(self, final: dict[str, Any]) -> dict[str, Any]:
        self._prompt_logprobs = final.get("prompt_logprobs")
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [self._choice(c, 0) for c in final.get("choices", [final])],
            "usage": final.get("usage"),
        }

    def chunk(self, native: dict[str, Any]) -> dict[str, Any]:
        """A streamed chunk for one native chunk (a choice's end carries its reason)."""
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [self._choice(native, None)],
        }

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage,
        }
