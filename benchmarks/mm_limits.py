"""What raising MAX_IMAGES_PER_JOB costs: engine start, memory, KV cache, per limit.

vLLM sizes its start-up profiling and encoder cache from ``limit_mm_per_prompt``, so the
images a job may carry could cost start time or KV cache. For each limit (1, 4, 8 by
default) this starts the engine with the worker's own engine arguments (the environment,
as the worker reads it, with MAX_IMAGES_PER_JOB set), each in a fresh process, one after
another, and records: seconds to a ready engine, the KV cache in tokens, the encoder cache
in tokens, memory (GPU memory in use on a GPU; the processes' resident memory on the CPU),
and one job's worth of images at that limit through ``generate`` (prompt tokens, seconds).
Prints a table with each limit's ratio to the first, and writes JSON.

    python -m benchmarks.mm_limits [--limits 1,4,8] [--image 640x480] [--out FILE]

Run it where the worker runs (``make`` sets the CPU variables; ``gpu_bench.sh``'s model
settings on the GPU). MODEL_NAME unset: the tiny model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "src")]


def _memory_in_use() -> tuple[str, float]:
    """GPU memory in use on the device (GiB), or this process tree's resident memory."""
    try:
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            return "gpu_gib", round((total - free) / 2**30, 2)
    except Exception:  # no CUDA: measure the processes instead
        pass
    import psutil

    me = psutil.Process()
    rss = sum(p.memory_info().rss for p in [me, *me.children(recursive=True)])
    return "rss_gib", round(rss / 2**30, 2)


def _measure(limit: int, image_size: tuple[int, int], queue: Any) -> None:
    """One engine at ``limit`` images per prompt, in this (fresh) process."""
    from PIL import Image
    from vllm import AsyncEngineArgs, AsyncLLMEngine, SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from vlm_worker.adapters.vllm import encoder_cache_size
    from vlm_worker.config.model_source import resolve_model_source
    from vlm_worker.config.settings import load_worker_settings
    from vlm_worker.serving.worker import engine_spec, served_settings

    env = {**os.environ, "MAX_IMAGES_PER_JOB": str(limit)}
    settings = load_worker_settings(env)
    source = resolve_model_source(env, settings)
    settings = served_settings(settings, source)
    kwargs = engine_spec(env, settings, source).kwargs
    started = time.perf_counter()
    llm = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**kwargs))
    start_s = time.perf_counter() - started
    try:
        cache = llm.vllm_config.cache_config
        kv_tokens = int((cache.num_gpu_blocks or 0) * cache.block_size)
        memory_kind, memory = _memory_in_use()
        width, height = image_size
        images = [Image.new("RGB", (width, height), (17 * i % 256, 90, 160)) for i in range(limit)]
        placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
        prompt = {
            "prompt": "<|im_start|>user\n" + placeholder * limit + "Compare.<|im_end|>\n"
            "<|im_start|>assistant\n",
            "multi_modal_data": {"image": images if limit > 1 else images[0]},
        }
        params = SamplingParams(
            max_tokens=8,
            ignore_eos=True,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

        async def one() -> tuple[int, float]:
            t0 = time.perf_counter()
            final = None
            async for out in llm.generate(prompt, params, f"limit-{limit}"):
                final = out
            return len(final.prompt_token_ids), time.perf_counter() - t0

        prompt_tokens, job_s = asyncio.run(one())
        queue.put(
            {
                "limit": limit,
                "start_s": round(start_s, 1),
                "kv_cache_tokens": kv_tokens,
                "encoder_cache_tokens": encoder_cache_size(llm),
                memory_kind: memory,
                "job_prompt_tokens": prompt_tokens,
                "job_s": round(job_s, 3),
                "model": kwargs["model"],
            }
        )
    finally:
        llm.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limits", default="1,4,8")
    parser.add_argument("--image", default="640x480", help="WxH of each image in the job")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    limits = [int(x) for x in args.limits.split(",")]
    width, height = (int(v) for v in args.image.lower().split("x"))
    ctx = multiprocessing.get_context("spawn")
    rows = []
    for limit in limits:
        queue = ctx.Queue()
        proc = ctx.Process(target=_measure, args=(limit, (width, height), queue))
        proc.start()
        row = queue.get(timeout=1200)
        proc.join(timeout=120)
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    memory_key = "gpu_gib" if "gpu_gib" in base else "rss_gib"
    print(
        f"\n{'limit':>5} {'start s':>8} {'x':>5} {'KV tokens':>10} {'x':>5} "
        f"{memory_key:>8} {'x':>5} {'enc cache':>9} {'job tokens':>10} {'job s':>6}"
    )
    for row in rows:
        print(
            f"{row['limit']:>5} {row['start_s']:>8} {row['start_s'] / base['start_s']:>5.2f} "
            f"{row['kv_cache_tokens']:>10} "
            f"{row['kv_cache_tokens'] / max(1, base['kv_cache_tokens']):>5.2f} "
            f"{row[memory_key]:>8} {row[memory_key] / base[memory_key]:>5.2f} "
            f"{row['encoder_cache_tokens']!s:>9} {row['job_prompt_tokens']:>10} "
            f"{row['job_s']:>6}"
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
