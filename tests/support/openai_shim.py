"""Test support: a tiny stand-in for RunPod's OpenAI gateway.

RunPod turns ``POST …/openai/v1/chat/completions`` into a job
``{"openai_route": "/v1/chat/completions", "openai_input": <body>}`` and relays what the
handler yields: the one object for a non-streamed request, the concatenated SSE text for
a streamed one. This shim does the same over HTTP on loopback so the real ``openai``
client can be pointed at the worker. It is not part of the product.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

from aiohttp import web

_STATUS = {"model_not_found": 404}


def _status(error: dict[str, Any]) -> int:
    code = error.get("code")
    if isinstance(code, int):
        return code
    return _STATUS.get(str(code), 400)


class OpenAIShim:
    def __init__(self, handler: Any) -> None:
        self.handler = handler
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None

    async def _job(self, request: web.Request, route: str, body: Any) -> web.StreamResponse:
        job_input: dict[str, Any] = {"openai_route": route}
        if body is not None:
            job_input["openai_input"] = body
        gen = self.handler({"id": f"shim-{uuid.uuid4().hex[:8]}", "input": job_input})
        first = await gen.__anext__()
        if isinstance(first, dict):
            if "error" in first:
                return web.json_response(first, status=_status(first["error"]))
            return web.json_response(first)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(first.encode())
        async for item in gen:
            if isinstance(item, dict):  # an error after the stream started
                import json

                await resp.write(f"data: {json.dumps(item)}\n\n".encode())
                break
            await resp.write(item.encode())
        await resp.write_eof()
        return resp

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._job(request, "/v1/chat/completions", await request.json())

    async def models(self, request: web.Request) -> web.StreamResponse:
        return await self._job(request, "/v1/models", None)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def __enter__(self) -> OpenAIShim:
        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"
