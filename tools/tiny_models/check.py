"""Run each built tiny model through the real vLLM CPU engine, one engine at a time.

A checkpoint that transformers loads can still fail in vLLM (an unsupported head size, a
processor setting vLLM reads differently, placeholder tokens it cannot find), and the worker
only ever meets models through vLLM. So for every family this starts ``AsyncLLM``, sends a
two-image chat prompt (and a video for video families), and compares the prompt length vLLM
reports with the one transformers' own processor produces for the same text and images: equal
counts mean vLLM expanded the placeholders exactly as the model's processor does.

Usage::

    python -m tools.tiny_models.check DIR_ROOT [--only NAME ...]

Engines are started strictly one after another (the CPU machines have two cores) and each is
shut down before the next starts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# vLLM reads these at import time; tests pin the same values (see the Makefile's CPU_ENV).
_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

IMAGE_SIZES: tuple[tuple[int, int], ...] = ((640, 480), (300, 900))  # (width, height)
VIDEO_SHAPE = (8, 96, 128, 3)  # frames, height, width, channels
VIDEO_FPS = 2.0
#: Families whose vLLM processor requires (frames, metadata) video items.
VIDEO_METADATA_FAMILIES: tuple[str, ...] = ("qwen3-vl", "glm4v")


def _images() -> list[Any]:
    """Two seeded noise images of different aspect ratios, so tiling and resizing both vary."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in IMAGE_SIZES
    ]


def _video() -> tuple[Any, dict[str, Any]]:
    """A seeded clip and the metadata vLLM's Qwen3-VL and GLM-4.1V need to timestamp frames.

    The frames are taken as already sampled (``do_sample_frames`` false), which is how vLLM
    treats frames it did not decode itself; both sides then see the same eight frames.
    """
    import numpy as np

    frames = np.random.default_rng(1).integers(0, 256, VIDEO_SHAPE, dtype=np.uint8)
    n = frames.shape[0]
    metadata = {
        "fps": VIDEO_FPS,
        "duration": n / VIDEO_FPS,
        "total_num_frames": n,
        "frames_indices": list(range(n)),
        "video_backend": "opencv",
        "do_sample_frames": False,
    }
    return frames, metadata


def _hf_count(processor: Any, text: str, **media: Any) -> int:
    return len(processor(text=text, **media)["input_ids"][0])


async def _generate(llm: Any, prompt: dict[str, Any], request_id: str) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(
        max_tokens=8, temperature=0.0, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY
    )
    final = None
    async for out in llm.generate(prompt, params, request_id):
        final = out
    return final


async def check_one(name: str, model_dir: Path, video: bool) -> dict[str, Any]:
    """Start an engine on ``model_dir``, run the requests, shut it down; return what was seen."""
    from transformers import AutoProcessor
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.model_executor.model_loader.utils import get_model_cls
    from vllm.v1.engine.async_llm import AsyncLLM

    result: dict[str, Any] = {"family": name}
    args = AsyncEngineArgs(
        model=str(model_dir),
        dtype="bfloat16",
        max_model_len=4096,
        max_num_seqs=4,
        enforce_eager=True,
        limit_mm_per_prompt={"image": 2, "video": 1 if video else 0},
    )
    start = time.monotonic()
    llm = AsyncLLM.from_engine_args(args)
    try:
        result["start_s"] = round(time.monotonic() - start, 1)
        model_cls = get_model_cls(llm.model_config)
        result["image_placeholder"] = model_cls.get_placeholder_str("image", 0)
        if video:
            result["video_placeholder"] = model_cls.get_placeholder_str("video", 0)

        processor = AutoProcessor.from_pretrained(model_dir)
        images = _images()
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "image"},
                    {"type": "text", "text": "Describe the two images."},
                ],
            }
        ]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        t0 = time.monotonic()
        out = await _generate(
            llm, {"prompt": text, "multi_modal_data": {"image": images}}, f"{name}-image"
        )
        result["image_request_s"] = round(time.monotonic() - t0, 2)
        result["image_vllm_tokens"] = len(out.prompt_token_ids)
        result["image_hf_tokens"] = _hf_count(processor, text, images=images)
        result["image_generated"] = len(out.outputs[0].token_ids)

        if video:
            frames, metadata = _video()
            messages = [
                {
                    "role": "user",
                    "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}],
                }
            ]
            text = processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            # Qwen3-VL's and GLM-4.1V's vLLM processors take (frames, metadata) to compute
            # timestamps; Qwen2-VL's and InternVL's take the bare array. transformers gets the same
            # metadata and no resampling.
            needs_metadata = name in VIDEO_METADATA_FAMILIES
            item = (frames, metadata) if needs_metadata else frames
            t0 = time.monotonic()
            out = await _generate(
                llm, {"prompt": text, "multi_modal_data": {"video": item}}, f"{name}-video"
            )
            result["video_request_s"] = round(time.monotonic() - t0, 2)
            result["video_vllm_tokens"] = len(out.prompt_token_ids)
            hf_media: dict[str, Any] = {"videos": [frames]}
            if needs_metadata:
                # transformers' VideoMetadata has no do_sample_frames field; it is a call option.
                hf_metadata = {k: v for k, v in metadata.items() if k != "do_sample_frames"}
                hf_media |= {"video_metadata": [hf_metadata], "do_sample_frames": False}
            result["video_hf_tokens"] = _hf_count(processor, text, **hf_media)
    finally:
        llm.shutdown()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns 1 if any family failed or token counts differ."""
    parser = argparse.ArgumentParser(prog="python -m tools.tiny_models.check")
    parser.add_argument("root", type=Path, help="directory holding the tiny-<name> models")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="families to check")
    args = parser.parse_args(argv)
    for key, value in _ENV.items():
        os.environ.setdefault(key, value)

    from tools.tiny_models import EXTRA_FAMILIES, FAMILIES, VIDEO_FAMILIES

    status = 0
    for name in args.only or FAMILIES:
        if name not in FAMILIES + EXTRA_FAMILIES:
            parser.error(f"unknown family {name!r}")
        model_dir = (args.root / f"tiny-{name}").resolve()
        print(f"=== {name}: starting engine at {time.strftime('%H:%M:%S')}", flush=True)
        try:
            result = asyncio.run(check_one(name, model_dir, name in VIDEO_FAMILIES))
        except Exception as exc:
            print(f"=== {name}: FAILED: {type(exc).__name__}: {exc}", flush=True)
            status = 1
            continue
        mismatch = [
            kind
            for kind in ("image", "video")
            if f"{kind}_vllm_tokens" in result
            and result[f"{kind}_vllm_tokens"] != result[f"{kind}_hf_tokens"]
        ]
        if mismatch:
            status = 1
        print(f"=== {name}: {result} mismatch={mismatch}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
