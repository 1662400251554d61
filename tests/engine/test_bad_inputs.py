"""Hostile and broken jobs through the real handler and engine.

Every case must get one error chunk of the right type within a second, and a good job
running alongside must still succeed. Then hypothesis throws generated jobs and image
bytes at the same path: anything may be refused, nothing may crash (no ``internal``).
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
import zlib
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.jobs import data_uri, encode, image_job, screenshot
from vlm_worker.pipeline.runner import JobRunner

pytestmark = pytest.mark.engine

OK_URI = data_uri(screenshot(64, 48))
PNG = encode(screenshot(64, 48))


def b64(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims a size, with no real pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    )


def msg(content, role="user"):
    return {"role": role, "content": content}


def job(*messages, **extra):
    return {"messages": list(messages) or [msg("hi")], **extra}


def img_job(src, key="image_url"):
    part = (
        {"type": "image_url", "image_url": {"url": src}}
        if key == "image_url"
        else {"type": "image", "image": src}
    )
    return job(msg([part, {"type": "text", "text": "what?"}]))


II = "invalid_input"
DEC = "image_decode"
FETCH = "image_fetch"

CASES: list[tuple[str, object, str]] = [
    # --- the job's shape
    ("input-null", None, II),
    ("input-list", [], II),
    ("input-string", "hello", II),
    ("input-number", 42, II),
    ("input-empty", {}, II),
    ("messages-null", {"messages": None}, II),
    ("messages-string", {"messages": "hi"}, II),
    ("messages-object", {"messages": {"role": "user"}}, II),
    ("messages-empty", {"messages": []}, II),
    ("messages-too-many", {"messages": [msg("x")] * 257}, II),
    ("message-string", {"messages": ["hi"]}, II),
    ("message-null", {"messages": [None]}, II),
    ("role-missing", {"messages": [{"content": "x"}]}, II),
    ("role-unknown", job(msg("x", role="robot")), II),
    ("role-tool", job(msg("x", role="tool")), II),
    ("role-number", job(msg("x", role=1)), II),
    ("content-missing", {"messages": [{"role": "user"}]}, II),
    ("content-null", job(msg(None)), II),
    ("content-number", job(msg(5)), II),
    ("content-object", job(msg({"type": "text", "text": "x"})), II),
    ("message-extra-key", {"messages": [{"role": "user", "content": "x", "name": "n"}]}, II),
    ("part-string", job(msg(["hi"])), II),
    ("part-no-type", job(msg([{"text": "x"}])), II),
    ("part-type-unknown", job(msg([{"type": "video", "video": "x"}])), II),
    ("part-type-audio", job(msg([{"type": "input_audio", "input_audio": {}}])), II),
    ("part-type-number", job(msg([{"type": 3}])), II),
    ("text-missing", job(msg([{"type": "text"}])), II),
    ("text-number", job(msg([{"type": "text", "text": 5}])), II),
    ("text-extra-key", job(msg([{"type": "text", "text": "a", "b": 1}])), II),
    ("image_url-missing", job(msg([{"type": "image_url"}])), II),
    ("image_url-null", job(msg([{"type": "image_url", "image_url": None}])), II),
    ("image_url-number", job(msg([{"type": "image_url", "image_url": 7}])), II),
    ("image_url-url-missing", job(msg([{"type": "image_url", "image_url": {}}])), II),
    ("image_url-url-empty", img_job(""), II),
    ("image_url-url-number", job(msg([{"type": "image_url", "image_url": {"url": 1}}])), II),
    (
        "image_url-detail-bad",
        job(msg([{"type": "image_url", "image_url": {"url": OK_URI, "detail": "ultra"}}])),
        II,
    ),
    ("image-empty", img_job("", key="image"), II),
    ("image-number", job(msg([{"type": "image", "image": 3}])), II),
    ("top-level-unknown", job(colour="red"), II),
    ("stream-bad", job(stream="maybe"), II),
    ("stream-list", job(stream=[True]), II),
    # --- sampling
    ("max_tokens-zero", job(max_tokens=0), II),
    ("max_tokens-negative", job(max_tokens=-5), II),
    ("max_tokens-string", job(max_tokens="ten"), II),
    ("max_tokens-float", job(max_tokens=1.5), II),
    ("max_new_tokens-zero", job(max_new_tokens=0), II),
    ("temperature-negative", job(temperature=-0.1), II),
    ("temperature-huge", job(temperature=1000), II),
    ("temperature-string", job(temperature="hot"), II),
    ("top_p-zero", job(top_p=0), II),
    ("top_p-above-one", job(top_p=1.01), II),
    ("top_k-minus-two", job(top_k=-2), II),
    ("min_p-two", job(min_p=2), II),
    ("repetition_penalty-zero", job(repetition_penalty=0), II),
    ("repetition_penalty-huge", job(repetition_penalty=11), II),
    ("presence_penalty-high", job(presence_penalty=2.5), II),
    ("presence_penalty-low", job(presence_penalty=-2.5), II),
    ("frequency_penalty-high", job(frequency_penalty=3), II),
    ("min_tokens-negative", job(min_tokens=-1), II),
    ("min_tokens-above-max", job(min_tokens=20, max_tokens=5), II),
    ("seed-negative", job(seed=-1), II),
    ("seed-huge", job(seed=2**64), II),
    ("stop-empty", job(stop=""), II),
    ("stop-empty-in-list", job(stop=["a", ""]), II),
    ("stop-too-many", job(stop=[str(i) for i in range(17)]), II),
    ("stop-number", job(stop=5), II),
    ("stop-nested", job(stop=[["a"]]), II),
    ("logit_bias-key", job(logit_bias={"abc": 1}), II),
    ("logit_bias-value", job(logit_bias={"1": 500}), II),
    ("logit_bias-list", job(logit_bias=[1, 2]), II),
    ("sampling-both-places", job(max_tokens=5, sampling_params={"max_tokens": 6}), II),
    ("sampling_params-string", job(sampling_params="fast"), II),
    ("sampling_params-unknown", job(sampling_params={"beam_width": 4}), II),
    ("sampling_params-nested-bad", job(sampling_params={"top_p": 7}), II),
    ("ignore_eos-list", job(ignore_eos=[1]), II),
    # --- image sources
    ("base64-garbage", img_job("data:image/png;base64,@@@@"), II),
    ("raw-garbage", img_job("not an image at all!"), II),
    ("data-uri-text", img_job("data:text/plain;base64,aGVsbG8="), II),
    ("data-uri-not-base64", img_job("data:image/png,rawbytes"), II),
    ("data-uri-empty", img_job("data:image/png;base64,"), II),
    ("base64-padding-only", img_job("===="), II),
    ("scheme-file", img_job("file:///etc/passwd"), II),
    ("scheme-ftp", img_job("ftp://example.com/a.png"), II),
    ("scheme-gopher", img_job("gopher://example.com/"), II),
    ("scheme-s3", img_job("s3://bucket/key.png"), II),
    ("image-part-file", img_job("file:///etc/hosts", key="image"), II),
    ("too-large", img_job(b64(b"\x89PNG" + b"\0" * 300_000)), II),
    (
        "five-images",  # MAX_IMAGES_PER_JOB is 4
        job(msg([{"type": "image", "image": OK_URI}] * 5)),
        II,
    ),
    (
        "images-across-messages",
        job(
            msg([{"type": "image", "image": OK_URI}] * 2),
            msg("ok", role="assistant"),
            msg([{"type": "image", "image": OK_URI}] * 3),
        ),
        II,
    ),
    ("random-bytes", img_job(b64(bytes(range(256)) * 4)), DEC),
    ("html-bytes", img_job(b64(b"<html><body>hi</body></html>", "image/png")), DEC),
    ("svg", img_job(b64(b'<svg xmlns="http://www.w3.org/2000/svg"/>', "image/svg+xml")), DEC),
    ("pdf", img_job(b64(b"%PDF-1.4\n1 0 obj\n", "image/png")), DEC),
    ("eps", img_job(b64(b"%!PS-Adobe-3.0 EPSF-3.0\n", "image/png")), DEC),
    ("truncated-png", img_job(b64(PNG[: len(PNG) // 2])), DEC),
    ("png-header-only", img_job(b64(png_header(64, 64))), DEC),
    ("png-bomb-header", img_job(b64(png_header(100_000, 100_000))), DEC),
    ("gif-header-only", img_job(b64(b"GIF89a\x10\x00\x10\x00")), DEC),
    ("jpeg-header-only", img_job(b64(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00")), DEC),
    ("aspect-too-wide", img_job(data_uri(screenshot(4020, 10))), DEC),
    ("aspect-too-tall", img_job(data_uri(screenshot(3, 900))), DEC),
    ("zero-bytes-png-magic", img_job(b64(b"\x89PNG\r\n\x1a\n")), DEC),
    # --- prompt problems
    ("image-token-in-text", job(msg("<|image_pad|> x")), II),  # a special token in text
    (
        "image-token-with-image",
        job(msg([{"type": "image", "image": OK_URI}, {"type": "text", "text": "<|image_pad|>"}])),
        II,
    ),
    ("prompt-too-long", job(msg("word " * 5000)), "prompt_too_long"),
    (
        "prompt-too-long-system",
        job(msg("word " * 5000, role="system"), msg("hi")),
        "prompt_too_long",
    ),
    # --- URLs that cannot be fetched (loopback is refused or unreachable either way)
    ("url-loopback-closed-port", img_job("http://127.0.0.1:9/a.png"), FETCH),
    ("url-localhost", img_job("http://localhost:9/a.png"), FETCH),
    ("url-ipv6-loopback", img_job("http://[::1]:9/a.png"), FETCH),
    ("url-metadata", img_job("http://169.254.169.254/latest/meta-data/"), FETCH),
    ("url-zero-address", img_job("http://0.0.0.0:9/a.png"), FETCH),
    ("url-bad-port", img_job("http://127.0.0.1:99999/a.png"), FETCH),
]


def test_there_are_at_least_100_cases():
    assert len(CASES) >= 100
    assert len({name for name, _, _ in CASES}) == len(CASES)


@pytest.fixture(scope="module")
def strict_runner(worker):
    settings_ = replace(
        worker.settings, max_image_bytes=200_000, image_fetch_timeout=1.0, default_max_tokens=8
    )
    return JobRunner(worker.engine, settings_, executor=worker.runner.executor)


async def _timed(runner, name, job_input):
    start = time.monotonic()
    chunks = [c async for c in runner.run({"id": name, "input": job_input})]
    return chunks, time.monotonic() - start


async def test_every_bad_case_fails_fast_with_the_right_error_beside_a_good_job(strict_runner):
    good = asyncio.create_task(
        _timed(strict_runner, "good", image_job(max_tokens=48, ignore_eos=True, stream=True))
    )
    failures = []
    for i in range(0, len(CASES), 16):  # 16 at a time, like a busy worker
        batch = CASES[i : i + 16]
        results = await asyncio.gather(*(_timed(strict_runner, n, j) for n, j, _ in batch))
        for (name, _, expected), (chunks, seconds) in zip(batch, results, strict=True):
            last = chunks[-1] if chunks else {}
            err = last.get("error") or {}
            if len(chunks) != 1 or err.get("type") != expected or not err.get("message"):
                failures.append(f"{name}: expected {expected}, got {chunks!r:.300}")
            elif seconds >= 1.0:
                failures.append(f"{name}: took {seconds:.2f}s")
    assert not failures, "\n".join(failures)
    chunks, _ = await good
    assert chunks[-1]["usage"]["completion_tokens"] == 48


json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=40)}),
    st.fixed_dictionaries(
        {
            "type": st.just("image_url"),
            "image_url": st.fixed_dictionaries(
                {"url": st.sampled_from([OK_URI, "data:image/png;base64,xx", "ftp://x", ""])}
            ),
        }
    ),
    st.dictionaries(
        st.sampled_from(["type", "text", "image", "image_url"]), json_value, max_size=3
    ),
)
message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "system", "assistant", "bot"]),
        "content": st.one_of(st.text(max_size=40), st.lists(part, max_size=3), json_value),
    }
)
sampling_key = st.sampled_from(
    [
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "min_tokens",
        "stream",
        "logit_bias",
        "junk",
    ]
)
job_strategy = st.one_of(
    json_value,
    st.fixed_dictionaries(
        {"messages": st.lists(message, max_size=3)}, optional={"sampling_params": json_value}
    ).flatmap(
        lambda base: st.dictionaries(sampling_key, json_value, max_size=3).map(
            lambda extra: {**base, **extra}
        )
    ),
)
KNOWN = {"invalid_input", "image_fetch", "image_decode", "prompt", "prompt_too_long"}


def _run_sync(runner, job_input):
    async def go():
        return [c async for c in runner.run({"id": "fuzz", "input": job_input})]

    return asyncio.run(go())


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(job_input=job_strategy)
def test_fuzzed_jobs_never_crash_the_worker(strict_runner, job_input):
    start = time.monotonic()
    chunks = _run_sync(strict_runner, job_input)
    last = chunks[-1]
    if "error" in last:
        assert last["error"]["type"] in KNOWN, last
        assert time.monotonic() - start < 1.0
    else:
        assert last["usage"]["completion_tokens"] >= 0 and "finish_reason" in last


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    data=st.binary(max_size=2048)
    | st.builds(
        lambda cut, junk: PNG[:cut] + junk, st.integers(0, len(PNG)), st.binary(max_size=64)
    )
)
def test_fuzzed_image_bytes_are_decoded_or_refused(strict_runner, data):
    chunks = _run_sync(strict_runner, img_job(b64(data)))
    last = chunks[-1]
    if "error" in last:
        assert last["error"]["type"] in {"invalid_input", "image_decode"}, last
    else:
        assert last["images"][0]["resized_size"][0] % 28 == 0


def test_a_good_job_still_succeeds_after_the_onslaught(worker):
    async def go():
        return [
            c
            async for c in worker.handler(
                {"id": "after", "input": image_job(max_tokens=6, ignore_eos=True, stream=False)}
            )
        ]

    (final,) = asyncio.run(go())
    assert final["usage"]["completion_tokens"] == 6
