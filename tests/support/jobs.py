"""Screenshot-like images, data URIs and job inputs, as clients send them."""

from __future__ import annotations

import base64
import io
from typing import Any

from PIL import Image, ImageDraw


def screenshot(width: int = 320, height: int = 200, seed: int = 0) -> Image.Image:
    """A screenshot-like picture: flat colours, bars and boxes."""
    img = Image.new("RGB", (width, height), (240, 240 - seed % 40, 245))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, width, max(4, height // 12)], fill=(40, 90, 160))
    for i in range(4):
        x0 = (i * width) // 4 + 4
        draw.rectangle(
            [x0, height // 3, x0 + width // 6, height // 3 + height // 8],
            fill=(60 + 40 * i, 160, 80),
            outline=(0, 0, 0),
        )
    return img


def encode(img: Image.Image, fmt: str = "PNG", **save: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def data_uri(img: Image.Image | None = None, fmt: str = "PNG") -> str:
    img = img if img is not None else screenshot()
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(encode(img, fmt)).decode()


def image_job(uri: str | None = None, text: str = "Describe the screen.", **extra: Any) -> dict:
    return {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": uri or data_uri()}},
                    {"type": "text", "text": text},
                ],
            }
        ],
        **extra,
    }


def mm_kwargs(env: dict[str, str]) -> dict[str, Any] | None:
    """The ``mm_processor_kwargs`` the worker hands vLLM for these settings."""
    from vlm_worker.config.engine_args import build_engine_kwargs
    from vlm_worker.config.settings import load_worker_settings

    spec = build_engine_kwargs(env, load_worker_settings(env))
    return spec.kwargs.get("mm_processor_kwargs")


async def collect(worker: Any, job_input: Any, job_id: str = "t") -> list[dict]:
    return [c async for c in worker.handler({"id": job_id, "input": job_input})]
