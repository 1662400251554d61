"""RunPod's ``/openai/v1`` jobs: an OpenAI request in, the native job run, OpenAI out.

The shapes and their translation live in ``contract.openai_shapes``; this module owns
the route's control flow: which route, which model, streamed (SSE text chunks) or not.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from vlm_worker.contract.errors import InvalidInput, WorkerError
from vlm_worker.contract.openai_shapes import (
    ROUTE_CHAT,
    ROUTE_MODELS,
    ChatFormatter,
    ChatRequest,
    field_aliases,
    from_worker_error,
    openai_error,
    parse_request,
    sse,
    to_native,
)
from vlm_worker.pipeline.runner import JobRunner


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
            yield {
                "object": "list",
                "data": [
                    {
                        "id": self.model_id,
                        "object": "model",
                        "created": int(time.time()),
                        "owned_by": "vlm-worker",
                    }
                ],
            }
            return
        if route != ROUTE_CHAT:
            yield openai_error(
                f"route {route!r} is not served; supported: {ROUTE_CHAT}, {ROUTE_MODELS}",
                param="openai_route",
                code=404,
            )
            return
        try:
            req = self._parse(body)
            native = to_native(req)
        except ModelNotFound as err:
            yield openai_error(err.message, param="model", code="model_not_found")
            return
        except WorkerError as err:
            yield from_worker_error(err.to_dict()["error"])
            return
        fmt = ChatFormatter(
            self.model_id, bool(req.stream_options and req.stream_options.include_usage)
        )
        aliases = field_aliases(req)
        chunks = self.runner.run({"id": job_id, "input": native})
        if req.stream:
            async for item in self._stream(chunks, fmt, aliases):
                yield item
        else:
            async for chunk in chunks:
                if "error" in chunk:
                    yield from_worker_error(chunk["error"], aliases)
                else:
                    yield fmt.completion(chunk)

    def _parse(self, body: Any) -> ChatRequest:
        req = parse_request(body)
        if (
            req.model is not None
            and req.model != self.model_id
            and not self.settings.openai_accept_any_model
        ):
            raise ModelNotFound(
                f"The model `{req.model}` does not exist; this endpoint serves `{self.model_id}`",
                field="model",
            )
        return req

    async def _stream(
        self,
        chunks: AsyncIterator[dict[str, Any]],
        fmt: ChatFormatter,
        aliases: dict[str, str],
    ) -> AsyncIterator[Any]:
        started = False
        async for chunk in chunks:
            if "error" in chunk:
                yield from_worker_error(chunk["error"], aliases)
                return
            parts = []
            if not started:
                parts.append(sse(fmt.chunk({"role": "assistant", "content": ""})))
                started = True
            if chunk.get("text"):
                parts.append(
                    sse(fmt.chunk({"content": chunk["text"]}, None, chunk.get("logprobs")))
                )
            if "finish_reason" in chunk:
                parts.append(sse(fmt.chunk({}, chunk["finish_reason"])))
                if fmt.include_usage:
                    parts.append(sse(fmt.usage_chunk(chunk["usage"])))
                parts.append(sse("[DONE]"))
            yield "".join(parts)


def is_openai_job(job_input: Any) -> bool:
    return isinstance(job_input, dict) and "openai_route" in job_input
