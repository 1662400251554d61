"""SSRF-safe image fetching against real HTTP servers on loopback; no engine, no DNS.

Two loopback addresses play two roles: 127.0.0.2 is *trusted* by the fetcher under test
(it stands in for a public server, since a test may only talk to loopback) while
127.0.0.1 stays refused, so a redirect from the "public" server to 127.0.0.1 is refused
just as a redirect from a real public server to an internal one would be. Host names are
mapped by a static lookup, so no test sends a DNS query anywhere.
"""

from __future__ import annotations

import asyncio
import gzip
import ipaddress
import socket
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from hypothesis import assume, given
from hypothesis import strategies as st
from test_job_runner import info, runner_for  # noqa: F401  (info: a fixture)
from yarl import URL

from support.fakes import tok
from support.jobs import encode, image_job, screenshot
from support.video import clip
from vlm_worker.config.settings import load_worker_settings
from vlm_worker.contract.errors import ConfigError, ImageFetchError
from vlm_worker.media.address_policy import (
    METADATA_ADDRESSES,
    AddressClass,
    AddressPolicy,
    DomainAllowList,
    classify,
)
from vlm_worker.media.fetch import FetchLimits, ImageFetcher, sniff_image, video_kind

PNG = encode(screenshot(40, 30))
FIELD = "messages[0].content[0].image_url.url"
CLIP = clip(n=8)
PUBLIC_IP = "127.0.0.2"  # trusted by `make_fetcher(trusted=True)`: the "public" server


# ----------------------------------------------------------------- the servers
@dataclass
class Seen:
    """What the servers received: (local address, path, request headers)."""

    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)

    def at(self, ip: str) -> list[str]:
        return [path for addr, path, _ in self.requests if addr == ip]


async def _stream(request: web.Request) -> web.StreamResponse:
    """PNG signature, then `chunk`-byte chunks every `delay` s, `total` bytes or ~forever."""
    chunk = int(request.query.get("chunk", "1024"))
    delay = float(request.query.get("delay", "0"))
    total = int(request.query.get("total", str(64 * 1024 * 1024)))
    resp = web.StreamResponse(headers={"Content-Type": "image/png"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    sent = 0
    try:
        await resp.write(PNG[:16])
        sent = 16
        while sent < total:
            n = min(chunk, total - sent)
            await resp.write(b"\0" * n)
            sent += n
            await asyncio.sleep(delay)
        await resp.write_eof()
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    return resp


def make_app(seen: Seen) -> web.Application:
    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        addr = request.transport.get_extra_info("sockname")[0] if request.transport else "?"
        seen.requests.append((addr, request.path, dict(request.headers)))
        return await handler(request)

    async def image(request: web.Request) -> web.Response:
        return web.Response(body=PNG, content_type="image/png")

    async def redirect(request: web.Request) -> web.Response:
        status = int(request.query.get("status", "302"))
        return web.Response(status=status, headers={"Location": request.query["url"]})

    async def chain(request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        await asyncio.sleep(float(request.query.get("delay", "0")))
        if n == 0:
            return web.Response(body=PNG, content_type="image/png")
        return web.Response(
            status=302, headers={"Location": f"/chain/{n - 1}?{request.query_string}"}
        )

    async def body(request: web.Request) -> web.Response:
        """`n` bytes starting with the PNG signature, or `text` as `type`."""
        ctype = request.query.get("type", "image/png")
        if "text" in request.query:
            return web.Response(body=request.query["text"].encode(), content_type=ctype)
        n = int(request.query.get("n", str(len(PNG))))
        return web.Response(body=(PNG + b"\0" * n)[:n], content_type=ctype)

    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="<h1>no</h1>")

    async def gzipped(request: web.Request) -> web.Response:
        return web.Response(
            body=gzip.compress(PNG), content_type="image/png", headers={"Content-Encoding": "gzip"}
        )

    async def set_cookie(request: web.Request) -> web.Response:
        return web.Response(
            status=302, headers={"Location": "/img.png", "Set-Cookie": "session=secret; Path=/"}
        )

    async def loop(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "/loop"})

    async def slow_headers(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response(body=PNG, content_type="image/png")

    async def video(request: web.Request) -> web.Response:
        return web.Response(body=CLIP, content_type="video/mp4")

    app = web.Application(middlewares=[record])
    app.router.add_get("/clip.mp4", video)
    app.router.add_get("/img.png", image)
    app.router.add_get("/to", redirect)
    app.router.add_get("/loop", loop)
    app.router.add_get("/chain/{n}", chain)
    app.router.add_get("/body", body)
    app.router.add_get("/stream", _stream)
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/gzip", gzipped)
    app.router.add_get("/setcookie", set_cookie)
    app.router.add_get("/slowheaders", slow_headers)
    return app


@dataclass
class Servers:
    seen: Seen
    port: int  # 127.0.0.1: refused unless private addresses are allowed
    public_port: int  # 127.0.0.2: trusted, the stand-in for a public server

    def local(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def public(self, path: str, host: str = "public.example") -> str:
        return f"http://{host}:{self.public_port}{path}"


@pytest_asyncio.fixture(scope="module")
async def servers_once() -> AsyncIterator[Servers]:
    seen = Seen()
    runner = web.AppRunner(make_app(seen), shutdown_timeout=1)
    await runner.setup()
    ports = []
    for host in ("127.0.0.1", PUBLIC_IP):
        site = web.TCPSite(runner, host, 0)
        await site.start()
        ports.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    yield Servers(seen, ports[0], ports[1])
    await runner.cleanup()


@pytest.fixture
def srv(servers_once: Servers) -> Servers:
    servers_once.seen.requests.clear()
    return servers_once


class StaticLookup:
    """Host name → addresses, without DNS; unknown names fail like NXDOMAIN."""

    def __init__(self, hosts: dict[str, Sequence[str]]) -> None:
        self.hosts = hosts
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host not in self.hosts:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(self.hosts[host])


HOSTS = {
    "public.example": [PUBLIC_IP],
    "cdn.example.com": [PUBLIC_IP],
    "intranet.example": ["10.1.2.3"],
    "loopback.example": ["127.0.0.1"],
    "metadata.example": ["169.254.169.254"],
    "mixed.example": ["10.9.9.9", "169.254.169.254", PUBLIC_IP],
    "localhost": ["127.0.0.1", "::1"],
}


@pytest_asyncio.fixture
async def make_fetcher() -> AsyncIterator[Any]:
    made: list[ImageFetcher] = []

    def make(
        *,
        allow_private: bool = False,
        domains: Sequence[str] = (),
        max_bytes: int = 1 << 20,
        timeout: float = 5.0,
        trusted: bool = True,
        lookup: Any = None,
    ) -> ImageFetcher:
        fetcher = ImageFetcher(
            FetchLimits(max_bytes, timeout, tuple(domains), allow_private),
            lookup=lookup or StaticLookup(HOSTS),
            trusted_networks=[f"{PUBLIC_IP}/32"] if trusted else [],
        )
        made.append(fetcher)
        return fetcher

    yield make
    for fetcher in made:
        await fetcher.close()


async def refused(fetcher: ImageFetcher, url: str) -> str:
    """The message of the ImageFetchError fetching ``url`` must raise."""
    with pytest.raises(ImageFetchError) as caught:
        await fetcher.fetch(url, FIELD)
    err = caught.value
    assert err.type == "image_fetch" and err.field == FIELD
    return err.message


# ------------------------------------------------------------ direct addresses
async def test_loopback_url_is_refused_by_default_without_connecting(srv, make_fetcher):
    msg = await refused(make_fetcher(), srv.local("/img.png"))
    assert msg == "host '127.0.0.1' is a loopback address, which is refused"
    assert srv.seen.requests == []


async def test_private_allowed_fetches_the_png(srv, make_fetcher):
    data = await make_fetcher(allow_private=True, trusted=False).fetch(srv.local("/img.png"), FIELD)
    assert data == PNG
    ((addr, path, headers),) = srv.seen.requests
    assert (addr, path) == ("127.0.0.1", "/img.png")
    assert headers["User-Agent"].startswith("vlm-worker/")
    assert headers["Accept-Encoding"] == "identity"


async def test_trusted_stand_in_server_is_reachable(srv, make_fetcher):
    assert await make_fetcher().fetch(srv.public("/img.png"), FIELD) == PNG
    assert srv.seen.at(PUBLIC_IP) == ["/img.png"]


@pytest.mark.parametrize(
    ("host", "what"),
    [
        ("127.0.0.1", "a loopback address"),
        ("127.255.0.9", "a loopback address"),
        ("[::1]", "a loopback address"),
        ("[::ffff:127.0.0.1]", "a loopback address"),
        ("[::127.0.0.1]", "a loopback address"),
        ("[2002:7f00:1::]", "a loopback address"),  # 6to4 carrying 127.0.0.1
        ("[64:ff9b::7f00:1]", "a loopback address"),  # NAT64 carrying 127.0.0.1
        ("169.254.169.254", "a cloud metadata service address"),
        ("[::ffff:169.254.169.254]", "a cloud metadata service address"),
        ("[fd00:ec2::254]", "a cloud metadata service address"),
        ("100.100.100.200", "a cloud metadata service address"),
        ("0.0.0.0", "the unspecified address"),
        ("[::]", "the unspecified address"),
        ("10.0.0.1", "a private-network address"),
        ("172.16.5.4", "a private-network address"),
        ("192.168.1.1", "a private-network address"),
        ("[fc00::1]", "a private-network address"),
        ("[::ffff:10.0.0.1]", "a private-network address"),
        ("100.64.0.1", "a shared (carrier-grade NAT) address"),
        ("169.254.1.1", "a link-local address"),
        ("[fe80::1]", "a link-local address"),
        ("224.0.0.1", "a multicast address"),
        ("239.255.255.250", "a multicast address"),
        ("[ff02::1]", "a multicast address"),
        ("240.0.0.1", "a reserved or special-purpose address"),
        ("255.255.255.255", "a reserved or special-purpose address"),
        ("192.0.2.1", "a reserved or special-purpose address"),
        ("[2001:db8::1]", "a reserved or special-purpose address"),
        ("[2001::1]", "a reserved or special-purpose address"),  # Teredo
    ],
)
async def test_address_literals_are_refused_by_class(make_fetcher, host, what):
    msg = await refused(make_fetcher(), f"http://{host}/a.png")
    shown = URL(f"http://{host}/").host
    assert msg == f"host {shown!r} is {what}, which is refused"


@pytest.mark.parametrize(
    "host",
    [
        "169.254.169.254",
        "[fd00:ec2::254]",
        "100.100.100.200",
        "169.254.1.1",
        "[fe80::1]",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
    ],
)
async def test_allow_private_still_refuses_metadata_link_local_and_special(make_fetcher, host):
    msg = await refused(make_fetcher(allow_private=True), f"http://{host}/a.png")
    assert msg.endswith("which is refused")


@pytest.mark.parametrize("host", ["2130706433", "0x7f.1", "127.1", "017700000001", "0x7f000001"])
async def test_legacy_numeric_hosts_are_refused_before_any_lookup(make_fetcher, host):
    lookup = StaticLookup(HOSTS)
    msg = await refused(make_fetcher(allow_private=True, lookup=lookup), f"http://{host}/a.png")
    assert msg == f"host {host!r} is neither a canonical IP address nor a host name"
    assert lookup.calls == []


@pytest.mark.parametrize(
    ("url", "scheme"),
    [
        ("file:///etc/passwd", "file"),
        ("ftp://public.example/a.png", "ftp"),
        ("gopher://public.example:70/_GET", "gopher"),
        ("data:image/png;base64,iVBORw0KGgo=", "data"),
        ("dict://127.0.0.1:11211/stat", "dict"),
    ],
)
async def test_other_schemes_are_refused(make_fetcher, url, scheme):
    msg = await refused(make_fetcher(allow_private=True), url)
    assert msg == f"image URL scheme {scheme!r} is not supported; only http and https are fetched"


# ------------------------------------------------------------------ host names
@pytest.mark.parametrize(
    ("host", "what"),
    [
        ("intranet.example", "a private-network address"),
        ("loopback.example", "a loopback address"),
        ("metadata.example", "a cloud metadata service address"),
        ("localhost", "a loopback address"),
    ],
)
async def test_host_names_resolving_to_refused_addresses_are_refused(make_fetcher, host, what):
    msg = await refused(make_fetcher(), f"http://{host}/a.png")
    assert msg == f"host {host!r} resolves to {what}, which is refused"
    assert "10.1.2.3" not in msg and "127.0.0.1" not in msg


async def test_only_allowed_addresses_of_a_name_are_connected_to(srv, make_fetcher):
    """mixed.example has a private, a metadata and a public address: only the last is used."""
    data = await make_fetcher().fetch(srv.public("/img.png", host="mixed.example"), FIELD)
    assert data == PNG and srv.seen.at(PUBLIC_IP) == ["/img.png"]


async def test_the_connection_goes_to_the_address_that_was_checked(srv, make_fetcher):
    """A rebinding DNS answer (public first, loopback after) is looked up once, at connect."""

    class Rebinding(StaticLookup):
        async def __call__(self, host: str, port: int) -> list[str]:
            self.calls.append(host)
            return [PUBLIC_IP] if len(self.calls) == 1 else ["127.0.0.1"]

    lookup = Rebinding({})
    data = await make_fetcher(lookup=lookup).fetch(srv.public("/img.png", "rebind.example"), FIELD)
    assert data == PNG
    assert lookup.calls == ["rebind.example"]
    assert srv.seen.at("127.0.0.1") == [] and srv.seen.at(PUBLIC_IP) == ["/img.png"]


async def test_unknown_host_name(make_fetcher):
    msg = await refused(make_fetcher(), "http://nowhere.example/a.png")
    assert msg == "cannot resolve host 'nowhere.example'"


async def test_connection_refused_is_reported(make_fetcher):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    msg = await refused(make_fetcher(allow_private=True), f"http://127.0.0.1:{port}/a.png")
    assert msg.startswith(f"cannot connect to 127.0.0.1:{port} (")


# ------------------------------------------------------------------- redirects
async def test_redirect_from_a_public_server_to_loopback_is_refused(srv, make_fetcher):
    url = srv.public(f"/to?url={srv.local('/img.png')}")
    msg = await refused(make_fetcher(), url)
    assert msg == "redirect 1: host '127.0.0.1' is a loopback address, which is refused"
    assert srv.seen.at(PUBLIC_IP) == ["/to"] and srv.seen.at("127.0.0.1") == []


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        (
            "http://intranet.example/a.png",
            "redirect 1: host 'intranet.example' resolves to a private-network address, "
            "which is refused",
        ),
        (
            "http://169.254.169.254/latest/meta-data/",
            "redirect 1: host '169.254.169.254' is a cloud metadata service address, "
            "which is refused",
        ),
        (
            "http://[::ffff:127.0.0.1]/a.png",
            f"redirect 1: host {URL('http://[::ffff:127.0.0.1]/').host!r} is a loopback "
            "address, which is refused",
        ),
        (
            "file:///etc/passwd",
            "redirect 1: image URL scheme 'file' is not supported; only http and https are fetched",
        ),
        (
            "gopher://public.example/x",
            "redirect 1: image URL scheme 'gopher' is not supported; only http and https are "
            "fetched",
        ),
    ],
)
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_every_redirect_hop_is_checked(srv, make_fetcher, location, expected, status):
    msg = await refused(make_fetcher(), srv.public(f"/to?status={status}&url={location}"))
    assert msg == expected


async def test_relative_redirects_are_followed(srv, make_fetcher):
    assert await make_fetcher().fetch(srv.public("/to?url=/img.png"), FIELD) == PNG
    assert srv.seen.at(PUBLIC_IP) == ["/to", "/img.png"]


async def test_five_redirects_are_followed_six_are_not(srv, make_fetcher):
    assert await make_fetcher().fetch(srv.public("/chain/5"), FIELD) == PNG
    srv.seen.requests.clear()
    msg = await refused(make_fetcher(), srv.public("/chain/6"))
    assert msg == "the image URL redirected more than 5 times"
    assert len(srv.seen.at(PUBLIC_IP)) == 6  # the first request and 5 redirects, no more


async def test_redirect_loop(srv, make_fetcher):
    msg = await refused(make_fetcher(), srv.public("/loop"))
    assert msg == "the image URL redirected more than 5 times"
    assert srv.seen.at(PUBLIC_IP) == ["/loop"] * 6


async def test_redirect_without_location(srv, make_fetcher):
    msg = await refused(make_fetcher(), srv.public("/status/302"))
    assert msg == "the image URL answered HTTP 302 without a Location"


async def test_cookies_are_not_kept(srv, make_fetcher):
    assert await make_fetcher().fetch(srv.public("/setcookie"), FIELD) == PNG
    assert [h.get("Cookie") for _, _, h in srv.seen.requests] == [None, None]


async def test_proxy_settings_in_the_environment_are_ignored(srv, make_fetcher, monkeypatch):
    for var in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # the discard port: nothing answers
    assert await make_fetcher().fetch(srv.public("/img.png"), FIELD) == PNG


# --------------------------------------------------------------- size and time
async def test_oversized_body_with_content_length_is_refused_before_reading(srv, make_fetcher):
    msg = await refused(make_fetcher(max_bytes=1000), srv.public("/body?n=5000"))
    assert msg == "the image is 5000 bytes, above MAX_IMAGE_BYTES=1000"


async def test_body_of_exactly_the_cap_is_accepted(srv, make_fetcher):
    data = await make_fetcher(max_bytes=1000).fetch(srv.public("/body?n=1000"), FIELD)
    assert len(data) == 1000 and data.startswith(PNG[:8])


async def test_oversized_chunked_body_is_cut_off(srv, make_fetcher):
    msg = await refused(make_fetcher(max_bytes=5000), srv.public("/stream?total=6000"))
    assert msg == "the image is larger than MAX_IMAGE_BYTES=5000"


async def test_endless_chunked_body_stops_at_the_cap(srv, make_fetcher):
    start = time.monotonic()
    msg = await refused(make_fetcher(max_bytes=256 * 1024), srv.public("/stream?chunk=65536"))
    assert msg == "the image is larger than MAX_IMAGE_BYTES=262144"
    assert time.monotonic() - start < 2.0


@pytest.mark.parametrize(
    "path",
    [
        "/stream?chunk=1&delay=0.2",  # a trickling body
        "/slowheaders",  # no answer at all
        "/chain/5?delay=0.3",  # every redirect hop is quick, all of them are not
    ],
)
async def test_total_timeout_covers_body_headers_and_redirects(srv, make_fetcher, path):
    start = time.monotonic()
    msg = await refused(make_fetcher(timeout=1.0), srv.public(path))
    elapsed = time.monotonic() - start
    assert msg == "fetching the image took longer than IMAGE_FETCH_TIMEOUT=1s"
    assert 1.0 <= elapsed < 1.5, elapsed


# ------------------------------------------------------------ is it an image?
@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (
            "type=text/html&text=<html>hi</html>",
            "not an image: text/html (expected image/* or application/octet-stream)",
        ),
        (
            "type=application/json&text={}",
            "not an image: application/json (expected image/* or application/octet-stream)",
        ),
        (
            "type=image/png&text=<!doctype html><html><body>login</body></html>",
            "not an image: the body does not start with a PNG, JPEG, GIF, WebP, BMP or TIFF "
            "signature (it looks like HTML or XML)",
        ),
        (
            "type=image/svg%2Bxml&text=<svg xmlns='http://www.w3.org/2000/svg'/>",
            "not an image: the body does not start with a PNG, JPEG, GIF, WebP, BMP or TIFF "
            "signature (it looks like HTML or XML)",
        ),
        (
            "type=application/octet-stream&text=MZ%90%00%03",
            "not an image: the body does not start with a PNG, JPEG, GIF, WebP, BMP or TIFF "
            "signature",
        ),
    ],
)
async def test_content_that_is_not_an_image_is_refused(srv, make_fetcher, query, expected):
    assert await refused(make_fetcher(), srv.public(f"/body?{query}")) == expected


async def test_octet_stream_image_is_accepted(srv, make_fetcher):
    url = srv.public(f"/body?type=application/octet-stream&n={len(PNG)}")
    assert await make_fetcher().fetch(url, FIELD) == PNG


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"])
def test_every_decodable_format_has_a_signature(fmt):
    assert sniff_image(encode(screenshot(16, 16), fmt)[:12]) == fmt


async def test_compressed_body_is_refused(srv, make_fetcher):
    msg = await refused(make_fetcher(), srv.public("/gzip"))
    assert msg == (
        "the image URL answered with Content-Encoding 'gzip'; only uncompressed bodies are accepted"
    )


async def test_empty_body(srv, make_fetcher):
    assert await refused(make_fetcher(), srv.public("/body?n=0")) == (
        "the image URL answered an empty body"
    )


@pytest.mark.parametrize(("code", "reason"), [(404, "Not Found"), (500, "Internal Server Error")])
async def test_http_errors(srv, make_fetcher, code, reason):
    msg = await refused(make_fetcher(), srv.public(f"/status/{code}"))
    assert msg == f"the image URL answered HTTP {code} {reason}"


# ----------------------------------------------------- ALLOWED_IMAGE_DOMAINS
@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("example.com", True),
        ("cdn.example.com", True),
        ("a.b.example.com", True),
        ("EXAMPLE.COM.", True),
        ("evil-example.com", False),
        ("notexample.com", False),
        ("example.com.evil.net", False),
        ("example.org", False),
        ("com", False),
    ],
)
def test_domain_suffix_matching_is_on_label_boundaries(host, allowed):
    assert DomainAllowList.parse(["example.com"]).allows(host) is allowed


def test_domain_entries_are_normalised_and_checked():
    assert DomainAllowList.parse([" *.Example.COM. ", "", "bücher.de"]).domains == (
        "example.com",
        "xn--bcher-kva.de",
    )
    for bad in ("https://example.com", "example.com/images", "example.com:443", "10.0.0.1"):
        with pytest.raises(ConfigError, match="ALLOWED_IMAGE_DOMAINS entry"):
            DomainAllowList.parse([bad])


@given(
    st.lists(st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True), min_size=1, max_size=3),
    st.from_regex(r"[a-z0-9-]{1,8}", fullmatch=True),
)
def test_domain_matching_property(labels, glued):
    domain = ".".join(labels) + ".com"
    allow = DomainAllowList.parse([domain])
    assert allow.allows(domain) and allow.allows(f"{glued.strip('-') or 'x'}.{domain}")
    assert not allow.allows(glued + domain)  # no dot: a different registrable name


async def test_domain_allow_list_is_enforced(srv, make_fetcher):
    fetcher = make_fetcher(domains=["example.com"])
    assert await fetcher.fetch(srv.public("/img.png", "cdn.example.com"), FIELD) == PNG
    for url, host in [
        ("http://evil-example.com/a.png", "evil-example.com"),
        (f"http://{PUBLIC_IP}:{srv.public_port}/img.png", PUBLIC_IP),  # literal: no name
    ]:
        assert await refused(fetcher, url) == f"host {host!r} is not in ALLOWED_IMAGE_DOMAINS"
    redirect = srv.public("/to?url=http://public.example/a.png", "cdn.example.com")
    msg = await refused(fetcher, redirect)
    assert msg == "redirect 1: host 'public.example' is not in ALLOWED_IMAGE_DOMAINS"


async def test_allowed_domain_resolving_to_a_private_address_is_still_refused(make_fetcher):
    lookup = StaticLookup({"img.example.com": ["192.168.0.10"]})
    fetcher = make_fetcher(domains=["example.com"], lookup=lookup)
    msg = await refused(fetcher, "http://img.example.com/a.png")
    assert msg == "host 'img.example.com' resolves to a private-network address, which is refused"


# ----------------------------------------------------------------- settings
def test_settings_build_the_fetch_limits():
    env = {
        "ALLOWED_IMAGE_DOMAINS": "example.com, cdn.example.org",
        "ALLOW_PRIVATE_IMAGE_URLS": "true",
        "MAX_IMAGE_BYTES": "1234",
        "IMAGE_FETCH_TIMEOUT": "2.5",
        "MAX_CONCURRENCY": "16",
    }
    limits = FetchLimits.from_settings(load_worker_settings(env))
    assert limits == FetchLimits(1234, 2.5, ("example.com", "cdn.example.org"), True, 5)
    # defaults: 32 jobs x 4 images
    assert FetchLimits.from_settings(load_worker_settings({})) == FetchLimits(
        20 * 1024 * 1024, 15.0, (), False, 5, 128
    )


@pytest.mark.parametrize(
    ("env", "error"),
    [
        ({}, "host '127.0.0.1' is a loopback address, which is refused"),
        (
            {"ALLOW_PRIVATE_IMAGE_URLS": "true", "ALLOWED_IMAGE_DOMAINS": "example.com"},
            "host '127.0.0.1' is not in ALLOWED_IMAGE_DOMAINS",
        ),
        ({"ALLOW_PRIVATE_IMAGE_URLS": "true"}, None),
    ],
)
async def test_job_runner_fetches_under_the_settings(srv, info, env, error):  # noqa: F811
    """The real job path (scripted engine): the settings decide what a job's URL reaches."""
    runner = runner_for(info, [tok("ok", True, "stop", prompt=9)], **env)
    job = image_job(srv.local("/img.png"), stream=False)
    try:
        (chunk,) = [c async for c in runner.run({"id": "f1", "input": job})]
    finally:
        await runner.fetcher.close()
    if error is None:
        assert chunk["text"] == "ok"
        (image,) = chunk["images"]
        assert (image["original_size"], image["format"], image["bytes"]) == (
            [40, 30],
            "PNG",
            len(PNG),
        )
        assert srv.seen.at("127.0.0.1") == ["/img.png"]
    else:
        assert chunk["error"] == {
            "type": "image_fetch",
            "message": error,
            "field": "messages[0].content[0].image_url.url",
        }
        assert runner.engine.requests == [] and srv.seen.requests == []


def test_bad_allowed_domains_stop_the_worker_at_start():
    with pytest.raises(ConfigError, match=r"ALLOWED_IMAGE_DOMAINS entry 'http://x\.com'"):
        load_worker_settings({"ALLOWED_IMAGE_DOMAINS": "ok.com,http://x.com"})


# ------------------------------------------------- the classifier, as properties
_CLASS_NETS = [
    ("127.0.0.0/8", AddressClass.LOOPBACK),
    ("::1/128", AddressClass.LOOPBACK),
    ("10.0.0.0/8", AddressClass.PRIVATE),
    ("172.16.0.0/12", AddressClass.PRIVATE),
    ("192.168.0.0/16", AddressClass.PRIVATE),
    ("fc00::/7", AddressClass.PRIVATE),
    ("100.64.0.0/10", AddressClass.SHARED),
    ("169.254.0.0/16", AddressClass.LINK_LOCAL),
    ("fe80::/10", AddressClass.LINK_LOCAL),
    ("224.0.0.0/4", AddressClass.MULTICAST),
    ("ff00::/8", AddressClass.MULTICAST),
    ("240.0.0.0/4", AddressClass.RESERVED),
    ("0.0.0.0/8", AddressClass.RESERVED),
    ("192.0.2.0/24", AddressClass.RESERVED),
    ("198.18.0.0/15", AddressClass.RESERVED),
    ("2001:db8::/32", AddressClass.RESERVED),
    ("4000::/3", AddressClass.RESERVED),  # unallocated
]
_IN_CLASS_NET = st.sampled_from(_CLASS_NETS).flatmap(
    lambda nc: st.tuples(st.ip_addresses(network=nc[0]), st.just(nc[1]))
)
_SPECIAL = {ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::")} | METADATA_ADDRESSES
_PRIVATE_OK = {AddressClass.LOOPBACK, AddressClass.PRIVATE, AddressClass.SHARED}


@given(_IN_CLASS_NET)
def test_special_purpose_addresses_are_always_refused(pair):
    ip, expected = pair
    assume(ip not in _SPECIAL)
    assert classify(ip) is expected
    assert AddressPolicy().refusal(ip) is expected
    opened = AddressPolicy(allow_private=True).refusal(ip)
    assert opened is (None if expected in _PRIVATE_OK else expected)


@given(st.ip_addresses(v=4))
def test_ipv6_forms_carrying_ipv4_are_judged_by_the_ipv4_address(ip4):
    mapped = ipaddress.IPv6Address(f"::ffff:{ip4}")
    sixtofour = ipaddress.IPv6Address((0x2002 << 112) | (int(ip4) << 80))
    nat64 = ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | int(ip4))
    expected = classify(ip4)
    assert classify(mapped) is classify(sixtofour) is classify(nat64) is expected
    if int(ip4) > 1:  # ::0.0.0.0 and ::0.0.0.1 are :: and ::1
        assert classify(ipaddress.IPv6Address(int(ip4))) is expected


_EMBEDDING = [
    ipaddress.ip_network(n) for n in ("::/96", "::ffff:0:0/96", "2002::/16", "64:ff9b::/96")
]


@given(st.ip_addresses())
def test_public_unicast_addresses_are_allowed_and_nothing_else(ip):
    assume(not any(ip.version == n.version and ip in n for n in _EMBEDDING))
    # The stdlib's is_global misses deprecated IPv6 site-local (fec0::/10); refused here.
    site_local = ip.version == 6 and ip.is_site_local
    # IANA's 192.0.0.0/24 is refused whole, and metadata endpoints are public addresses
    protocol = ip.version == 4 and ip in ipaddress.ip_network("192.0.0.0/24")
    special = site_local or protocol or ip in METADATA_ADDRESSES
    public = ip.is_global and not ip.is_multicast and not ip.is_reserved and not special
    assert (classify(ip) is AddressClass.GLOBAL) is public
    assert (AddressPolicy().refusal(ip) is None) is public


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("168.63.129.16", AddressClass.METADATA),  # Azure's host endpoint
        ("192.0.0.9", AddressClass.RESERVED),  # IETF protocol assignments, anycast included
        ("192.0.0.100", AddressClass.RESERVED),
        ("192.0.1.1", AddressClass.GLOBAL),
    ],
)
def test_special_purpose_addresses_are_refused(address, expected):
    assert classify(ipaddress.ip_address(address)) is expected


def test_allowed_domains_use_idna_2008_as_urls_do():
    allow = DomainAllowList.parse(["faß.de"])
    assert allow.domains == ("xn--fa-hia.de",)
    assert allow.allows("xn--fa-hia.de") and not allow.allows("fass.de")


# ------------------------------------------------------------------- videos
async def test_a_video_is_fetched_under_the_same_policy_with_its_own_cap(srv, make_fetcher):
    fetcher = make_fetcher()
    kind = video_kind(1 << 20)
    assert await fetcher.fetch(srv.public("/clip.mp4"), FIELD, kind) == CLIP
    with pytest.raises(ImageFetchError, match="loopback"):  # the same address policy
        await fetcher.fetch(srv.local("/clip.mp4"), FIELD, kind)
    with pytest.raises(ImageFetchError, match="MAX_VIDEO_BYTES=100"):
        await fetcher.fetch(srv.public("/clip.mp4"), FIELD, video_kind(100))
    with pytest.raises(ImageFetchError, match="not a video: image/png"):
        await fetcher.fetch(srv.public("/img.png"), FIELD, kind)
    with pytest.raises(ImageFetchError, match="looks like HTML"):
        await fetcher.fetch(srv.public("/body?text=<html>x</html>&type=video/mp4"), FIELD, kind)


# ------------------------------------------------------------------------- lookups
async def test_the_default_lookup_reads_the_hosts_file_without_a_thread():
    from vlm_worker.media.fetch import AsyncLookup

    found = await AsyncLookup(2.0)("localhost", 80)
    assert set(found) <= {"127.0.0.1", "::1"} and found


async def test_black_holed_names_fail_on_their_own_deadline_and_starve_nothing():
    """A DNS server that never answers: twelve lookups at once used to hold twelve threads
    of the loop's default executor for the whole DNS timeout, and every other fetch (and
    anything else on that executor) waited behind them."""
    from vlm_worker.media.fetch import AsyncLookup

    hole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # swallows every query
    hole.bind(("127.0.0.1", 0))
    try:
        lookup = AsyncLookup(1.0, nameservers=[f"127.0.0.1:{hole.getsockname()[1]}"])
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        pending = [asyncio.ensure_future(lookup(f"h{i}.blackhole.invalid", 443)) for i in range(12)]
        await asyncio.sleep(0.1)
        probe = time.perf_counter()
        await loop.run_in_executor(None, lambda: None)  # the default executor is free
        assert time.perf_counter() - probe < 0.05
        results = await asyncio.gather(*pending, return_exceptions=True)
        assert all(isinstance(r, OSError) and "cannot resolve" in str(r) for r in results)
        assert time.perf_counter() - started < 1.5  # the lookup's deadline, not the fetch's
    finally:
        hole.close()


def test_every_job_has_its_share_of_connections():
    limits = FetchLimits.from_settings(
        load_worker_settings({"MAX_CONCURRENCY": "32", "MAX_IMAGES_PER_JOB": "4"})
    )
    assert limits.max_connections == 128
    few = load_worker_settings({"MAX_CONCURRENCY": "4"})
    assert FetchLimits.from_settings(few).max_connections == 64  # the floor
