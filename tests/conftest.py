"""Shared fixtures: one real vLLM engine (CPU, tiny model) for the whole test session."""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image, ImageDraw

from vlm_worker.settings import TINY_MODEL_DIR

#: What `make test` exports; repeated here so `pytest` alone runs the same engine.
CPU_ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "ENFORCE_EAGER": "true",
    "DTYPE": "bfloat16",
    "MAX_MODEL_LEN": "4096",
    "MAX_NUM_SEQS": "8",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
for _k, _v in CPU_ENGINE_ENV.items():
    os.environ.setdefault(_k, _v)


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
    from vlm_worker.engine_args import build_engine_kwargs
    from vlm_worker.settings import load_worker_settings

    spec = build_engine_kwargs(env, load_worker_settings(env))
    return spec.kwargs.get("mm_processor_kwargs")


@pytest.fixture(scope="session")
def tiny_model() -> str:
    from vlm_worker.tiny_model import build_tiny_model

    build_tiny_model(TINY_MODEL_DIR)
    return str(TINY_MODEL_DIR)


@pytest.fixture(scope="session")
def processor(tiny_model: str) -> Any:
    from vlm_worker.model_info import load_processor

    return load_processor(tiny_model, None, False)


@pytest.fixture(scope="session")
def worker(tiny_model: str) -> Iterator[Any]:
    """The real worker: settings from the environment, vLLM on the CPU, warm-up included."""
    from vlm_worker.worker import start_worker

    env = {k: v for k, v in os.environ.items() if k != "MODEL_NAME"}
    env["MAX_CONCURRENCY"] = "8"
    env["PREPROCESS_PROCESSES"] = "0"  # threads; test_e2e_engine compares with a process
    w = start_worker(env)
    try:
        yield w
    finally:
        w.shutdown()


async def collect(worker: Any, job_input: Any, job_id: str = "t") -> list[dict]:
    return [c async for c in worker.handler({"id": job_id, "input": job_input})]


def start_api_server(env: dict[str, str], timeout: float = 300) -> tuple[Any, str]:
    """``python handler.py --rp_serve_api`` on a free loopback port, once it answers."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "handler.py",
            "--rp_serve_api",
            "--rp_api_host",
            "127.0.0.1",
            "--rp_api_port",
            str(port),
        ],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"API server exited: {proc.stderr.read()[-3000:]}")
        try:
            urllib.request.urlopen(base + "/docs", timeout=2)
            return proc, base
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("API server did not come up") from None
            time.sleep(1)
