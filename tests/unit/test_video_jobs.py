"""Video jobs through the job path (schema, fetch, sampling, template), engine scripted.

The real engine runs video per family in ``tests/engine/test_families_e2e.py``; here the
refusals: each names the field and the limit, comes within a second, and leaves other
jobs alone.
"""

from __future__ import annotations

import asyncio
import base64
import time

import pytest

from support.fakes import ScriptedEngine, scripted_info, tok
from support.jobs import data_uri
from support.video import clip
from vlm_worker.config.settings import load_worker_settings
from vlm_worker.media.video import VideoLimits
from vlm_worker.pipeline.runner import JobRunner

LIMITS = VideoLimits(
    max_bytes=1 << 20,
    max_frames=16,
    fps=2.0,
    max_duration_s=5.0,
    max_pixels=10_000_000,
    loader="qwen2_vl",
)


def video_uri(data: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def video_job(*sources: str, text: str = "What happens?", **extra) -> dict:
    parts = [{"type": "video_url", "video_url": {"url": s}} for s in sources]
    content = [*parts, {"type": "text", "text": text}]
    return {"messages": [{"role": "user", "content": content}], **extra}


def runner_with(processor, limits=LIMITS, **env) -> tuple[JobRunner, ScriptedEngine]:
    info = scripted_info(processor, video=limits)
    engine = ScriptedEngine(info, [tok("ok", True, "stop", prompt=123)])
    settings = load_worker_settings({"MAX_VIDEOS_PER_JOB": "1", **env})
    return JobRunner(engine, settings), engine


async def run(runner, job, job_id="v"):
    return [c async for c in runner.run({"id": job_id, "input": job})]


async def test_a_video_reaches_the_engine_sampled_with_its_metadata(processor):
    runner, engine = runner_with(processor)
    data = clip(n=20, fps=10.0)
    chunks = await run(runner, video_job(video_uri(data)))
    final = chunks[-1]
    assert "error" not in final, final
    (request,) = engine.requests
    ((frames, metadata),) = request.videos
    assert frames.shape == (4, 96, 128, 3)  # 2 s at 2 fps, at least 4 frames (Qwen2-VL)
    assert metadata["total_num_frames"] == 20 and metadata["fps"] == pytest.approx(10.0)
    assert request.video_ids[0].startswith(__import__("hashlib").sha256(data).hexdigest())
    assert request.images == []
    assert request.prompt.count("<|video_pad|>") == 1
    (video,) = final["videos"]
    assert video["frames"] == 4 and video["original_size"] == [128, 96]


async def test_images_and_a_video_in_one_job_keep_their_places(processor):
    runner, engine = runner_with(processor)
    job = video_job(video_uri(clip()), text="Same?")
    job["messages"][0]["content"].insert(0, {"type": "image_url", "image_url": data_uri()})
    chunks = await run(runner, job)
    assert "error" not in chunks[-1], chunks[-1]
    (request,) = engine.requests
    assert len(request.images) == 1 and len(request.videos) == 1
    assert request.prompt.index("<|image_pad|>") < request.prompt.index("<|video_pad|>")


BAD = [
    # (what, source, env, error type, field suffix, words in the message)
    (
        "video is off",
        None,
        {"MAX_VIDEOS_PER_JOB": "0"},
        "invalid_input",
        "",
        "MAX_VIDEOS_PER_JOB is 0",
    ),
    ("over the byte cap", "big", {}, "invalid_input", "", "MAX_VIDEO_BYTES=1048576"),
    ("over the duration cap", "long", {}, "invalid_input", "", "MAX_VIDEO_SECONDS"),
    ("over the decoded pixels", "wide", {}, "invalid_input", "", "MAX_VIDEO_DECODED_PIXELS"),
    ("not a video", "png", {}, "video_decode", "", "video"),
    ("random bytes", "noise", {}, "video_decode", "", "video"),
    ("an image's media type", "mime", {}, "invalid_input", "", "expected video/*"),
]


def bad_source(kind: str | None) -> str:
    if kind in (None, "ok"):
        return video_uri(clip(n=8))
    if kind == "big":
        return video_uri(b"\x00\x00\x00\x18ftypmp42" + bytes(2 << 20))
    if kind == "long":
        return video_uri(clip(n=120, fps=10.0))  # 12 s, above 5 s
    if kind == "wide":
        return video_uri(clip(n=40, fps=10.0, size=(1280, 720)))  # 8 frames x 0.9 MP < cap
    if kind == "png":
        return video_uri(base64.b64decode(data_uri().split(",", 1)[1]))
    if kind == "noise":
        return video_uri(bytes(range(256)) * 64)
    if kind == "mime":
        return video_uri(clip(n=8), mime="image/png")
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("what", "kind", "env", "error", "suffix", "words"), BAD, ids=[b[0] for b in BAD]
)
async def test_bad_videos_are_refused_by_name_within_a_second(
    processor, what, kind, env, error, suffix, words
):
    limits = LIMITS
    if kind == "wide":  # 8 sampled frames of 1280x720 = 7.4 MP: above a 5 MP cap
        limits = VideoLimits(**{**vars(LIMITS), "max_pixels": 5_000_000})
    runner, engine = runner_with(processor, limits, **env)
    started = time.monotonic()
    (chunk,) = await run(runner, video_job(bad_source(kind)))
    assert time.monotonic() - started < 1.0
    err = chunk["error"]
    assert err["type"] == error, err
    assert err["field"] == "messages[0].content[0].video_url.url"
    assert words in err["message"]
    assert engine.requests == []


async def test_a_bad_video_leaves_the_other_jobs_alone(processor):
    runner, engine = runner_with(processor)
    jobs = [
        run(runner, video_job(bad_source("noise")), "bad-1"),
        run(runner, video_job(bad_source("ok")), "good"),
        run(runner, video_job(bad_source("long")), "bad-2"),
        run(runner, {"messages": [{"role": "user", "content": "hi"}]}, "text"),
    ]
    bad1, good, bad2, text = await asyncio.gather(*jobs)
    assert bad1[-1]["error"]["type"] == "video_decode"
    assert bad2[-1]["error"]["type"] == "invalid_input"
    assert "error" not in good[-1] and good[-1]["videos"][0]["frames"] == 4
    assert "error" not in text[-1]
    assert len(engine.requests) == 2


async def test_a_grounding_job_takes_no_video(processor):
    runner, _ = runner_with(processor)
    job = {
        "task": "grounding",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": data_uri()},
                    {"type": "video_url", "video_url": video_uri(clip(n=8))},
                    {"type": "text", "text": "the button"},
                ],
            }
        ],
    }
    (chunk,) = await run(runner, job)
    assert chunk["error"]["field"] == "messages[0].content[1].video_url.url"
    assert "no video" in chunk["error"]["message"]
