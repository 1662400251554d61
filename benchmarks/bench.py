"""Benchmark: the worker's job path against the bare vLLM engine, measured side by side.

One engine, one process. Every comparison runs the same jobs (same encoded images, same
prompt, same ``max_tokens`` with ``ignore_eos``) two ways, alternating, and reports the
ratio handler / bare measured in that run. Every job of a round carries a different
screenshot and vLLM's processor and prefix caches are emptied before each round, as in
production, where each request brings a new screenshot: a repeated image would let the
bare engine skip the very image processing being compared. Time to first token is the
first visible text in both paths.

1. throughput and latency at concurrency 1, 8 and 32 (``Worker.handler``: validation,
   image decode + resize, template, streaming with batching, result assembly; against
   ``AsyncLLM.generate`` fed the decoded image on the engine's own loop);
2. image preprocessing (decode / resize / template ms on one core) and end to end with
   the handler's pre-resize against handing the full-size image to vLLM's processor, plus
   the largest gap between a streaming job's chunks while 8 jobs with 4K PNGs are being
   preprocessed, and beside 8 whole such jobs through each path;
3. cold start, split by stage (a fresh child process);
4. peak RSS with 32 concurrent jobs carrying 4K images.

    python -m benchmarks.bench [--out benchmarks/results] [--label cpu]

Engine arguments come from the environment, exactly as the worker reads them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import functools
import gc
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vlm_worker.pipeline.hooks import PipelineHooks

CONCURRENCY = (1, 8, 32)


# ------------------------------------------------------------------ inputs
def screenshot_png(width: int, height: int, seed: int = 0, fmt: str = "PNG") -> bytes:
    """A screenshot-like image (flat panels, text-like noise rows) of realistic file size."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (width, height), (236, 238, 242))
    draw = ImageDraw.Draw(img)
    bar = max(8, height // 20)
    draw.rectangle([0, 0, width, bar], fill=(32, 60, 110))
    for _ in range(max(4, (width * height) // 200_000)):
        x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(bar, height - 20))
        x1 = min(width, x0 + int(rng.integers(40, max(41, width // 4))))
        y1 = min(height, y0 + int(rng.integers(16, max(17, height // 6))))
        draw.rectangle(
            [x0, y0, x1, y1],
            fill=tuple(int(c) for c in rng.integers(90, 255, 3)),
            outline=(40, 40, 40),
        )
    pixels = np.asarray(img).copy()
    # a photo-like panel (a wallpaper, an embedded picture): what makes real screenshots
    # several MB as PNG, like the ones users send
    ph, pw = height // 2, width // 2
    yy, xx = np.mgrid[0:ph, 0:pw]
    base = np.stack([(xx * 255 // pw), (yy * 255 // ph), ((xx + yy) * 127 // (pw + ph))], -1)
    noise = rng.integers(-24, 24, size=(ph, pw, 3))
    pixels[height - ph :, width - pw :] = np.clip(base + noise, 0, 255).astype(np.uint8)
    rows = rng.integers(bar, height - 6, size=max(10, height // 12))
    for y in rows:  # "text": short dark runs, which is what makes screenshots compress poorly
        x = int(rng.integers(0, width // 2))
        length = int(rng.integers(width // 8, width // 2))
        mask = rng.random((5, length)) < 0.45
        seg = pixels[y : y + 5, x : x + length]
        seg[mask[:, : seg.shape[1]]] = 30
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def job_input(uri: str, max_tokens: int, stream: bool = True) -> dict[str, Any]:
    return {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": uri}},
                    {"type": "text", "text": "Describe the screen and list the buttons."},
                ],
            }
        ],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": stream,
    }


def _decode_uri(uri: str) -> Image.Image:
    """The data URL loaded as vLLM itself loads one (``vllm serve``'s path): pybase64,
    Pillow, EXIF orientation, RGB."""
    from vllm.multimodal.media.image import ImageMediaIO

    head, payload = uri.split(",", 1)
    return ImageMediaIO(image_mode="RGB").load_base64(head[5:].split(";")[0], payload).media


# ------------------------------------------------------------------ stats
def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values), q))


@dataclass
class JobTiming:
    start: float
    first: float | None
    end: float
    tokens: int
    chunk_times: list[float] = field(default_factory=list)
    preprocess_ms: float | None = None


@dataclass
class RoundStats:
    mode: str
    concurrency: int
    jobs: int
    wall_s: float
    output_tokens: int
    tokens_per_s: float
    latency_p50_ms: float
    latency_p95_ms: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    preprocess_p50_ms: float | None
    #: where a handler round's preprocessing time went (``--trace-preprocess``)
    trace: dict[str, Any] | None = None

    @classmethod
    def of(cls, mode: str, concurrency: int, timings: list[JobTiming], wall: float) -> RoundStats:
        lat = [(t.end - t.start) * 1000 for t in timings]
        ttft = [((t.first or t.end) - t.start) * 1000 for t in timings]
        tokens = sum(t.tokens for t in timings)
        pre = [t.preprocess_ms for t in timings if t.preprocess_ms is not None]
        return cls(
            mode,
            concurrency,
            len(timings),
            round(wall, 4),
            tokens,
            round(tokens / wall, 2),
            round(pct(lat, 50), 2),
            round(pct(lat, 95), 2),
            round(pct(ttft, 50), 2),
            round(pct(ttft, 95), 2),
            round(pct(pre, 50), 2) if pre else None,
        )


# ------------------------------------------------------------------ preprocessing trace
def _traced_prepare(log_path: str, source: str | bytes, **kwargs: Any) -> Any:
    """``prepare_source``, appending when it ran to ``log_path``; runs where the worker
    runs it (an image process or a thread), so the trace shows queueing and transfer
    apart from the work itself. ``perf_counter`` is CLOCK_MONOTONIC: one clock for every
    process of the machine."""
    from vlm_worker.media.images import prepare_source

    start = time.perf_counter()
    image = prepare_source(source, **kwargs)
    end = time.perf_counter()
    with open(log_path, "a") as f:
        f.write(json.dumps([image.sha256, os.getpid(), start, end]) + "\n")
    return image


class PreprocessTrace:
    """Splits a handler round's preprocessing into: handing the image to its worker,
    the work there, getting the pixels back, and rendering the prompt.

    It found the slow first busy round on the H100 (README, Benchmarks).
    """

    def __init__(self) -> None:
        import tempfile

        self.log = Path(tempfile.mkdtemp(prefix="vlm-bench-")) / "preprocess-trace.jsonl"
        self.calls: list[tuple[float, float, str, bool]] = []  # start, end, sha256, alone
        self.renders: list[float] = []
        # Garbage collections in this process, and how late a thread that sleeps 2 ms
        # wakes: a long pause of either stalls every job at once.
        self.collections: list[tuple[int, float]] = []  # generation, ms
        self.slow: list[dict[str, Any]] = []  # collections of 50 ms or more, in detail
        self._gc_start = 0.0
        self._gc_sizes: list[int] = []
        gc.callbacks.append(self._on_gc)
        self.stall_max_ms = 0.0
        self._stop = threading.Event()
        threading.Thread(target=self._watch, name="bench-stall-probe", daemon=True).start()

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            # young generations only: counting the old one would itself take a while
            young = info["generation"] < 2
            self._gc_sizes = [len(gc.get_objects(g)) for g in range(2)] if young else []
            self._gc_start = time.perf_counter()
        else:
            ms = (time.perf_counter() - self._gc_start) * 1000
            self.collections.append((info["generation"], ms))
            if ms >= 50:
                self.slow.append(
                    {
                        "generation": info["generation"],
                        "ms": round(ms, 1),
                        "young_generation_sizes": self._gc_sizes,
                        "collected": info.get("collected"),
                        "uncollectable": info.get("uncollectable"),
                    }
                )

    def _watch(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            time.sleep(0.002)
            self.stall_max_ms = max(self.stall_max_ms, (time.perf_counter() - start) * 1000 - 2)

    def close(self) -> None:
        """Stop tracing (``BenchHooks.trace`` is cleared by its owner)."""
        gc.callbacks.remove(self._on_gc)
        self._stop.set()
        self.reset()
        self.log.parent.rmdir()

    def reset(self) -> None:
        self.calls.clear()
        self.renders.clear()
        self.collections.clear()
        self.slow = []
        self.stall_max_ms = 0.0
        self.log.unlink(missing_ok=True)

    def summary(self) -> dict[str, Any]:
        done = {}
        if self.log.exists():
            for line in self.log.read_text().splitlines():
                sha, pid, start, end = json.loads(line)
                done.setdefault(sha, []).append((pid, start, end))
        to_worker, work, back, pids = [], [], [], set()
        for start, end, sha, alone in self.calls:
            # the run of this image that began after this call did (images repeat per round)
            runs = [r for r in done.get(sha, []) if start <= r[1] <= end]
            if not runs or alone:
                continue
            pid, w_start, w_end = runs[0]
            pids.add(pid)
            to_worker.append((w_start - start) * 1000)
            work.append((w_end - w_start) * 1000)
            back.append((end - w_end) * 1000)

        def stats(xs: list[float]) -> dict[str, float] | None:
            return {"p50": round(pct(xs, 50), 2), "max": round(max(xs), 2)} if xs else None

        out = {
            "images_traced": len(to_worker),
            "images_alone": sum(1 for c in self.calls if c[3]),  # in a thread, not traced
            "workers_used": len(pids),
            "to_worker_ms": stats(to_worker),
            "work_ms": stats(work),
            "back_ms": stats(back),
            "render_ms": stats(self.renders),
            "gc_collections": [sum(1 for g, _ in self.collections if g == n) for n in range(3)],
            "gc_full_ms": [round(ms, 1) for g, ms in self.collections if g == 2],
            "gc_max_ms": round(max((ms for _, ms in self.collections), default=0.0), 1),
            "gc_slow": self.slow,
            "thread_stall_max_ms": round(self.stall_max_ms, 1),
        }
        self.reset()
        return out


class BenchHooks(PipelineHooks):
    """What the benchmark sees of the job path: the bare engine for its baseline, and,
    while ``trace`` is set, each image's and prompt's timing (``PreprocessTrace``)."""

    def __init__(self) -> None:
        self.llm: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.engine_started_at: float | None = None  # time.time()
        self.trace: PreprocessTrace | None = None

    def engine_started(self, llm: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.llm, self.loop, self.engine_started_at = llm, loop, time.time()

    def image_prepared(self, started: float, ended: float, image: Any, alone: bool) -> None:
        if self.trace is not None:
            self.trace.calls.append((started, ended, image.sha256, alone))

    def prompt_rendered(self, seconds: float) -> None:
        if self.trace is not None:
            self.trace.renders.append(seconds * 1000)

    def image_function(self) -> Any:
        if self.trace is None:
            return None
        return functools.partial(_traced_prepare, str(self.trace.log))


# ------------------------------------------------------------------ the two paths
class Bench:
    def __init__(self, worker: Any, hooks: BenchHooks) -> None:
        self.worker = worker
        self.hooks = hooks
        self.engine = worker.engine
        info = worker.engine.info
        self.bare_prompt = info.templater.apply_chat_template(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image"},
                        {"type": "text", "text": "Describe the screen and list the buttons."},
                    ],
                }
            ],
            tokenize=False,
            add_generation_prompt=True,
        )
        self._n = 0

    def reset_caches(self) -> None:
        """Empty vLLM's processor and prefix caches, so no round profits from an earlier
        one (users send new screenshots; a cache hit would skip the work being measured)."""

        async def reset() -> None:
            await self.hooks.llm.reset_mm_cache()
            await self.hooks.llm.reset_prefix_cache()

        asyncio.run_coroutine_threadsafe(reset(), self.hooks.loop).result()

    def _rid(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}-{self._n}"

    async def handler_job(self, uri: str, max_tokens: int, stream: bool = True) -> JobTiming:
        start = time.perf_counter()
        first = None
        chunk_times = []
        tokens = 0
        pre = None
        async for chunk in self.worker.handler(
            {"id": self._rid("h"), "input": job_input(uri, max_tokens, stream)}
        ):
            now = time.perf_counter()
            chunk_times.append(now)
            if first is None and (chunk.get("text") or "usage" in chunk):
                first = now
            if "error" in chunk:
                raise RuntimeError(f"handler job failed: {chunk['error']}")
            if "usage" in chunk:
                tokens = chunk["usage"]["completion_tokens"]
                pre = chunk["timings"]["preprocess_ms"]
        return JobTiming(start, first, time.perf_counter(), tokens, chunk_times, pre)

    async def bare_job(self, uri: str, max_tokens: int) -> JobTiming:
        """What a user of the bare engine does with the same job: decode the base64 and the
        image, hand vLLM the full-size image and the rendered prompt."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        img = await loop.run_in_executor(None, _decode_uri, uri)
        params = SamplingParams(
            max_tokens=max_tokens,
            ignore_eos=True,
            temperature=0.0,
            output_kind=RequestOutputKind.DELTA,
        )
        first = None
        tokens = 0
        prompt = {"prompt": self.bare_prompt, "multi_modal_data": {"image": img}}
        async for out in self.hooks.llm.generate(prompt, params, self._rid("b")):
            tokens += len(out.outputs[0].token_ids)
            # first visible text, as for the handler (a random model's first tokens can be
            # pieces of a character that decode to nothing yet)
            if first is None and out.outputs[0].text:
                first = time.perf_counter()
        return JobTiming(start, first, time.perf_counter(), tokens)

    async def _gather(
        self, make: Callable[[int], Any], jobs: int, concurrency: int
    ) -> tuple[list[JobTiming], float]:
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> JobTiming:
            async with sem:
                return await make(i)

        start = time.perf_counter()
        timings = await asyncio.gather(*(one(i) for i in range(jobs)))
        return list(timings), time.perf_counter() - start

    def handler_round(
        self, uris: list[str], max_tokens: int, concurrency: int, jobs: int
    ) -> RoundStats:
        async def go() -> tuple[list[JobTiming], float]:
            return await self._gather(
                lambda i: self.handler_job(uris[i % len(uris)], max_tokens), jobs, concurrency
            )

        self.reset_caches()
        if self.hooks.trace:
            self.hooks.trace.reset()
        timings, wall = asyncio.run(go())
        stats = RoundStats.of("handler", concurrency, timings, wall)
        if self.hooks.trace:
            stats.trace = self.hooks.trace.summary()
        return stats

    def bare_round(
        self, uris: list[str], max_tokens: int, concurrency: int, jobs: int
    ) -> RoundStats:
        async def go() -> tuple[list[JobTiming], float]:
            return await self._gather(
                lambda i: self.bare_job(uris[i % len(uris)], max_tokens), jobs, concurrency
            )

        self.reset_caches()
        timings, wall = asyncio.run_coroutine_threadsafe(go(), self.hooks.loop).result()
        return RoundStats.of("bare", concurrency, timings, wall)


# ------------------------------------------------------------------ sections
def throughput(
    bench: Bench,
    images: list[bytes],
    max_tokens: int,
    reps: int,
    warmup: int = 1,
    jobs_per_slot: int = 2,
) -> list[dict]:
    """Rounds of each mode at each concurrency, alternating.

    The first ``warmup`` rounds of each mode at a concurrency are reported apart and left
    out of the comparison: a first burst at a new concurrency pays one-off costs (kept in
    the results as ``warmup``, since a worker's first burst after start pays them too).
    """
    uris = [data_uri(b) for b in images]
    rows = []
    for c in CONCURRENCY:
        jobs = max(4, jobs_per_slot * c)
        runs: dict[str, list[RoundStats]] = {"handler": [], "bare": []}
        warm: dict[str, list[RoundStats]] = {"handler": [], "bare": []}
        for i in range(warmup + reps):  # alternate, so drift hits both modes alike
            into = warm if i < warmup else runs
            into["bare"].append(bench.bare_round(uris, max_tokens, c, jobs))
            into["handler"].append(bench.handler_round(uris, max_tokens, c, jobs))
        best = {m: max(rs, key=lambda r: r.tokens_per_s) for m, rs in runs.items()}
        h, b = best["handler"], best["bare"]
        median = {m: statistics.median(r.tokens_per_s for r in rs) for m, rs in runs.items()}
        paired = [
            hr.tokens_per_s / br.tokens_per_s
            for hr, br in zip(runs["handler"], runs["bare"], strict=True)
        ]
        row = {
            "concurrency": c,
            "jobs": jobs,
            "max_tokens": max_tokens,
            "handler": asdict(h),
            "bare": asdict(b),
            "ratio_tokens_per_s": round(h.tokens_per_s / b.tokens_per_s, 4),
            "ratio_tokens_per_s_of_medians": round(median["handler"] / median["bare"], 4),
            # each handler round against the bare round just before it: drift cancels
            "ratio_tokens_per_s_paired_median": round(statistics.median(paired), 4),
            "ratio_latency_p50": round(h.latency_p50_ms / b.latency_p50_ms, 4),
            "ratio_latency_p95": round(h.latency_p95_ms / b.latency_p95_ms, 4),
            "ratio_ttft_p50": round(h.ttft_p50_ms / b.ttft_p50_ms, 4),
            "added_ttft_p50_ms": round(h.ttft_p50_ms - b.ttft_p50_ms, 2),
            "added_ttft_p50_ms_of_medians": round(
                statistics.median(r.ttft_p50_ms for r in runs["handler"])
                - statistics.median(r.ttft_p50_ms for r in runs["bare"]),
                2,
            ),
            "all_runs": {m: [asdict(r) for r in rs] for m, rs in runs.items()},
            "warmup": {m: [asdict(r) for r in rs] for m, rs in warm.items()},
        }
        rows.append(row)
        for m in ("bare", "handler"):
            for r in warm[m]:
                print(
                    f"  c={c:>2} first round, {m}: {r.tokens_per_s:8.1f} tok/s  ttft p50 "
                    f"{r.ttft_p50_ms:.1f} ms  preprocessing p50 {r.preprocess_p50_ms} ms"
                    + (f"  {r.trace}" if r.trace else ""),
                    flush=True,
                )
        print(
            f"  c={c:>2}: handler {h.tokens_per_s:8.1f} tok/s  bare {b.tokens_per_s:8.1f} tok/s"
            f"  ratio {row['ratio_tokens_per_s']:.3f} (of medians "
            f"{row['ratio_tokens_per_s_of_medians']:.3f}, paired "
            f"{row['ratio_tokens_per_s_paired_median']:.3f})  ttft p50 {h.ttft_p50_ms:.1f} vs "
            f"{b.ttft_p50_ms:.1f} ms (handler preprocessing p50 {h.preprocess_p50_ms} ms)",
            flush=True,
        )
    return rows


def preprocessing(bench: Bench, e2e_reps: int = 5) -> list[dict]:
    """Decode / resize / template on one core, and end to end: pre-resize vs full size.

    One job's end-to-end time differs by ~5 % between paths while single runs on a shared
    GPU host spread by ±10 %, so ``e2e_reps`` interleaved pairs (each on a different image)
    give a median per path and the median of the pairs' ratios.
    """
    from vlm_worker.contract.job_schema import parse_job
    from vlm_worker.media.images import (
        decode_pixels,
        png_pixels,
        read_header,
        resize_like_processor,
    )
    from vlm_worker.prompt.chat import normalize_placeholders, render, template_messages

    info = bench.engine.info
    cases = [
        ("3840x2160 PNG", (3840, 2160, "PNG"), "image/png"),
        ("1920x1080 PNG", (1920, 1080, "PNG"), "image/png"),
        ("4000x3000 JPEG", (4000, 3000, "JPEG"), "image/jpeg"),
    ]
    rows = []
    for name, (width, height, fmt), mime in cases:
        # 8 different images: a burst of one image 8 times would hit vLLM's processor cache
        variants = [screenshot_png(width, height, 100 + i, fmt) for i in range(8)]
        data = variants[0]
        uris = [data_uri(v, mime) for v in variants]
        uri = uris[0]
        decode, resize, template = [], [], []
        small_job = job_input(uri, 1)
        for _ in range(3):
            t0 = time.perf_counter()
            pixels, _ = decode_pixels(data, "bench", 200_000_000)
            t1 = time.perf_counter()
            h, w = info.geometry.target_size(height, width)
            resized = resize_like_processor(pixels, (h, w), info.image_processor)
            t2 = time.perf_counter()
            job = parse_job(small_job)
            text = render(info.templater, template_messages(job.messages))
            normalize_placeholders(text, 1, info.placeholder, info.image_token)
            info.count_text_tokens(text)
            t3 = time.perf_counter()
            decode.append((t1 - t0) * 1000)
            resize.append((t2 - t1) * 1000)
            template.append((t3 - t2) * 1000)
        # the reference: the full-size image as vLLM would load it, through the processor
        same = _same_pixels(info.image_processor, info.geometry, _decode_uri(uri), resized)
        e2e_h, e2e_b = [], []
        for i in range(e2e_reps):
            bench.reset_caches()
            e2e_b.append(_run_bare(bench, bench.bare_job(uris[i % len(uris)], 1)))
            bench.reset_caches()
            e2e_h.append(_run(bench, bench.handler_job(uris[i % len(uris)], 1, stream=False)))
        # 8 such jobs arriving together: the handler decodes and resizes them in parallel;
        # the bare engine's processor resizes them one after another on its loop.
        burst_h = bench.handler_round(uris, 1, 8, 8).wall_s * 1000
        burst_b = bench.bare_round(uris, 1, 8, 8).wall_s * 1000
        row = {
            "image": name,
            "bytes": len(data),
            "resized": [w, h],
            "decode_ms": round(statistics.median(decode), 1),
            "resize_ms": round(statistics.median(resize), 1),
            "template_ms": round(statistics.median(template), 2),
            "resized_pixels_identical_to_processor": same,
            "decoder": "libpng"
            if png_pixels(read_header(data, "bench", 1 << 30), data) is not None
            else "Pillow",
            "e2e_prefixed_resize_ms": round(statistics.median(e2e_h), 1),
            "e2e_full_size_to_vllm_ms": round(statistics.median(e2e_b), 1),
            "burst_of_8_prefixed_resize_ms": round(burst_h, 1),
            "burst_of_8_full_size_to_vllm_ms": round(burst_b, 1),
        }
        row["burst_ratio"] = round(burst_h / burst_b, 3)
        row["e2e_ratio"] = round(row["e2e_prefixed_resize_ms"] / row["e2e_full_size_to_vllm_ms"], 3)
        row["e2e_ratio_paired_median"] = round(
            statistics.median(h / b for h, b in zip(e2e_h, e2e_b, strict=True)), 3
        )
        row["e2e_pairs_ms"] = [
            [round(h, 1), round(b, 1)] for h, b in zip(e2e_h, e2e_b, strict=True)
        ]
        rows.append(row)
        print(
            f"  {name}: decode {row['decode_ms']} ms, resize {row['resize_ms']} ms, template "
            f"{row['template_ms']} ms; e2e {row['e2e_prefixed_resize_ms']} vs "
            f"{row['e2e_full_size_to_vllm_ms']} ms (paired {row['e2e_ratio_paired_median']}); 8 at once "
            f"{row['burst_of_8_prefixed_resize_ms']} vs {row['burst_of_8_full_size_to_vllm_ms']}"
            f" ms; identical pixels: {same}",
            flush=True,
        )
    return rows


def _same_pixels(
    image_processor: Any, geometry: Any, original: Image.Image, resized: Image.Image
) -> bool:
    """The processor's output for the original and for our pre-resized image, compared
    bit for bit, with the bounds vLLM gives the processor (IMAGE_MIN/MAX_PIXELS)."""
    import torch

    bounds = {"min_pixels": geometry.min_pixels, "max_pixels": geometry.max_pixels}
    a = image_processor(images=[original], return_tensors="pt", **bounds)
    b = image_processor(images=[resized], return_tensors="pt", **bounds)
    return bool(
        torch.equal(a["image_grid_thw"], b["image_grid_thw"])
        and torch.equal(a["pixel_values"], b["pixel_values"])
    )


def _run(bench: Bench, coro: Any) -> float:
    t = asyncio.run(coro)
    return (t.end - t.start) * 1000


def _run_bare(bench: Bench, coro: Any) -> float:
    t = asyncio.run_coroutine_threadsafe(coro, bench.hooks.loop).result()
    return (t.end - t.start) * 1000


def stream_gaps(bench: Bench, max_tokens: int, reps: int = 4) -> dict:
    """Largest gap between a streaming job's chunks, alone and beside 8 4K-PNG jobs.

    Three loads, each started while the streaming job is generating:
    - ``preprocessing``: 8 jobs through the handler's preparation (base64, decode, resize,
      template), the image work the target is about;
    - ``handler_jobs`` / ``bare_jobs``: 8 whole jobs, through the handler and through the
      bare engine. Both add vLLM's own input processing (on its event loop) and the
      prefill of 8 images of ~1200 tokens each, which stall every running request in either case; the
      ratio of the two tells whether the handler stalls streams more than vLLM does.
    Each figure is the median over ``reps`` runs of the run's largest gap. Some GPU hosts
    stall a stream for 15-26 ms with no load at all (7-8 ms on others, at the same 6 ms
    median gap), so the runs are interleaved and also compared in pairs (each load
    against the unloaded run just before it) and against their own stream's median gap
    (which cancels a machine's slower pace, though not its sporadic stalls).
    """
    small = data_uri(screenshot_png(640, 360, 5))
    bigs = [data_uri(screenshot_png(3840, 2160, 200 + i)) for i in range(8)]
    runner = bench.worker.runner

    def load(kind: str, big: str) -> Any:
        if kind == "preprocessing":
            return runner.prepare(job_input(big, 1), bench._rid("p"))
        if kind == "handler_jobs":
            return bench.handler_job(big, 1, stream=False)
        future = asyncio.run_coroutine_threadsafe(bench.bare_job(big, 1), bench.hooks.loop)
        return asyncio.wrap_future(future)

    async def measure(kind: str | None) -> tuple[float, float]:
        lag = [0.0]
        stop = asyncio.Event()

        async def ticker() -> None:
            loop = asyncio.get_running_loop()
            last = loop.time()
            while not stop.is_set():
                await asyncio.sleep(0.002)
                now = loop.time()
                lag[0] = max(lag[0], now - last - 0.002)
                last = now

        tick = asyncio.create_task(ticker())
        streamer = asyncio.create_task(bench.handler_job(small, max_tokens))
        await asyncio.sleep(0.3)  # the streamer is generating
        loads = [asyncio.ensure_future(load(kind, big)) for big in (bigs if kind else [])]
        timing = await streamer
        await asyncio.gather(*loads)
        stop.set()
        await tick
        gaps = np.diff(np.asarray(timing.chunk_times[1:-1]))
        return float(gaps.max() * 1000), lag[0] * 1000, float(np.median(gaps) * 1000)

    # one token per chunk, so gaps show every stall
    saved = runner.policy
    from vlm_worker.engine.deltas import BatchPolicy

    runner.policy = BatchPolicy(1, 1, 1.0)
    runs: dict[str, list[tuple[float, float, float]]] = {}
    try:
        for _ in range(reps):  # interleaved, so drift hits every load alike
            for kind in (None, "preprocessing", "handler_jobs", "bare_jobs"):
                bench.reset_caches()
                runs.setdefault(kind or "alone", []).append(asyncio.run(measure(kind)))
    finally:
        runner.policy = saved
    gap = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
    lag = {k: max(r[1] for r in v) for k, v in runs.items()}
    # largest gap over the stream's own median gap: how far the worst stall stands out
    spike = {k: statistics.median(r[0] / r[2] for r in v) for k, v in runs.items()}
    alone, prep = runs["alone"], runs["preprocessing"]
    result = {
        "reps": reps,
        "max_gap_alone_ms": round(gap["alone"], 2),
        "max_gap_while_8_4k_jobs_preprocess_ms": round(gap["preprocessing"], 2),
        "ratio": round(gap["preprocessing"] / gap["alone"], 3),
        "ratio_paired_median": round(
            statistics.median(p[0] / a[0] for a, p in zip(alone, prep, strict=True)), 3
        ),
        "ratio_pace_normalized": round(spike["preprocessing"] / spike["alone"], 3),
        "median_gap_ms": {k: round(statistics.median(r[2] for r in v), 2) for k, v in runs.items()},
        "max_gap_beside_8_4k_handler_jobs_ms": round(gap["handler_jobs"], 2),
        "max_gap_beside_8_4k_bare_jobs_ms": round(gap["bare_jobs"], 2),
        "handler_jobs_vs_bare_jobs_ratio": round(gap["handler_jobs"] / gap["bare_jobs"], 3),
        "event_loop_max_lag_ms": {k: round(v, 2) for k, v in lag.items()},
        "all_runs_ms": {k: [round(r[0], 2) for r in v] for k, v in runs.items()},
    }
    print(
        f"  streaming gap: alone {gap['alone']:.1f} ms, while 8 4K jobs preprocess "
        f"{gap['preprocessing']:.1f} ms (ratio {result['ratio']}, paired "
        f"{result['ratio_paired_median']}, pace-normalized {result['ratio_pace_normalized']}); "
        "beside 8 whole 4K jobs: "
        f"handler {gap['handler_jobs']:.1f} ms, bare engine {gap['bare_jobs']:.1f} ms; "
        f"loop lag {result['event_loop_max_lag_ms']}",
        flush=True,
    )
    return result


def memory(bench: Bench, max_tokens: int) -> dict:
    import psutil

    me = psutil.Process()
    uris = [data_uri(screenshot_png(3840, 2160, 10 + i)) for i in range(4)]
    image_pids = set(bench.worker.runner.images.pids())
    peak = {"rss": me.memory_info().rss, "engine": 0, "images": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["rss"] = max(peak["rss"], me.memory_info().rss)
            sums = {"engine": 0, "images": 0}
            for child in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    sums["images" if child.pid in image_pids else "engine"] += (
                        child.memory_info().rss
                    )
            for key, value in sums.items():
                peak[key] = max(peak[key], value)
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    time.sleep(0.2)
    base = dict(peak)
    stats = bench.handler_round(uris, max_tokens, 32, 32)
    done.set()
    t.join()
    mb = 2**20
    result = {
        "jobs": 32,
        "image": "3840x2160 PNG",
        "worker_rss_before_mb": round(base["rss"] / mb),
        "worker_rss_peak_mb": round(peak["rss"] / mb),
        "image_processes": len(image_pids),
        "image_processes_rss_before_mb": round(base["images"] / mb),
        "image_processes_rss_peak_mb": round(peak["images"] / mb),
        "engine_processes_rss_peak_mb": round(peak["engine"] / mb),
        "round": asdict(stats),
    }
    print(
        f"  memory: worker RSS {result['worker_rss_before_mb']} -> peak "
        f"{result['worker_rss_peak_mb']} MiB with 32 concurrent 4K jobs; "
        f"{len(image_pids)} image processes {result['image_processes_rss_before_mb']} -> "
        f"{result['image_processes_rss_peak_mb']} MiB; engine processes "
        f"{result['engine_processes_rss_peak_mb']} MiB",
        flush=True,
    )
    return result


def cold_start() -> dict:
    """A fresh child process: interpreter start → imports → engine → warm-up → first job."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", "--cold-start-child"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("COLD ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"cold start child failed: {proc.stderr[-2000:]}")
    result = json.loads(lines[-1][5:])
    print("  cold start: " + ", ".join(f"{k} {v} s" for k, v in result.items()), flush=True)
    return result


def _cold_start_child() -> None:
    import psutil

    born = psutil.Process().create_time()
    t_imports = time.time()
    from vlm_worker.serving.worker import start_worker  # the import is what is timed

    t_imported = time.time()
    import vllm  # noqa: F401  (what start_worker would import first; timed on its own)
    from vllm import AsyncEngineArgs  # noqa: F401

    t_vllm = time.time()
    stages: dict[str, float] = {}
    hooks = BenchHooks()
    t0 = time.time()
    w = start_worker(warmup=False, hooks=hooks)
    # start_worker's own work before the engine (settings, model lookup, image process
    # spawn) takes milliseconds: the engine's share is the time until it was up
    stages["engine_start_s"] = (hooks.engine_started_at or t0) - t0
    t1 = time.time()
    secs = w.warmup()
    t2 = time.time()
    data = screenshot_png(1280, 720, 7)

    async def first() -> None:
        async for _ in w.handler({"id": "first", "input": job_input(data_uri(data), 32)}):
            pass

    asyncio.run(first())
    t3 = time.time()
    w.shutdown()
    result = {
        "process_to_imports_s": round(t_imports - born, 2),
        "imports_s": round(t_imported - t_imports, 2),
        "vllm_import_s": round(t_vllm - t_imported, 2),
        "engine_start_s": round(stages.get("engine_start_s", 0.0), 2),
        "other_startup_s": round((t1 - t0) - stages.get("engine_start_s", 0.0), 2),
        "warmup_s": round(secs, 2),
        "first_job_s": round(t3 - t2, 2),
        "process_to_first_job_done_s": round(t3 - born, 2),
    }
    print("COLD " + json.dumps(result), flush=True)


# ------------------------------------------------------------------ report
def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:
        pass
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


#: The issue's per-concurrency targets: handler tok/s at least this share of the bare
#: engine's, and at most this much added time to first token (ms).
TOKENS_RATIO_TARGET = 0.98
ADDED_TTFT_TARGET_MS = 5.0


def _bootstrap_ci(values: np.ndarray) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the mean; a fixed seed, so reruns agree."""
    rng = np.random.default_rng(0)
    draws = rng.choice(values, size=(10_000, len(values)), replace=True)
    low, high = np.percentile(draws.mean(axis=1), [2.5, 97.5])
    return float(low), float(high)


#: Fewer round pairs than this give no verdict: a bootstrap interval over a handful of
#: values is far too narrow.
MIN_PAIRS = 6


def _verdict(low: float, high: float, ok: Callable[[float], bool], pairs: int) -> str:
    """Met when the whole interval meets the target, missed when none of it does."""
    if pairs < MIN_PAIRS:
        return "too few pairs"
    if ok(low) and ok(high):
        return "met"
    if not ok(low) and not ok(high):
        return "missed"
    return "unresolved"


def pooled(results: list[dict]) -> list[dict]:
    """Per concurrency, every handler round against the bare round just before it, over
    one or more results files: the ratio of tok/s (geometric mean) and the added time to
    first token (mean), each with a 95 % bootstrap interval and a verdict on the target.

    Why: a run's rounds of one mode spread by 5-15 % on a GPU host, so one run's best or
    median round cannot tell a ratio of 0.98 from 1.0, nor +5 ms from +30. The interval
    says whether the runs show a target met, show it missed, or cannot tell; pooling
    runs of the same code narrows it.
    """
    out = []
    for c in sorted({r["concurrency"] for res in results for r in res["throughput"]}):
        log_ratios, added = [], []
        for res in results:
            for row in res["throughput"]:
                if row["concurrency"] != c:
                    continue
                runs = row["all_runs"]
                for h, b in zip(runs["handler"], runs["bare"], strict=True):
                    log_ratios.append(np.log(h["tokens_per_s"] / b["tokens_per_s"]))
                    added.append(h["ttft_p50_ms"] - b["ttft_p50_ms"])
        lr, dt = np.asarray(log_ratios), np.asarray(added)
        r_low, r_high = (float(np.exp(v)) for v in _bootstrap_ci(lr))
        t_low, t_high = _bootstrap_ci(dt)
        out.append(
            {
                "concurrency": c,
                "pairs": len(lr),
                "tokens_per_s_ratio": round(float(np.exp(lr.mean())), 4),
                "tokens_per_s_ratio_ci95": [round(r_low, 4), round(r_high, 4)],
                "tokens_per_s_target": _verdict(
                    r_low, r_high, lambda v: v >= TOKENS_RATIO_TARGET, len(lr)
                ),
                "added_ttft_p50_ms": round(float(dt.mean()), 2),
                "added_ttft_p50_ms_ci95": [round(t_low, 2), round(t_high, 2)],
                "added_ttft_target": _verdict(
                    t_low, t_high, lambda v: v <= ADDED_TTFT_TARGET_MS, len(dt)
                ),
            }
        )
    return out


def pooled_markdown(results: list[dict], names: list[str]) -> str:
    lines = [
        f"Pooled over {len(results)} run(s): {', '.join(names)}",
        "",
        f"| concurrency | round pairs | tok/s ratio (95 % CI) | ≥ {TOKENS_RATIO_TARGET:g} | "
        f"added TTFT p50, ms (95 % CI) | ≤ {ADDED_TTFT_TARGET_MS:g} ms |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for p in pooled(results):
        (rl, rh), (tl, th) = p["tokens_per_s_ratio_ci95"], p["added_ttft_p50_ms_ci95"]
        lines.append(
            f"| {p['concurrency']} | {p['pairs']} | {p['tokens_per_s_ratio']:.3f} "
            f"({rl:.3f} to {rh:.3f}) | {p['tokens_per_s_target']} | "
            f"{p['added_ttft_p50_ms']:+.1f} ({tl:+.1f} to {th:+.1f}) | {p['added_ttft_target']} |"
        )
    return "\n".join(lines)


def targets(results: dict) -> dict:
    """The issue's targets, judged on the best round of each mode and on the medians.

    Rounds of one mode spread by 5-15 % on a shared GPU host; a best-of ratio then
    follows whichever mode had the luckiest round, so both are kept.
    """
    rows = results["throughput"]
    out: dict[str, Any] = {
        "handler_tokens_per_s_ratio_min": min(r["ratio_tokens_per_s"] for r in rows),
        "handler_tokens_per_s_ratio_ge_0.98": all(
            r["ratio_tokens_per_s"] >= TOKENS_RATIO_TARGET for r in rows
        ),
        "added_ttft_p50_ms_max": max(r["added_ttft_p50_ms"] for r in rows),
        "median_tokens_per_s_ratio_min": min(r["ratio_tokens_per_s_of_medians"] for r in rows),
        "median_tokens_per_s_ratio_ge_0.98": all(
            r["ratio_tokens_per_s_of_medians"] >= TOKENS_RATIO_TARGET for r in rows
        ),
        "median_added_ttft_p50_ms_max": max(r["added_ttft_p50_ms_of_medians"] for r in rows),
        # every round pair of this run, with 95 % intervals: met, missed or unresolved
        "per_concurrency_ci95": {
            p["concurrency"]: {
                "tokens_per_s": p["tokens_per_s_target"],
                "added_ttft": p["added_ttft_target"],
            }
            for p in pooled([results])
        },
    }
    if "stream_gaps" in results:
        g = results["stream_gaps"]
        out["stream_gap_ratio_le_1.2"] = g["ratio"] <= 1.2
        out["stream_gap_paired_ratio_le_1.2"] = g["ratio_paired_median"] <= 1.2
    if "preprocessing" in results:
        pre = results["preprocessing"]
        out |= {
            "prefixed_resize_faster_for_4k_single": pre[0]["e2e_ratio"] < 1.0,
            "prefixed_resize_faster_for_4k_single_paired": pre[0]["e2e_ratio_paired_median"] < 1.0,
            "prefixed_resize_faster_for_4k_burst_of_8": pre[0]["burst_ratio"] < 1.0,
            "resized_pixels_identical": all(
                r["resized_pixels_identical_to_processor"] for r in pre
            ),
        }
    return out


def markdown(results: dict) -> str:
    """The README's tables for one results file."""
    lines = [
        f"**{results['device']}**, {results['model']}, vLLM {results['vllm']}, {results['date']}",
        "",
        "| concurrency | handler tok/s | bare tok/s | ratio | ratio of medians "
        "| TTFT p50 handler / bare (ms) "
        "| latency p95 handler / bare (ms) | handler preprocessing p50 (ms) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["throughput"]:
        h, b = r["handler"], r["bare"]
        lines.append(
            f"| {r['concurrency']} | {h['tokens_per_s']:.1f} | {b['tokens_per_s']:.1f} | "
            f"{r['ratio_tokens_per_s']:.3f} | {r['ratio_tokens_per_s_of_medians']:.3f} | "
            f"{h['ttft_p50_ms']:.1f} / {b['ttft_p50_ms']:.1f} | "
            f"{h['latency_p95_ms']:.0f} / {b['latency_p95_ms']:.0f} | {h['preprocess_p50_ms']} |"
        )
    if "preprocessing" not in results:  # an --only-throughput run
        return "\n".join(lines)
    lines += [
        "",
        "| image | decode ms | resize ms | template ms | end to end: pre-resize / full size "
        "to vLLM (ms) | paired ratio | 8 at once (ms) | pixels identical |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in results["preprocessing"]:
        lines.append(
            # files from before the libpng path have no "decoder": theirs was Pillow
            f"| {p['image']} ({p['bytes'] / 1e6:.1f} MB, {p.get('decoder', 'Pillow')}) | "
            f"{p['decode_ms']} | {p['resize_ms']} | "
            f"{p['template_ms']} | {p['e2e_prefixed_resize_ms']} / "
            f"{p['e2e_full_size_to_vllm_ms']} | {p.get('e2e_ratio_paired_median', 'n/a')} | "
            f"{p['burst_of_8_prefixed_resize_ms']} / "
            f"{p['burst_of_8_full_size_to_vllm_ms']} | {p['resized_pixels_identical_to_processor']} |"
        )
    g, m, c = results["stream_gaps"], results["memory"], results.get("cold_start", {})
    # paired and pace-normalized ratios came later: older committed files lack them
    g = {"ratio_paired_median": "n/a", "ratio_pace_normalized": "n/a", "reps": 3} | g
    lines += [
        "",
        f"- Largest gap between a streaming job's chunks: {g['max_gap_alone_ms']} ms alone, "
        f"{g['max_gap_while_8_4k_jobs_preprocess_ms']} ms while 8 jobs with 4K PNGs are "
        f"preprocessed (ratio {g['ratio']}; median of paired ratios "
        f"{g['ratio_paired_median']}; against each stream's median gap "
        f"{g['ratio_pace_normalized']}; {g['reps']} runs each); beside 8 whole 4K jobs "
        "(adds vLLM's input "
        f"processing and their prefill) {g['max_gap_beside_8_4k_handler_jobs_ms']} ms through "
        f"the handler, {g['max_gap_beside_8_4k_bare_jobs_ms']} ms through the bare engine "
        f"(ratio {g['handler_jobs_vs_bare_jobs_ratio']}).",
        f"- Peak RSS with 32 concurrent 4K jobs: worker {m['worker_rss_before_mb']} → "
        f"{m['worker_rss_peak_mb']} MiB; {m.get('image_processes', 0)} image processes "
        f"{m.get('image_processes_rss_before_mb', 0)} → {m.get('image_processes_rss_peak_mb', 0)}"
        f" MiB; engine processes {m['engine_processes_rss_peak_mb']} MiB.",
    ]
    if c:
        lines.append(
            f"- Cold start: imports {c['imports_s']} s (vLLM {c.get('vllm_import_s', 'in other')} s), "
            f"engine {c['engine_start_s']} s, other "
            f"start-up {c['other_startup_s']} s, warm-up {c['warmup_s']} s, first job "
            f"{c['first_job_s']} s; process start to first job done "
            f"{c['process_to_first_job_done_s']} s."
        )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["throughput"]
    cs = [str(r["concurrency"]) for r in rows]
    x = np.arange(len(cs))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, title in (
        (axes[0], "tokens_per_s", "output tokens/s"),
        (axes[1], "ttft_p50_ms", "time to first token p50 (ms)"),
    ):
        ax.bar(x - 0.2, [r["bare"][key] for r in rows], 0.4, label="bare engine")
        ax.bar(x + 0.2, [r["handler"][key] for r in rows], 0.4, label="handler")
        ax.set_xticks(x, cs)
        ax.set_xlabel("concurrency")
        ax.set_title(title)
        ax.legend()
    pre = results["preprocessing"]
    names = [p["image"] for p in pre]
    bottom = np.zeros(len(pre))
    for key in ("decode_ms", "resize_ms", "template_ms"):
        vals = np.asarray([p[key] for p in pre])
        axes[2].bar(names, vals, bottom=bottom, label=key.removesuffix("_ms"))
        bottom += vals
    axes[2].set_title("preprocessing per image, one core (ms)")
    axes[2].legend()
    axes[2].tick_params(axis="x", labelsize=8)
    fig.suptitle(f"vlm-worker vs bare vLLM: {results['device']}, {results['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--label", default="cpu")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--warmup", type=int, default=1, help="rounds per mode and concurrency left out"
    )
    parser.add_argument(
        "--no-gc-freeze",
        action="store_true",
        help="undo the worker's start-up gc.freeze() (to see what it buys)",
    )
    parser.add_argument(
        "--jobs-per-slot",
        type=int,
        default=2,
        help="jobs per round = this many times the concurrency (longer rounds, less noise)",
    )
    parser.add_argument(
        "--trace-preprocess",
        action="store_true",
        help="record where each handler round's preprocessing time went",
    )
    parser.add_argument(
        "--e2e-reps", type=int, default=5, help="single-job pairs per image, pre-resize vs full"
    )
    parser.add_argument(
        "--gap-reps", type=int, default=4, help="runs of each stream-gap load, interleaved"
    )
    parser.add_argument(
        "--pipe-pixels",
        action="store_true",
        help="image processes return pixels through the pool's pipe, not /dev/shm (A/B)",
    )
    parser.add_argument("--skip-cold-start", action="store_true")
    parser.add_argument(
        "--only-throughput", action="store_true", help="section 1 only (quick before/after)"
    )
    parser.add_argument("--cold-start-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--table", type=Path, help="print a results file as markdown tables")
    parser.add_argument(
        "--pool",
        type=Path,
        nargs="+",
        help="results files of the same code: tok/s ratio and added TTFT with 95 %% intervals",
    )
    args = parser.parse_args(argv)
    if args.table:
        print(markdown(json.loads(args.table.read_text())))
        return 0
    if args.pool:
        runs = [json.loads(path.read_text()) for path in args.pool]
        print(pooled_markdown(runs, [path.stem for path in args.pool]))
        return 0
    if args.cold_start_child:
        _cold_start_child()
        return 0

    os.environ.setdefault("LOG_LEVEL", "WARNING")  # per-job logs would swamp the report
    import vllm

    from vlm_worker.serving.worker import start_worker

    t_all = time.perf_counter()
    results: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "label": args.label,
        "device": device_name(),
        "vllm": vllm.__version__,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{results['date']}-{args.label}"
    partial = stem.with_suffix(".partial.json")

    def keep(section: str, value: Any) -> None:
        """Each section is saved as it finishes: a late failure keeps the earlier ones."""
        results[section] = value
        partial.write_text(json.dumps(results, indent=2) + "\n")

    if not (args.skip_cold_start or args.only_throughput):
        print("cold start (child process) ...", flush=True)
        keep("cold_start", cold_start())
    hooks = BenchHooks()
    worker = start_worker(hooks=hooks)
    try:
        results["model"] = worker.engine.info.name
        results["max_model_len"] = worker.engine.info.max_model_len
        results["image_workers"] = worker.runner.images.mode
        worker.runner.images.ship_pixels = not args.pipe_pixels
        results["pixels_back_through"] = "pipe" if args.pipe_pixels else "/dev/shm"
        if args.no_gc_freeze:
            gc.unfreeze()
        results["gc_frozen_objects"] = gc.get_freeze_count()
        bench = Bench(worker, hooks)
        if args.trace_preprocess:
            hooks.trace = PreprocessTrace()
        # a different screenshot for every job of a round, as users send
        images = [
            screenshot_png(1280, 720, seed) for seed in range(args.jobs_per_slot * max(CONCURRENCY))
        ]
        print(
            f"throughput, 1280x720 PNG, {args.max_tokens} tokens, images in "
            f"{results['image_workers']} ...",
            flush=True,
        )
        keep(
            "throughput",
            throughput(bench, images, args.max_tokens, args.reps, args.warmup, args.jobs_per_slot),
        )
        if hooks.trace:
            hooks.trace.close()
            hooks.trace = None
        if not args.only_throughput:
            print("image preprocessing ...", flush=True)
            keep("preprocessing", preprocessing(bench, args.e2e_reps))
            keep("stream_gaps", stream_gaps(bench, 3 * args.max_tokens, args.gap_reps))
            print("memory ...", flush=True)
            keep("memory", memory(bench, args.max_tokens))
    finally:
        worker.shutdown()
    results["targets"] = targets(results)
    results["bench_seconds"] = round(time.perf_counter() - t_all, 1)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    partial.unlink(missing_ok=True)
    wrote = [stem.with_suffix(".json")]
    if "preprocessing" in results:  # the plot's third panel; --only-throughput has none
        plot(results, stem.with_suffix(".png"))
        wrote.append(stem.with_suffix(".png"))
    print(json.dumps(results["targets"], indent=2))
    print(f"wrote {', '.join(map(str, wrote))} in {results['bench_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
