"""A second engine on a tiny model whose chat template marks images as OpenCUA's does.

OpenCUA / GTA1-family templates wrap each image in ``<|media_begin|>…<|media_end|>``, which
the vLLM Qwen2.5-VL class does not know; the worker rewrites the span to the model's
placeholder. This module starts its own worker on that model (the session ``worker`` is
the plain Qwen one) and runs a grounding job through it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from tools.tiny_model import OPENCUA_IMAGE_SPAN, QWEN_IMAGE_SPAN

from support.jobs import collect, data_uri, image_job, screenshot
from vlm_worker.config.settings import TINY_MODEL_DIR

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def opencua_worker() -> Iterator[Any]:
    from tools.tiny_model import build_tiny_model

    from vlm_worker.serving.worker import start_worker

    path = build_tiny_model(TINY_MODEL_DIR.parent / "tiny-opencua", template="opencua")
    env = {**os.environ, "MODEL_NAME": str(path), "MAX_CONCURRENCY": "2"}
    w = start_worker(env)  # the warm-up job (a chat job with an image) goes through it too
    try:
        yield w
    finally:
        w.shutdown()


def test_the_template_really_marks_images_with_media_spans(opencua_worker):
    info = opencua_worker.engine.info
    raw = info.templater.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert OPENCUA_IMAGE_SPAN in raw and "<|image_pad|>" not in raw
    assert info.placeholder == QWEN_IMAGE_SPAN


async def test_grounding_job_on_the_opencua_template(opencua_worker):
    job = {
        "task": "grounding",
        "instruction": "the search box",
        "image": data_uri(screenshot(1280, 720)),
        "max_tokens": 12,
        "seed": 3,
    }
    chunks = await collect(opencua_worker, job)
    final = chunks[-1]
    assert "error" not in final, final
    g = final["grounding"]
    assert g["raw_text"] == "".join(c["text"] for c in chunks)
    assert g["original_size"] == [1280, 720]
    rw, rh = g["resized_size"]
    prepared = await opencua_worker.runner.prepare(job, "probe")
    prompt = prepared.prompt
    assert prompt.count(QWEN_IMAGE_SPAN) == 1 and "<|media_" not in prompt
    assert f"{QWEN_IMAGE_SPAN}the search box<|im_end|>" in prompt
    # the model's name says OpenCUA: its convention, whose system prompt states no size
    assert g["style"] == "opencua" and g["space"] == "absolute"
    assert prompt.startswith("<|im_start|>system\nYou are a GUI agent. You are given a task")
    text_tokens = opencua_worker.engine.info.count_text_tokens(prompt)
    expected = text_tokens - 1 + (rh // 28) * (rw // 28)
    assert final["usage"]["prompt_tokens"] == expected == prepared.prompt_tokens


async def test_chat_job_on_the_opencua_template(opencua_worker):
    job = image_job(max_tokens=4, stream=False, ignore_eos=True)
    (final,) = await collect(opencua_worker, job)
    assert final["usage"]["completion_tokens"] == 4
    prepared = await opencua_worker.runner.prepare(job, "probe")
    assert prepared.prompt.count(QWEN_IMAGE_SPAN) == 1 and "<|media_" not in prepared.prompt
    assert final["usage"]["prompt_tokens"] == prepared.prompt_tokens
