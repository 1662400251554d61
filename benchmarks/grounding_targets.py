"""Several grounding targets in one job against one job per target, and constrained answers.

Through the worker's real job path (``start_worker``, the handler, the engine in this
process), on one screenshot per round (a new one each round, so no round is served from
the previous round's caches):

* ``one job``: ``{"instructions": [t1 … tN]}`` (the image decoded and resized once, one
  content id for all N requests);
* ``N jobs``: N concurrent single-target jobs on the same screenshot.

Rounds alternate which goes first; each prints its time to all answers, and the end prints
the medians and their ratio. Then ``--parse-jobs`` jobs unconstrained and as many
constrained, counting answers that hold a point (random weights: what they give).

    python -m benchmarks.grounding_targets [--targets 8] [--rounds 6] [--size 1920x1080]

MODEL_NAME unset: the tiny model (``make model``); on a GPU, the 7B shape as
``gpu_bench.sh`` sets it. Writes ``--out`` JSON if given.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

INSTRUCTIONS = [
    "the Save button",
    "the search box",
    "the close icon in the top right corner",
    "the File menu",
    "the second tab",
    "the blue link at the bottom",
    "the checkbox next to Remember me",
    "the scroll bar",
    "the user avatar",
    "the Settings gear",
    "the red warning banner",
    "the OK button of the dialog",
]


def screenshot_uri(width: int, height: int, seed: int) -> str:
    """A distinct synthetic UI per seed: bars, boxes and text-like stripes."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (236 - seed % 20, 238, 242))
    draw = ImageDraw.Draw(img)
    for i in range(24):
        x = (97 * i + 31 * seed) % max(1, width - 200)
        y = (61 * i + 17 * seed) % max(1, height - 60)
        draw.rectangle([x, y, x + 180, y + 40], fill=((40 * i + seed) % 255, 120, 200))
        draw.line([x + 10, y + 20, x + 160, y + 20], fill=(20, 20, 20), width=3)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def collect(worker: Any, job: dict[str, Any], job_id: str) -> dict[str, Any]:
    chunks = [c async for c in worker.handler({"id": job_id, "input": job})]
    final = chunks[-1]
    if "error" in final:
        raise RuntimeError(f"{job_id}: {final['error']}")
    return final


async def one_job(worker: Any, uri: str, targets: list[str], tag: str) -> float:
    started = time.perf_counter()
    job = {
        "task": "grounding",
        "instructions": targets,
        "image": uri,
        "max_tokens": 32,
        "temperature": 0,
        "constrain": True,
    }
    final = await collect(worker, job, f"{tag}-one")
    assert len(final["groundings"]) == len(targets)
    return time.perf_counter() - started


async def n_jobs(worker: Any, uri: str, targets: list[str], tag: str) -> float:
    started = time.perf_counter()
    jobs = [
        collect(
            worker,
            {
                "task": "grounding",
                "instruction": t,
                "image": uri,
                "max_tokens": 32,
                "temperature": 0,
                "constrain": True,
                "stream": False,
            },
            f"{tag}-{i}",
        )
        for i, t in enumerate(targets)
    ]
    await asyncio.gather(*jobs)
    return time.perf_counter() - started


async def parse_rate(worker: Any, uri: str, jobs: int, constrain: bool) -> int:
    finals = await asyncio.gather(
        *(
            collect(
                worker,
                {
                    "task": "grounding",
                    "instruction": INSTRUCTIONS[i % len(INSTRUCTIONS)],
                    "image": uri,
                    "max_tokens": 32,
                    "temperature": 1.0,
                    "constrain": constrain,
                    "stream": False,
                },
                f"parse-{constrain}-{i}",
            )
            for i in range(jobs)
        )
    )
    return sum(f["grounding"]["point"] is not None for f in finals)


async def measure(worker: Any, args: argparse.Namespace) -> dict[str, Any]:
    width, height = (int(v) for v in args.size.lower().split("x"))
    targets = (INSTRUCTIONS * 4)[: args.targets]
    await one_job(worker, screenshot_uri(width, height, 999), targets, "warm")  # warm-up
    await n_jobs(worker, screenshot_uri(width, height, 998), targets, "warm")
    rounds = []
    for r in range(args.rounds):
        uri = screenshot_uri(width, height, r)
        uri_b = screenshot_uri(width, height, 100 + r)
        first, second = (one_job, n_jobs) if r % 2 == 0 else (n_jobs, one_job)
        a = await first(worker, uri, targets, f"r{r}a")
        b = await second(worker, uri_b, targets, f"r{r}b")
        one, many = (a, b) if first is one_job else (b, a)
        rounds.append({"one_job_s": round(one, 4), "n_jobs_s": round(many, 4)})
        print(json.dumps({"round": r, **rounds[-1]}), flush=True)
    one_med = statistics.median(x["one_job_s"] for x in rounds)
    many_med = statistics.median(x["n_jobs_s"] for x in rounds)
    paired = statistics.median(x["one_job_s"] / x["n_jobs_s"] for x in rounds)
    uri = screenshot_uri(width, height, 777)
    free = await parse_rate(worker, uri, args.parse_jobs, constrain=False)
    held = await parse_rate(worker, uri, args.parse_jobs, constrain=True)
    return {
        "targets": args.targets,
        "size": args.size,
        "rounds": rounds,
        "one_job_median_s": round(one_med, 4),
        "n_jobs_median_s": round(many_med, 4),
        "ratio_one_over_n_paired_median": round(paired, 3),
        "unconstrained_points": f"{free}/{args.parse_jobs}",
        "constrained_points": f"{held}/{args.parse_jobs}",
        "model": worker.engine.info.name,
        "style": worker.runner.grounding_style.name,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--size", default="1920x1080")
    parser.add_argument("--parse-jobs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from vlm_worker.serving.worker import start_worker

    worker = start_worker(dict(os.environ), warmup=True)
    try:
        result = asyncio.run(measure(worker, args))
    finally:
        worker.shutdown()
    print(
        f"\n{args.targets} targets on {args.size}: one job {result['one_job_median_s']} s, "
        f"{args.targets} jobs {result['n_jobs_median_s']} s; one/N paired median "
        f"{result['ratio_one_over_n_paired_median']}\npoints in answers: unconstrained "
        f"{result['unconstrained_points']}, constrained {result['constrained_points']} "
        f"({result['style']} style)"
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
