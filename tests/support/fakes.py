"""Test support: a scripted engine behind the worker's ``Engine`` interface, and an image
function that crashes its worker process on demand.

For failures and answers the real engine cannot produce on demand; the job path around it
(schema, images, templates, the tiny model's processor) stays real.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

from vlm_worker.engine.deltas import Delta
from vlm_worker.engine.model_info import special_tokens
from vlm_worker.engine.protocol import EngineRequest, ModelInfo
from vlm_worker.media.geometry import ImageGeometry
from vlm_worker.media.images import PreparedImage, prepare_source
from vlm_worker.prompt.chat import special_token_pattern


class ScriptedEngine:
    """Yields the scripted deltas (raising any exception in the script) for every request."""

    def __init__(self, info: ModelInfo, script: list[Any]) -> None:
        self.info = info
        self.script = script
        self.requests: list[EngineRequest] = []
        self.dead = False

    async def generate(self, request: EngineRequest) -> AsyncIterator[Delta]:
        self.requests.append(request)
        for step in self.script:
            if isinstance(step, BaseException):
                raise step
            await asyncio.sleep(0)
            yield Delta(**vars(step))  # a fresh copy: the job path merges into deltas

    async def num_unfinished(self) -> int:
        return 0


def tok(
    text: str, finished: bool = False, reason: str | None = None, prompt: int | None = None
) -> Delta:
    return Delta(text=text, tokens=1, finished=finished, finish_reason=reason, prompt_tokens=prompt)


def answer_script(answer: str, finish: str = "stop") -> list[Delta]:
    """The answer in two-character deltas, one token each, ending with ``finish``."""
    pieces = [answer[i : i + 2] for i in range(0, len(answer), 2)] or [""]
    last = len(pieces) - 1
    return [
        tok(p, i == last, finish if i == last else None, 10 if i == 0 else None)
        for i, p in enumerate(pieces)
    ]


def scripted_info(
    processor: Any,
    max_model_len: int = 4096,
    geometry: ImageGeometry | None = None,
    pre_resize: bool = True,
    video: Any = None,
    architecture: str | None = None,
) -> ModelInfo:
    """``pre_resize=False``: as if the model were a family whose processor resizes;
    ``video``: the ``VideoLimits`` of a model that takes video (Qwen2.5-VL's tokens)."""
    if pre_resize:
        geometry = geometry or ImageGeometry()  # the tiny model's processor: 3136 .. 1003520 px
    return ModelInfo(
        name="scripted",
        max_model_len=max_model_len,
        geometry=geometry if pre_resize else None,
        architecture=architecture
        or ("Qwen2_5_VLForConditionalGeneration" if pre_resize else "OtherVLM"),
        image_processor=processor.image_processor,
        templater=processor,
        tokenizer=processor.tokenizer,
        placeholder="<|vision_start|><|image_pad|><|vision_end|>",
        image_token="<|image_pad|>",
        video_placeholder=None if video is None else "<|vision_start|><|video_pad|><|vision_end|>",
        video_token=None if video is None else "<|video_pad|>",
        video_limits=video,
        special_tokens=special_token_pattern(special_tokens(processor.tokenizer)),
    )


#: A source that makes ``crash_on_marker`` kill its process, as a decoder crash would.
CRASH_MARKER = "data:image/png;base64,Q1JBU0g="


#: A source that makes ``crash_on_marker`` spin, as a decoder stuck on a bomb would.
HANG_MARKER = "data:image/png;base64,SEFORw=="
#: Sources whose pixels are shipped and then lost (the file removed), or shipped just
#: before the process dies: the worker must cope with both.
LOST_PIXELS_MARKER = "data:image/png;base64,TE9TVA=="
SHIP_AND_DIE_MARKER = "data:image/png;base64,RElF"


def crash_on_marker(source: str | bytes, **kwargs: Any) -> PreparedImage:
    """``prepare_source``, except that one marked source kills the worker process and
    another never finishes (burning CPU, as a scan bomb does)."""
    if source == CRASH_MARKER:
        os._exit(3)
    if source == HANG_MARKER:
        while True:
            pass
    if source in (LOST_PIXELS_MARKER, SHIP_AND_DIE_MARKER):
        import dataclasses

        from PIL import Image

        from vlm_worker.pipeline import pixel_files

        shipped = pixel_files.ship(Image.new("RGB", (64, 32), (1, 2, 3)))
        if source == SHIP_AND_DIE_MARKER:
            os._exit(3)  # the file is written, its result never sent
        os.unlink(shipped.path)  # type: ignore[union-attr]
        ok = prepare_source(SMALL_PNG_URI, **kwargs)
        return dataclasses.replace(ok, image=shipped)  # type: ignore[arg-type]
    return prepare_source(source, **kwargs)


#: A 2x2 PNG, so the fakes need no image helpers of the tests.
SMALL_PNG_URI = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGP8"
    "z8DAwMDAxMDAwMDAAAANHQEDasKb6QAAAABJRU5ErkJggg=="
)
