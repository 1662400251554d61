"""How late a stream's next chunk gets while 8 jobs with 4K PNGs are prepared, without an engine.

The benchmark's stream-gap section needs the engine (and a GPU to mean much); this
reproduces its load on any machine in seconds. A thread stands in for vLLM's engine loop:
every 4.8 ms (a 7B model's decode step on an H200) it does a token's worth of Python and
posts to the handler's event loop with ``call_soon_threadsafe``, as the engine's pump
does for each chunk. Meanwhile ``JobRunner.prepare`` runs for 8 jobs at once (validation,
base64, decode, resize, template; in image processes or threads). Reported per run: the
largest gap between the posts' arrivals on the loop (4.8 ms when nothing is in the way)
and the loop's own largest lag. Anything in the worker process that holds the GIL for
long shows up in both.

    .venv/bin/python benchmarks/burst_gap.py [--processes 2] [--runs 10]
    .venv/bin/python benchmarks/burst_gap.py --src /tmp/old/src   # another checkout's code

``--src`` takes a checkout with this package layout (2026-11-30 on); for an older one run
its own ``benchmarks/burst_gap.py``.

Uses the tiny model's processor (``make model``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TICK_S = 0.0048


async def one_burst(runner: Any, uris: list[str], job_input: Any) -> tuple[float, float, float]:
    """(largest gap between arrivals ms, largest loop lag ms, burst ms)."""
    loop = asyncio.get_running_loop()
    arrivals: list[float] = []
    stop = threading.Event()
    lag = [0.0]

    def engine_loop() -> None:
        while not stop.is_set():
            time.sleep(TICK_S)
            _ = [i * 2 for i in range(50)]  # a token's worth of Python
            loop.call_soon_threadsafe(arrivals.append, time.perf_counter())

    async def ticker() -> None:
        last = loop.time()
        while not stop.is_set():
            await asyncio.sleep(0.002)
            now = loop.time()
            lag[0] = max(lag[0], now - last - 0.002)
            last = now

    thread = threading.Thread(target=engine_loop)
    thread.start()
    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.1)
    start = time.perf_counter()
    await asyncio.gather(
        *(runner.prepare(job_input(uri, 1), f"job-{i}") for i, uri in enumerate(uris))
    )
    took = time.perf_counter() - start
    await asyncio.sleep(0.05)
    stop.set()
    thread.join()
    await tick
    seen = [a for a in arrivals if a >= start - 0.02]
    gap = max(b - a for a, b in itertools.pairwise(seen))
    return gap * 1000, lag[0] * 1000, took * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=0, help="image processes (0: threads)")
    parser.add_argument("--threads", type=int, default=2, help="prompt and image threads each")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="whose vlm_worker to run")
    args = parser.parse_args()
    sys.path[:0] = [str(args.src), str(ROOT)]  # whose package; this repo for benchmarks
    os.environ.setdefault("LOG_LEVEL", "WARNING")

    from benchmarks.bench import data_uri, job_input, screenshot_png
    from transformers import AutoProcessor

    from vlm_worker.config.settings import load_worker_settings
    from vlm_worker.engine.protocol import ModelInfo
    from vlm_worker.media.geometry import ImageGeometry
    from vlm_worker.pipeline.image_pool import ImagePool, image_threads
    from vlm_worker.pipeline.runner import JobRunner

    processor = AutoProcessor.from_pretrained(ROOT / ".models" / "tiny-qwen2.5-vl")
    info = ModelInfo(
        name="tiny",
        max_model_len=4096,
        geometry=ImageGeometry(),
        image_processor=processor.image_processor,
        templater=processor,
        tokenizer=processor.tokenizer,
        placeholder="<|vision_start|><|image_pad|><|vision_end|>",
        image_token="<|image_pad|>",
    )

    class InfoOnly:  # ``prepare`` reads only the engine's ``info``
        def __init__(self) -> None:
            self.info = info

    images = ImagePool(
        processes=args.processes, threads=image_threads(args.threads), owns_threads=True
    )
    if args.processes:
        images.start(info.geometry, info.image_processor)
    runner = JobRunner(
        InfoOnly(),  # type: ignore[arg-type]
        load_worker_settings({}),
        executor=ThreadPoolExecutor(args.threads),
        images=images,
    )
    runner.in_flight = args.jobs  # not alone: image processes, when there are any
    uris = [data_uri(screenshot_png(3840, 2160, 200 + i)) for i in range(args.jobs)]
    try:
        asyncio.run(one_burst(runner, uris[:1], job_input))  # first-use costs
        gc.collect()
        gc.freeze()  # as the worker does after start-up
        results = [asyncio.run(one_burst(runner, uris, job_input)) for _ in range(args.runs)]
    finally:
        images.shutdown()
    gaps, lags, bursts = zip(*results, strict=True)
    mode = f"{args.processes} processes" if args.processes else "threads"
    print(
        f"{args.src}: {args.jobs} x 4K PNG prepared ({mode}), {args.runs} runs: largest gap "
        f"median {statistics.median(gaps):.1f} ms (unloaded: {TICK_S * 1000:g}; runs: "
        f"{' '.join(f'{g:.0f}' for g in gaps)}), loop lag median {statistics.median(lags):.1f} "
        f"ms, burst median {statistics.median(bursts):.0f} ms"
    )


if __name__ == "__main__":
    main()
