"""Fetching image URLs without becoming an SSRF proxy: checked addresses, caps, one deadline.

Why each piece is here:

* **Checked at connect time.** Host names are resolved by ``GuardedResolver``, the
  resolver of the session's own connector, which drops every address the policy refuses
  (``netguard``) and hands the connector only the survivors. The socket therefore goes to
  an address that was checked: a DNS answer that changes between a check and the connect
  (rebinding) has no window to slip through. IP literals never reach a resolver in
  aiohttp, so they are checked when the URL is.
* **Redirects by hand** (``allow_redirects=False``), at most ``max_redirects``, each new
  URL checked like the first (scheme, ALLOWED_IMAGE_DOMAINS, literal address) and each
  connection going through the same resolver.
* **One deadline** (IMAGE_FETCH_TIMEOUT) around DNS, connects, every redirect and the
  body, so a slow server cannot hold a job; the body is streamed and counted against
  MAX_IMAGE_BYTES, so a server that lies about or omits Content-Length cannot make the
  worker buffer more. Compressed bodies are refused rather than inflated.
* **An image, or an error now.** Content-Type must be image/* or octet-stream (or
  absent) and the first bytes an image signature, so an HTML error page or a redirect to
  a login form fails here with a message that says so, not later as a decode error.
* No cookies kept between fetches, no proxy settings taken from the environment.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from vlm_worker.contract.errors import ImageFetchError
from vlm_worker.media.address_policy import (
    AddressClass,
    AddressPolicy,
    DomainAllowList,
    literal_address,
)
from vlm_worker.media.video import container_of

if TYPE_CHECKING:
    from vlm_worker.config.settings import WorkerSettings

USER_AGENT = "vlm-worker/0.1 (+https://github.com/runpod-workers)"
MAX_REDIRECTS = 5
ALLOWED_SCHEMES = ("http", "https")
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
#: Content-Types accepted besides image/*: what object stores send for unknown files.
OCTET_STREAM_TYPES = frozenset({"application/octet-stream", "binary/octet-stream"})
#: Enough bytes to recognise every signature below (WebP needs 12).
SNIFF_BYTES = 12
CHUNK_BYTES = 64 * 1024

#: Looks up a host name: (host, port) -> IP address strings. The seam tests use to map
#: names to addresses without DNS; production uses the system resolver.
Lookup = Callable[[str, int], Awaitable[Sequence[str]]]


@dataclass(frozen=True)
class FetchLimits:
    """What one fetch may do; built from the worker settings by ``from_settings``."""

    max_bytes: int
    timeout: float
    allowed_domains: tuple[str, ...] = ()
    allow_private: bool = False
    max_redirects: int = MAX_REDIRECTS
    #: Connections open at once: every job's share (its images and videos) at full
    #: concurrency, so slow hosts of a few jobs cannot take the others' connections.
    max_connections: int = 64

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> FetchLimits:
        return cls(
            max_bytes=settings.max_image_bytes,
            timeout=settings.image_fetch_timeout,
            allowed_domains=tuple(settings.allowed_image_domains or ()),
            allow_private=settings.allow_private_image_urls,
            max_connections=max(
                64,
                settings.max_concurrency
                * (settings.max_images_per_job + settings.max_videos_per_job),
            ),
        )


@dataclass(frozen=True)
class MediaKind:
    """What a fetch expects: images by default, videos for ``video_url`` parts. The same
    address policy and deadline either way; the byte cap, media type and signature are
    the kind's own."""

    word: str  # "image" or "video", as messages say it
    mime_prefix: str
    sniff: Callable[[bytes], str | None]
    signatures: str  # the formats ``sniff`` knows, for the error message
    max_bytes: int | None = None  # None: FetchLimits.max_bytes (MAX_IMAGE_BYTES)
    limit_name: str = "MAX_IMAGE_BYTES"

    @property
    def article(self) -> str:
        return "an" if self.word[0] in "aeiou" else "a"


def sniff_image(head: bytes) -> str | None:
    """The image format whose signature ``head`` starts with, or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith(b"BM"):
        return "BMP"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    return None


IMAGE = MediaKind("image", "image/", sniff_image, "a PNG, JPEG, GIF, WebP, BMP or TIFF")


def video_kind(max_bytes: int) -> MediaKind:
    return MediaKind(
        "video",
        "video/",
        container_of,
        "an MP4/MOV, WebM/Matroska or AVI",
        max_bytes,
        "MAX_VIDEO_BYTES",
    )


#: Most seconds one host name lookup may take, whatever the fetch's own deadline: a name
#: whose DNS server never answers fails here, not at IMAGE_FETCH_TIMEOUT.
LOOKUP_TIMEOUT_S = 5.0


class AsyncLookup:
    """Host names resolved by c-ares (aiodns) on the event loop, both address families.

    Why not the system resolver: ``getaddrinfo`` blocks a thread of the loop's default
    executor for the whole DNS timeout; a few black-holed names took every thread, and
    unrelated fetches (and everything else using that executor) waited behind them. c-ares
    answers asynchronously (``/etc/hosts`` included), so a name that never resolves costs
    a timer, not a thread; its own timeout is shorter than the fetch's.
    """

    def __init__(self, timeout: float, nameservers: Sequence[str] | None = None) -> None:
        self.timeout = timeout
        self.nameservers = list(nameservers) if nameservers else None
        self._resolvers: dict[int, Any] = {}

    def _resolver(self) -> Any:
        import aiodns

        loop = asyncio.get_running_loop()  # a resolver belongs to the loop it was made on
        resolver = self._resolvers.get(id(loop))
        if resolver is None:
            resolver = aiodns.DNSResolver(
                nameservers=self.nameservers, loop=loop, timeout=self.timeout / 2, tries=2
            )
            self._resolvers[id(loop)] = resolver
        return resolver

    async def __call__(self, host: str, port: int) -> list[str]:
        import aiodns

        lookup = self._resolver().getaddrinfo(host, port=port, type=socket.SOCK_STREAM)
        try:
            result = await asyncio.wait_for(lookup, self.timeout)
        except (aiodns.error.DNSError, asyncio.TimeoutError) as exc:
            raise OSError(f"cannot resolve {host!r}: {exc}") from None
        addresses = []
        for node in result.nodes:
            address = node.addr[0]
            addresses.append(address.decode() if isinstance(address, bytes) else str(address))
        return addresses


class ResolveRefused(OSError):
    """Raised inside the connector; ``message`` is what the client is told."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class GuardedResolver(AbstractResolver):
    """The connector's resolver: looks a name up and returns only addresses the policy allows.

    aiohttp connects to exactly what this returns, so the check and the connection use
    the same addresses. Refused addresses are named by class, never echoed back.
    """

    def __init__(self, policy: AddressPolicy, lookup: Lookup) -> None:
        self.policy = policy
        self.lookup = lookup

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_UNSPEC
    ) -> list[ResolveResult]:
        try:
            found = await self.lookup(host, port)
        except OSError:
            raise ResolveRefused(f"cannot resolve host {host!r}") from None
        allowed: list[ResolveResult] = []
        refused: list[AddressClass] = []
        for raw in found:
            ip = ipaddress.ip_address(raw)
            ip_family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
            if family not in (socket.AF_UNSPEC, ip_family):
                continue
            cls = self.policy.refusal(ip)
            if cls is not None:
                refused.append(cls)
                continue
            allowed.append(
                ResolveResult(
                    hostname=host,
                    host=str(ip),
                    port=port,
                    family=ip_family,
                    proto=0,
                    flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
                )
            )
        if allowed:
            return allowed
        if refused:
            classes = ", ".join(dict.fromkeys(c.value for c in refused))
            raise ResolveRefused(f"host {host!r} resolves to {classes}, which is refused")
        raise ResolveRefused(f"host {host!r} has no address")

    async def close(self) -> None:
        return None


class ImageFetcher:
    """Fetches image URLs under ``FetchLimits``; one aiohttp session per event loop.

    ``lookup`` replaces the system resolver and ``trusted_networks`` exempts networks from
    the address policy: both are seams for tests, which must not depend on DNS.
    """

    def __init__(
        self,
        limits: FetchLimits,
        *,
        lookup: Lookup | None = None,
        trusted_networks: Iterable[str] = (),
    ) -> None:
        self.limits = limits
        self.policy = AddressPolicy(
            allow_private=limits.allow_private,
            trusted=tuple(ipaddress.ip_network(n) for n in trusted_networks),
        )
        self.domains = DomainAllowList.parse(limits.allowed_domains)
        if lookup is None:
            import aiodns  # noqa: F401  (a missing c-ares fails the start, not each fetch)

            lookup = AsyncLookup(min(LOOKUP_TIMEOUT_S, limits.timeout / 2))
        self._lookup = lookup
        self._sessions: dict[int, aiohttp.ClientSession] = {}

    def _session(self) -> aiohttp.ClientSession:
        # Sessions (and their connectors) are bound to the loop that made them.
        loop = asyncio.get_running_loop()
        session = self._sessions.get(id(loop))
        if session is None or session.closed:
            session = aiohttp.ClientSession(
                headers={
                    "User-Agent": USER_AGENT,
                    "Accept": "image/*, video/*",
                    "Accept-Encoding": "identity",
                },
                connector=aiohttp.TCPConnector(
                    limit=self.limits.max_connections,
                    ttl_dns_cache=60,  # caches filtered answers only
                    resolver=GuardedResolver(self.policy, self._lookup),
                ),
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None),  # fetch() holds the deadline
            )
            self._sessions[id(loop)] = session
        return session

    async def fetch(self, url: str, field: str, kind: MediaKind = IMAGE) -> bytes:
        """The body's bytes, or ``ImageFetchError`` naming ``field`` and the reason."""
        try:
            return await asyncio.wait_for(self._fetch(url, field, kind), self.limits.timeout)
        except asyncio.TimeoutError:
            raise ImageFetchError(
                f"fetching the {kind.word} took longer than "
                f"IMAGE_FETCH_TIMEOUT={self.limits.timeout:g}s",
                field=field,
            ) from None

    def check_url(self, raw: str | URL, field: str) -> URL:
        """The URL, if its scheme and host may be fetched; the address check for host
        names happens at connect time, in ``GuardedResolver``."""
        try:
            url = raw if isinstance(raw, URL) else URL(raw)
        except (ValueError, TypeError):
            raise ImageFetchError("the image URL is not a valid URL", field=field) from None
        scheme = url.scheme.lower()
        if scheme not in ALLOWED_SCHEMES:
            raise ImageFetchError(
                f"image URL scheme {scheme!r} is not supported; only http and https are fetched",
                field=field,
            )
        host = url.host
        if not host or url.raw_host is None:
            raise ImageFetchError("the image URL has no host", field=field)
        try:
            literal = literal_address(host)
        except ValueError as exc:
            raise ImageFetchError(str(exc), field=field) from None
        if self.domains.domains and (literal is not None or not self.domains.allows(url.raw_host)):
            raise ImageFetchError(f"host {host!r} is not in ALLOWED_IMAGE_DOMAINS", field=field)
        if literal is not None:
            refused = self.policy.refusal(literal)
            if refused is not None:
                raise ImageFetchError(
                    f"host {host!r} is {refused.value}, which is refused", field=field
                )
        return url

    async def _fetch(self, raw_url: str, field: str, kind: MediaKind) -> bytes:
        url = self.check_url(raw_url, field)
        session = self._session()
        for hop in range(self.limits.max_redirects + 1):
            try:
                async with session.get(url, allow_redirects=False) as resp:
                    if resp.status not in REDIRECT_STATUSES:
                        return await self._read(resp, field, kind)
                    location = resp.headers.get("Location")
            except aiohttp.ClientError as exc:
                raise ImageFetchError(_describe(exc, hop), field=field) from None
            if not location:
                raise ImageFetchError(
                    f"the image URL answered HTTP {resp.status} without a Location", field=field
                )
            try:
                target = url.join(URL(location))
            except (ValueError, TypeError):
                raise ImageFetchError(
                    f"redirect {hop + 1} has an invalid Location", field=field
                ) from None
            try:
                url = self.check_url(target, field)
            except ImageFetchError as exc:
                raise ImageFetchError(f"redirect {hop + 1}: {exc.message}", field=field) from None
        raise ImageFetchError(
            f"the image URL redirected more than {self.limits.max_redirects} times", field=field
        )

    async def _read(self, resp: aiohttp.ClientResponse, field: str, kind: MediaKind) -> bytes:
        """The body of a final answer, checked to be of ``kind``, within its byte cap."""
        cap = kind.max_bytes if kind.max_bytes is not None else self.limits.max_bytes
        word, limit = kind.word, kind.limit_name
        if resp.status != 200:
            reason = f" {resp.reason}" if resp.reason else ""
            raise ImageFetchError(
                f"the {word} URL answered HTTP {resp.status}{reason}", field=field
            )
        encoding = resp.headers.get("Content-Encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            raise ImageFetchError(
                f"the {word} URL answered with Content-Encoding {encoding!r}; only "
                f"uncompressed bodies are accepted",
                field=field,
            )
        mime = resp.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if mime and not (mime.startswith(kind.mime_prefix) or mime in OCTET_STREAM_TYPES):
            raise ImageFetchError(
                f"not {kind.article} {word}: {mime} (expected {kind.mime_prefix}* or application/octet-stream)",
                field=field,
            )
        if resp.content_length is not None and resp.content_length > cap:
            raise ImageFetchError(
                f"the {word} is {resp.content_length} bytes, above {limit}={cap}",
                field=field,
            )
        body = bytearray()
        sniffed = False
        async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
            if len(body) + len(chunk) > cap:
                raise ImageFetchError(f"the {word} is larger than {limit}={cap}", field=field)
            body += chunk
            if not sniffed and len(body) >= SNIFF_BYTES:
                _check_signature(bytes(body[:SNIFF_BYTES]), field, kind)
                sniffed = True
        if not body:
            raise ImageFetchError(f"the {word} URL answered an empty body", field=field)
        if not sniffed:
            _check_signature(bytes(body), field, kind)
        return bytes(body)

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()


def _check_signature(head: bytes, field: str, kind: MediaKind = IMAGE) -> None:
    if kind.sniff(head) is not None:
        return
    looks = " (it looks like HTML or XML)" if head.lstrip()[:1] == b"<" else ""
    raise ImageFetchError(
        f"not {kind.article} {kind.word}: the body does not start with {kind.signatures} signature{looks}",
        field=field,
    )


def _describe(exc: aiohttp.ClientError, hop: int) -> str:
    """A client-facing reason for a connection failure, without internal addresses."""
    where = f"redirect {hop}: " if hop else ""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ResolveRefused):
            return where + cause.message
        cause = cause.__cause__
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = exc.os_error.strerror or type(exc.os_error).__name__
        return f"{where}cannot connect to {exc.host}:{exc.port} ({reason})"
    if isinstance(exc, aiohttp.InvalidURL):
        return f"{where}the image URL is not a valid URL"
    return f"{where}fetching the image failed: {type(exc).__name__}"
