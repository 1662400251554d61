"""Fetching image URLs with a byte cap and a total deadline.

The body is streamed and counted, so a server that lies about (or omits)
Content-Length cannot make the worker buffer more than MAX_IMAGE_BYTES, and a slow
server cannot hold a job past IMAGE_FETCH_TIMEOUT.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp

from .errors import ImageFetchError

USER_AGENT = "vlm-worker/0.1 (+https://github.com/runpod-workers)"
MAX_REDIRECTS = 5


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int
    timeout: float


class ImageFetcher:
    """One aiohttp session per event loop (sessions cannot move between loops)."""

    def __init__(self, limits: FetchLimits) -> None:
        self.limits = limits
        self._sessions: dict[int, aiohttp.ClientSession] = {}

    def _session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        session = self._sessions.get(id(loop))
        if session is None or session.closed:
            session = aiohttp.ClientSession(
                headers={"User-Agent": USER_AGENT, "Accept": "image/*"},
                connector=aiohttp.TCPConnector(limit=64, ttl_dns_cache=60),
            )
            self._sessions[id(loop)] = session
        return session

    async def fetch(self, url: str, field: str) -> bytes:
        try:
            return await asyncio.wait_for(self._fetch(url, field), self.limits.timeout)
        except asyncio.TimeoutError:
            raise ImageFetchError(
                f"fetching the image took longer than IMAGE_FETCH_TIMEOUT={self.limits.timeout:g}s",
                field=field,
            ) from None
        except aiohttp.ClientError as exc:
            raise ImageFetchError(
                f"fetching the image failed: {type(exc).__name__}: {exc}", field=field
            ) from None

    async def _fetch(self, url: str, field: str) -> bytes:
        cap = self.limits.max_bytes
        async with self._session().get(url, max_redirects=MAX_REDIRECTS) as resp:
            if resp.status != 200:
                raise ImageFetchError(f"the image URL answered HTTP {resp.status}", field=field)
            if resp.content_length is not None and resp.content_length > cap:
                raise ImageFetchError(
                    f"the image is {resp.content_length} bytes, above MAX_IMAGE_BYTES={cap}",
                    field=field,
                )
            chunks: list[bytes] = []
            total = 0
            async for chunk in resp.content.iter_chunked(64 * 1024):
                total += len(chunk)
                if total > cap:
                    raise ImageFetchError(
                        f"the image is larger than MAX_IMAGE_BYTES={cap}", field=field
                    )
                chunks.append(chunk)
            return b"".join(chunks)

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()
