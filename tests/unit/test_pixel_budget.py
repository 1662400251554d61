"""The budget of decoded pixels in flight: images wait for each other, nothing fails."""

from __future__ import annotations

import asyncio
import base64

import pytest
from PIL import Image

from support.fakes import ScriptedEngine, scripted_info, tok
from support.jobs import data_uri, encode, image_job, screenshot
from vlm_worker.config.settings import load_worker_settings
from vlm_worker.pipeline.pixel_budget import PixelBudget, default_budget, header_pixels
from vlm_worker.pipeline.runner import JobRunner

WORST = 64_000_000


@pytest.mark.parametrize(
    ("source", "pixels"),
    [
        (data_uri(screenshot(1920, 1080)), 1920 * 1080),
        (base64.b64encode(encode(screenshot(300, 200), "JPEG")).decode(), 300 * 200),
        (encode(screenshot(64, 48), "WEBP"), 64 * 48),
        ("data:image/png;base64,!!!not base64!!!", WORST),
        (b"not an image at all", WORST),
    ],
)
def test_the_header_gives_the_size_without_decoding(source, pixels):
    assert header_pixels(source, WORST) == pixels


def test_a_jpeg_with_a_large_exif_segment_still_shows_its_size():
    exif = Image.Exif()
    exif[0x010E] = "x" * 60_000  # ImageDescription: a 60 KB APP1 before the frame header
    data = encode(screenshot(640, 480), "JPEG", exif=exif.tobytes())
    assert header_pixels(data, WORST) == 640 * 480


def test_the_default_is_a_quarter_of_memory_at_ten_bytes_a_pixel():
    assert default_budget(40 * 10**9) == 10**9


async def test_holders_wait_for_room_and_an_oversized_one_runs_alone():
    budget = PixelBudget(10)
    running: list[int] = []
    most = 0

    async def hold(pixels: int) -> None:
        nonlocal most
        async with budget.hold(pixels):
            running.append(pixels)
            most = max(most, sum(running))
            await asyncio.sleep(0.01)
            running.remove(pixels)

    await asyncio.gather(*(hold(4) for _ in range(5)))
    assert most == 8 and budget.in_flight == 0  # two at a time, never three
    most = 0
    await asyncio.gather(hold(15), hold(4), hold(4))
    assert budget.peak <= 10 and budget.in_flight == 0  # the big one alone


async def test_jobs_beyond_the_budget_wait_and_all_finish(processor):
    info = scripted_info(processor)
    engine = ScriptedEngine(info, [tok("ok", True, "stop", prompt=5)])
    settings = load_worker_settings({"MAX_PIXELS_IN_FLIGHT": "3000000"})
    runner = JobRunner(engine, settings)
    jobs = await asyncio.gather(
        *(
            _run(runner, image_job(data_uri(screenshot(1920, 1080, i)), stream=False), f"j{i}")
            for i in range(4)
        )
    )
    assert all("error" not in chunks[-1] for chunks in jobs)
    assert runner.pixel_budget.peak == 1920 * 1080  # one 2-megapixel image at a time
    assert runner.pixel_budget.in_flight == 0 and len(engine.requests) == 4


async def _run(runner: JobRunner, job: dict, job_id: str) -> list[dict]:
    return [c async for c in runner.run({"id": job_id, "input": job})]
