"""RunPod's ``/openai/v1`` jobs: an OpenAI request in, the native job run, OpenAI out.

The shapes and their translation live in ``contract.openai_shapes``; this module owns
the route's control flow: which route, which model, streamed (SSE text chunks) or not.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from vlm_worker.contract.errors import InvalidInput, WorkerError
from vlm_worker.contract.job_schema import check_size
from vlm_worker.contract.openai_shapes import (
    ROUTE_CHAT,
    ROUTE_COMPLETIONS,
    ROUTE_MODELS,
    ChatFormatter,
    CompletionFormatter,
    RequestT,
    completion_to_native,
    field_aliases,
    from_worker_error,
    openai_error,
    parse_completion_request,
    parse_request,
    sse,
    to_native,
)
from vlm_worker.pipeline.runner import JobRunner
from vlm_worker.serving.tool_calls import ToolCalls, uses_tools


class ModelNotFound(InvalidInput):
    """A request naming another model: OpenAI answers 404 ``model_not_found``."""


class OpenAIRoute:
    def __init__(self, runner: JobRunner) -> None:
        self.runner = runner
        self.settings = runner.settings

    @property
    def model_id(self) -> str:
        return self.settings.openai_model_id

    async def handle(self, job_id: str, route: Any, body: Any) -> AsyncIterator[Any]:
        if route == ROUTE_MODELS:
            yield self._models()
            return
        if route not in (ROUTE_CHAT, ROUTE_COMPLETIONS):
            yield openai_error(
                f"route {route!r} is not served; supported: {ROUTE_CHAT}, "
                f"{ROUTE_COMPLETIONS}, {ROUTE_MODELS}",
                param="openai_route",
                code=404,
            )
            return
        try:
            if route == ROUTE_CHAT:
                if isinstance(body, dict):  # sizes before pydantic walks all of it
                    check_size(
                        body, self.settings.max_job_text_chars, self.settings.max_content_parts
                    )
                chat = self._check_model(parse_request(body))
                native, aliases = to_native(chat), field_aliases(chat)
                tools = None
                if uses_tools(body):
                    tokenizer = self.runner.engine.info.tokenizer
                    tools = ToolCalls.for_request(body, self.settings, tokenizer)
                    native.update(tools.native_fields())
                fmt: ChatFormatter | CompletionFormatter = ChatFormatter(
                    self.model_id, chat.include_usage, chat.top_logprobs or 0, chat.n, tools
                )
                stream = chat.stream
            else:
                completion = self._check_model(parse_completion_request(body))
                native, aliases = completion_to_native(completion), field_aliases(completion)
                fmt = CompletionFormatter(self.model_id, completion, native["prompt"])
                stream = completion.stream
        except ModelNotFound as err:
            yield openai_error(err.message, param="model", code="model_not_found")
            return
        except WorkerError as err:
            yield from_worker_error(err.to_dict()["error"])
            return
        requested = body.get("model") if isinstance(body, dict) else None
        if requested in self.runner.adapters:  # this request runs on a LoRA adapter
            native["model"] = requested
        chunks = self.runner.run({"id": job_id, "input": native})
        if stream:
            streamer = self._stream_chat if isinstance(fmt, ChatFormatter) else self._stream_text
            async for item in streamer(chunks, fmt, aliases):  # type: ignore[arg-type]
                yield item
            return
        async for chunk in chunks:
            if "error" in chunk:
                yield from_worker_error(chunk["error"], aliases)
            else:
                yield fmt.completion(chunk)

    def _models(self) -> dict[str, Any]:
        """The base model and each LoRA adapter, whose ``parent`` is the base (as vLLM)."""
        created = int(time.time())
        base = {
            "id": self.model_id,
            "object": "model",
            "created": created,
            "owned_by": "vlm-worker",
        }
        adapters = [
            {**base, "id": name, "root": adapter.path, "parent": self.model_id}
            for name, adapter in self.runner.adapters.items()
        ]
        return {"object": "list", "data": [base, *adapters]}

    def _check_model(self, req: RequestT) -> RequestT:
        model = getattr(req, "model", None)
        known = model is None or model == self.model_id or model in self.runner.adapters
        if not known and not self.settings.openai_accept_any_model:
            raise ModelNotFound(
                f"The model `{model}` does not exist; this endpoint serves "
                f"{', '.join(f'`{m}`' for m in [self.model_id, *self.runner.adapters])}",
                field="model",
            )
        return req

    async def _stream_chat(
        self,
        chunks: AsyncIterator[dict[str, Any]],
        fmt: ChatFormatter,
        aliases: dict[str, str],
    ) -> AsyncIterator[Any]:
        started = False
        async for chunk in chunks:
            if "error" in chunk:
                yield _error(chunk["error"], aliases, started)
                return
            parts = []
            if not started:
                for index in range(fmt.n):
                    role = {"role": "assistant", "content": ""}
                    parts.append(sse(fmt.chunk(role, index=index)))
                started = True
            index = chunk.get("index", 0)
            ends = "finish_reason" in chunk  # this choice's end (every choice's, when n is 1)
            text = chunk.get("text", "")
            delta, reason = ({"content": text} if text else None), chunk.get("finish_reason")
            if fmt.tools is not None and ("text" in chunk or ends):
                # the parser decides what of the text is content and what a tool call
                delta = fmt.tools.delta(index, text, chunk.get("token_ids"), finished=ends)
                reason = fmt.tools.stream_finish_reason(index, reason)
            if delta:
                parts.append(sse(fmt.chunk(delta, None, chunk.get("logprobs"), index)))
            if ends:
                end = fmt.chunk({}, reason, index=index)
                if "grounding" in chunk:  # a grounding request's result, with its end
                    end["grounding"] = chunk["grounding"]
                parts.append(sse(end))
            if "usage" in chunk:  # the job's last chunk
                if fmt.include_usage:
                    parts.append(sse(fmt.usage_chunk(chunk["usage"])))
                parts.append(sse("[DONE]"))
            yield "".join(parts)

    async def _stream_text(
        self,
        chunks: AsyncIterator[dict[str, Any]],
        fmt: CompletionFormatter,
        aliases: dict[str, str],
    ) -> AsyncIterator[Any]:
        started = False
        async for chunk in chunks:
            if "error" in chunk:
                yield _error(chunk["error"], aliases, started)
                return
            started = True
            parts = []
            if "text" in chunk:  # not the summary that ends a job of several choices
                parts.append(sse(fmt.chunk(chunk)))
            if "usage" in chunk:
                if fmt.include_usage:
                    parts.append(sse(fmt.usage_chunk(chunk["usage"])))
                parts.append(sse("[DONE]"))
            yield "".join(parts)


def _error(body: dict[str, Any], aliases: dict[str, str], started: bool) -> Any:
    """An error in OpenAI's shape: the object itself before the stream has begun (the
    gateway answers with its status), or, once SSE text has gone out, one framed event and
    ``[DONE]``, as ``vllm serve`` ends a stream that fails midway."""
    error = from_worker_error(body, aliases)
    return sse(error) + sse("[DONE]") if started else error


#: Keys of the job forms that carry an OpenAI request: RunPod's gateway sends
#: ``openai_route`` (+ ``openai_input``); proxy workers also take ``route`` + ``body``.
_OPENAI_KEYS = {"openai_route", "openai_input"}
_ROUTE_KEYS = {"route", "body", "method"}


def openai_request(job_input: Any) -> tuple[str, Any] | None:
    """``(route, body)`` of a job in one of the OpenAI forms, or None for a native job.

    ``{"openai_route", "openai_input"}`` as RunPod's gateway sends it (``openai_input``
    alone means chat completions; ``openai_route`` alone, e.g. ``/v1/models``, a GET);
    ``{"route", "body"[, "method"]}`` as generic proxy workers take it.
    """
    if not isinstance(job_input, dict):
        return None
    keys = set(job_input)
    if keys & _OPENAI_KEYS:
        extra = sorted(keys - _OPENAI_KEYS)
        if extra:
            raise InvalidInput(f"{extra[0]}: unknown field beside openai_route", field=extra[0])
        return str(job_input.get("openai_route") or ROUTE_CHAT), job_input.get("openai_input")
    if "route" in keys:
        extra = sorted(keys - _ROUTE_KEYS)
        if extra:
            raise InvalidInput(f"{extra[0]}: unknown field beside route", field=extra[0])
        method = str(job_input.get("method") or "").upper()
        if method not in ("", "GET", "POST"):
            raise InvalidInput(f"method: {method!r} is not served; GET or POST", field="method")
        return str(job_input["route"]), job_input.get("body")
    return None
