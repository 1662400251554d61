"""Where an image process's pixels spend their way back to the job, split by stage.

The GPU benchmark's trace puts 7.5-9 ms (p50, 8 jobs at once) between an image process
finishing its work and the job resuming with the pixels, against 0.6-0.8 ms in threads.
This splits that time on any machine, without an engine: 8 jobs with 4K PNGs are
prepared at once through real image processes, and for each image it records

* **ship**: in the image process, writing the resized pixels to ``/dev/shm``;
* **pipe**: from there until the worker's result thread starts reading them (the
  result pickle through the pool's pipe, and that thread waking for it);
* **receive**: that thread reading the file and building the image;
* **to job**: from there until the job's ``await`` returns on the event loop.

``--busy`` adds a thread that does 2 ms of Python every 4.8 ms, as vLLM's output
processing does while it streams, so the worker's threads wait for the GIL as they
would in a serving worker. ``--receive mmap`` reads the pixels through a populated
``mmap`` instead of ``read`` (an alternative measured, not the worker's path).

    .venv/bin/python benchmarks/return_path.py [--processes 2] [--busy] [--receive mmap]

Uses the tiny model's processor (``make model``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import mmap
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "src")]  # the repo (benchmarks, tools) and the package

from PIL import Image  # noqa: E402

from vlm_worker.media.geometry import ImageGeometry  # noqa: E402
from vlm_worker.media.images import ImageLimits, prepare_source  # noqa: E402
from vlm_worker.pipeline import pixel_files  # noqa: E402

STAGES = ("ship", "pipe", "receive", "to job", "all")


def traced_prepare(log: str, source: Any, **kwargs: Any) -> Any:
    """In an image process: the worker's own work, then the pixels shipped, both timed
    (``perf_counter`` is the system's monotonic clock, shared by the processes)."""
    prepared = prepare_source(source, **kwargs)
    done = time.perf_counter()
    shipped = pixel_files.ship(prepared.image)
    shipped_at = time.perf_counter()
    with open(log, "a") as f:
        f.write(json.dumps([getattr(shipped, "path", None), done, shipped_at]) + "\n")
    return dataclasses.replace(prepared, image=shipped)


def mmap_receive(path: str, mode: str, size: tuple[int, int]) -> Image.Image:
    fd = os.open(path, os.O_RDONLY)
    try:
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        with mmap.mmap(fd, os.fstat(fd).st_size, flags=flags, prot=mmap.PROT_READ) as m:
            return Image.frombytes(mode, size, m)
    finally:
        os.close(fd)
        os.unlink(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--busy", action="store_true", help="a thread busy as vLLM's output")
    parser.add_argument("--receive", choices=("read", "mmap"), default="read")
    args = parser.parse_args()

    from benchmarks.bench import data_uri, screenshot_png
    from transformers import AutoProcessor

    from vlm_worker.pipeline.image_pool import ImagePool

    received: dict[str, tuple[float, float]] = {}
    read = pixel_files.receive if args.receive == "read" else mmap_receive

    def timed_receive(path: str, mode: str, size: tuple[int, int]) -> Image.Image:
        start = time.perf_counter()
        image = read(path, mode, size)
        received[path] = (start, time.perf_counter())
        return image

    pixel_files.receive = timed_receive  # unpickling looks it up by name, in this process

    processor = AutoProcessor.from_pretrained(ROOT / ".models" / "tiny-qwen2.5-vl")
    geometry = ImageGeometry(max_pixels=1003520)
    limits = ImageLimits(max_bytes=64 << 20, max_source_pixels=50_000_000)
    log = Path(tempfile.mkdtemp(prefix="vlm-return-path-")) / "shipped.jsonl"
    workers = ImagePool(
        processes=args.processes, threads=None, fn=functools.partial(traced_prepare, str(log))
    )
    workers.ship_pixels = False  # traced_prepare ships them itself
    workers.start(geometry, processor.image_processor)
    uris = [data_uri(screenshot_png(3840, 2160, 300 + i)) for i in range(args.jobs)]

    stop = threading.Event()

    def output_processing() -> None:
        while not stop.is_set():
            time.sleep(0.0048)
            start = time.perf_counter()
            while time.perf_counter() - start < 0.002:
                _ = [i * 2 for i in range(50)]

    if args.busy:
        threading.Thread(target=output_processing, daemon=True).start()

    async def burst() -> dict[str, float]:
        resumed: dict[str, float] = {}

        async def one(uri: str) -> None:
            prepared = await workers.prepare(
                uri,
                field="image",
                geometry=geometry,
                processor=processor.image_processor,
                limits=limits,
            )
            resumed[prepared.sha256] = time.perf_counter()

        await asyncio.gather(*(one(uri) for uri in uris))
        return resumed

    rows: list[tuple[float, ...]] = []
    try:
        asyncio.run(burst())  # first-use costs
        for _ in range(args.rounds):
            log.unlink(missing_ok=True)
            received.clear()
            resumed = sorted(asyncio.run(burst()).values())
            shipped = [json.loads(line) for line in log.read_text().splitlines()]
            if any(path is None for path, _, _ in shipped):
                sys.exit("pixels went through the pipe: /dev/shm is missing or full")
            # the sha256 is not in the log (it would cost a hash); the job that resumed
            # k-th is the one whose pixels were received k-th
            order = sorted((received[path], done, at) for path, done, at in shipped)
            for ((r_start, r_end), done, at), back in zip(order, resumed, strict=True):
                rows.append((at - done, r_start - at, r_end - r_start, back - r_end, back - done))
    finally:
        stop.set()
        workers.shutdown()
        log.unlink(missing_ok=True)
        log.parent.rmdir()

    print(
        f"{args.jobs} x 4K PNG at once, {args.processes} image processes, "
        f"busy={args.busy}, receive={args.receive}: {len(rows)} images"
    )
    for i, stage in enumerate(STAGES):
        values = [row[i] * 1000 for row in rows]
        print(f"  {stage:8s} p50 {statistics.median(values):6.2f} ms   max {max(values):6.2f} ms")


if __name__ == "__main__":
    main()
