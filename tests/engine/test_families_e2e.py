"""Every model family the worker serves, end to end through the real CPU engine.

One worker per family (a tiny random-weight checkpoint of the real architecture, built by
``tools.tiny_models``), started in turn, each shut down before the next. For each: a
streamed native job, a ``stream: false`` job with two images, and an OpenAI-route request
parsed with the ``openai`` package's types; video for the families that take it. The
prompt token count the worker reports (vLLM's) must equal what the model's own
transformers processor gives for the same messages and media, the reference recipe:
equal counts mean the worker's prompt and images reached vLLM as the model expects them.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from openai.types.chat import ChatCompletion
from PIL import Image
from tools.tiny_models import ARCHITECTURES, FAMILIES, VIDEO_FAMILIES, build

from support.jobs import collect, data_uri
from support.video import clip
from vlm_worker.config.settings import TINY_MODEL_DIR
from vlm_worker.pipeline.hooks import PipelineHooks

pytestmark = pytest.mark.engine

MODELS = TINY_MODEL_DIR.parent


def _llava_loads() -> bool:
    """vLLM 0.26's LLaVA module imports a name transformers 5.17 no longer has (see
    ``test_llava_cannot_be_served_by_this_vllm``); 0.32's does not."""
    try:
        import vllm.model_executor.models.llava  # noqa: F401
    except ImportError:
        return False
    return True


LLAVA = _llava_loads()
#: Every family this vLLM can load.
SERVED = tuple(f for f in FAMILIES if f != "llava" or LLAVA)
PRE_RESIZED = {"qwen2-vl", "qwen3-vl"}
#: Video families whose tiny model takes a video job here.
VIDEO = tuple(f for f in VIDEO_FAMILIES if f in SERVED)


class Bare(PipelineHooks):
    """The worker's ``AsyncLLM`` and its loop, to ask vLLM itself (``engine_started``)."""

    llm: Any = None
    loop: asyncio.AbstractEventLoop | None = None

    def engine_started(self, llm: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.llm, self.loop = llm, loop


BARE: dict[str, Bare] = {}


@pytest.fixture(scope="module", params=SERVED)
def family(request: pytest.FixtureRequest) -> Iterator[tuple[str, Any]]:
    from vlm_worker.serving.worker import start_worker

    name = request.param
    path = build(name, MODELS / f"tiny-{name}")
    env = {
        **os.environ,
        "MODEL_NAME": str(path),
        "MAX_CONCURRENCY": "4",
        "MAX_VIDEOS_PER_JOB": "1" if name in VIDEO else "0",
        "PREPROCESS_PROCESSES": "0",
    }
    BARE[name] = Bare()
    worker = start_worker(env, hooks=BARE[name])  # its warm-up runs an image through it too
    try:
        yield name, worker
    finally:
        worker.shutdown()


def photo(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, height // 8), max(1, width // 8), 3), np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.NEAREST)


IMAGES = [photo(640, 480, 1), photo(300, 900, 2)]


def messages(images: list[Image.Image], text: str) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": data_uri(img)}} for img in images
    ]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def reference_prompt_tokens(worker: Any, n_images: int, text: str, **media: Any) -> int:
    """The model's own recipe: its processor's chat template, then its processor on the
    text and media, special tokens as the template wrote them (as ``vllm serve`` does)."""
    processor = worker.engine.info.templater
    kind = "video" if "videos" in media else "image"
    parts = [{"type": kind}] * (1 if kind == "video" else n_images)
    rendered = processor.apply_chat_template(
        [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    out = processor(text=rendered, add_special_tokens=False, **media)
    return len(out["input_ids"][0])


def test_the_family_is_served_as_its_own_architecture(family):
    name, worker = family
    info = worker.engine.info
    assert info.architecture == ARCHITECTURES[name]
    assert (info.geometry is not None) == (name in PRE_RESIZED)
    assert (info.video_limits is not None) == (name in VIDEO)


async def test_streamed_native_job(family):
    name, worker = family
    job = {"messages": messages(IMAGES[:1], "Describe it."), "max_tokens": 6, "ignore_eos": True}
    chunks = await collect(worker, job, f"{name}-stream")
    final = chunks[-1]
    assert "error" not in final, final
    assert len(chunks) >= 2 and all("text" in c for c in chunks)  # tokens as they come
    assert final["usage"]["completion_tokens"] == 6
    expected = reference_prompt_tokens(worker, 1, "Describe it.", images=IMAGES[:1])
    assert final["usage"]["prompt_tokens"] == expected
    (image,) = final["images"]
    assert image["original_size"] == [640, 480]
    if name in PRE_RESIZED:
        w, h = image["resized_size"]
        factor = worker.engine.info.geometry.factor
        assert w % factor == 0 and h % factor == 0
    else:
        assert image["resized_size"] is None  # the family's processor resizes


async def test_whole_answer_with_two_images_in_order(family):
    name, worker = family
    text = "Compare the two images."
    job = {"messages": messages(IMAGES, text), "max_tokens": 4, "stream": False}
    (final,) = await collect(worker, job, f"{name}-two")
    assert "error" not in final, final
    assert final["text"] is not None and final["usage"]["completion_tokens"] <= 4
    assert [i["original_size"] for i in final["images"]] == [[640, 480], [300, 900]]
    expected = reference_prompt_tokens(worker, 2, text, images=IMAGES)
    assert final["usage"]["prompt_tokens"] == expected
    # and vLLM's own processor, given the chat text and the original images, as vllm serve
    assert final["usage"]["prompt_tokens"] == await vllm_prompt_tokens(name, worker, text)


async def vllm_prompt_tokens(name: str, worker: Any, text: str) -> int:
    from vllm import SamplingParams

    bare = BARE[name]
    rendered = worker.engine.info.templater.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}] * 2 + [{"type": "text", "text": text}]}],
        add_generation_prompt=True,
        tokenize=False,
    )

    async def ask() -> int:
        final = None
        async for out in bare.llm.generate(
            {"prompt": rendered, "multi_modal_data": {"image": IMAGES}},
            SamplingParams(max_tokens=1),
            f"{name}-bare",
            tokenization_kwargs={"add_special_tokens": False},  # the template wrote them
        ):
            final = out
        return len(final.prompt_token_ids)

    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(ask(), bare.loop))


async def test_openai_route_request(family):
    name, worker = family
    text = "What is in the image?"
    body = {
        "model": worker.runner.settings.openai_model_id,
        "messages": messages(IMAGES[1:], text),
        "max_tokens": 5,
        "ignore_eos": True,
    }
    (out,) = await collect(
        worker, {"openai_route": "/v1/chat/completions", "openai_input": body}, f"{name}-oai"
    )
    completion = ChatCompletion.model_validate(out)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 5
    assert completion.usage.prompt_tokens == reference_prompt_tokens(
        worker, 1, text, images=IMAGES[1:]
    )


async def test_video_job(family):
    name, worker = family
    if name not in VIDEO:
        pytest.skip(f"{name} takes no video")
    from transformers.video_utils import VideoMetadata

    from vlm_worker.adapters.vllm import load_video

    data = clip(n=20, fps=10.0)
    uri = "data:video/mp4;base64," + __import__("base64").b64encode(data).decode()
    text = "What happens?"
    job = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": uri}},
                    {"type": "text", "text": text},
                ],
            }
        ],
        "max_tokens": 4,
        "stream": False,
    }
    (final,) = await collect(worker, job, f"{name}-video")
    assert "error" not in final, final
    (video,) = final["videos"]
    limits = worker.engine.info.video_limits
    frames, metadata = load_video(limits.loader, data, max_frames=limits.max_frames, fps=limits.fps)
    assert video["frames"] == len(frames) and video["original_size"] == [128, 96]
    if limits.loader == "qwen2_vl":  # 2 s at 2 fps, and at least 4 frames: 4
        assert len(frames) == 4
    hf_metadata = VideoMetadata(
        total_num_frames=metadata["total_num_frames"],
        fps=metadata["fps"],
        duration=metadata["duration"],
        frames_indices=metadata["frames_indices"],
    )
    expected = reference_prompt_tokens(
        worker,
        0,
        text,
        videos=[frames],
        video_metadata=[hf_metadata],
        do_sample_frames=False,
    )
    assert final["usage"]["prompt_tokens"] == expected


async def test_the_wrong_media_for_the_family_is_refused_by_name(family):
    name, worker = family
    uri = "data:video/mp4;base64," + __import__("base64").b64encode(clip(n=4)).decode()
    job = {
        "messages": [
            {"role": "user", "content": [{"type": "video_url", "video_url": {"url": uri}}]}
        ],
        "max_tokens": 2,
    }
    if name in VIDEO:  # two videos: above MAX_VIDEOS_PER_JOB=1
        job["messages"][0]["content"] *= 2
    (chunk,) = await collect(worker, job, f"{name}-refused")
    error = chunk["error"]
    assert error["type"] == "invalid_input"
    if name in VIDEO:
        assert error["field"] == "messages[0].content[1].video_url.url"
        assert "MAX_VIDEOS_PER_JOB is 1" in error["message"]
    else:
        assert error["field"] == "messages[0].content[0].video_url.url"
        assert "takes no video" in error["message"]
    if name not in PRE_RESIZED:
        grounding = {"task": "grounding", "instruction": "the button", "image": data_uri()}
        (chunk,) = await collect(worker, grounding, f"{name}-grounding")
        assert chunk["error"]["field"] == "task"


def test_llava_cannot_be_served_by_this_vllm():
    """Where vLLM's LLaVA module cannot import, the engine refuses the model at start."""
    from vlm_worker.serving.worker import start_worker

    if LLAVA:
        pytest.skip("this vLLM loads LLaVA: it runs with the other families above")

    path = build("llava", MODELS / "tiny-llava")
    with pytest.raises(Exception, match=r"PixtralRotaryEmbedding|failed to be inspected"):
        start_worker({**os.environ, "MODEL_NAME": str(path), "WARMUP": "false"})


GROUNDING_STYLE = {"qwen2-vl": "gta1", "qwen3-vl": "qwen3-vl"}


async def test_grounding_in_the_familys_convention(family):
    """Several targets, constrained, in the style the worker chose for the family."""
    name, worker = family
    if name not in PRE_RESIZED:
        pytest.skip(f"{name}: grounding needs a Qwen-family resize")
    style = worker.runner.grounding_style
    assert style.name == GROUNDING_STYLE[name]
    job = {
        "task": "grounding",
        "instructions": ["the title bar", "the OK button"],
        "image": data_uri(IMAGES[0]),
        "constrain": True,
        "max_tokens": 32,
    }
    (final,) = await collect(worker, job, f"{name}-ground")
    assert "error" not in final, final
    for g, instruction in zip(final["groundings"], job["instructions"], strict=True):
        assert g["instruction"] == instruction and g["style"] == style.name
        assert g["point"] is not None, g["raw_text"]  # constrained: always a point
        x, y = g["point"]
        assert 0 <= x <= 639 and 0 <= y <= 479
    body = {
        "model": worker.runner.settings.openai_model_id,
        "messages": messages(IMAGES[:1], "the OK button"),
        "max_tokens": 32,
        "grounding": {"constrain": True},
    }
    (out,) = await collect(
        worker, {"openai_route": "/v1/chat/completions", "openai_input": body}, f"{name}-og"
    )
    completion = ChatCompletion.model_validate(out)
    g = completion.model_extra["grounding"]
    assert g["space"] == style.space and g["point"] is not None
    assert g["raw_text"] == completion.choices[0].message.content
