"""The narrow seam between the job path and the engine.

The job path depends only on ``Engine``: submit a request, iterate ``Delta``s, ask how
many requests are unfinished, notice death. ``VllmEngine`` implements it over vLLM;
tests put a scripted engine behind the same protocol for failures the real engine
cannot produce on demand.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from vlm_worker.engine.deltas import BatchPolicy, Delta
from vlm_worker.media.geometry import ImageGeometry


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt: str
    images: list[Any]
    sampling: dict[str, Any]
    #: How deltas are grouped before they leave the engine's loop (None: every delta).
    batch: BatchPolicy | None = None
    #: Per-request processor bounds (grounding jobs resize with their own; vLLM must agree).
    mm_processor_kwargs: dict[str, Any] | None = None
    #: One id per image naming its pixels (``PreparedImage.content_id``): vLLM uses them
    #: as the items' hashes instead of hashing the pixels on its event loop.
    image_ids: list[str] | None = None
    #: ``prompt`` tokenized (placeholders unexpanded). vLLM then skips tokenizing on its
    #: event loop, and only a token prompt carries ``multi_modal_uuids`` through vLLM
    #: 0.26's input processing (a text prompt's are dropped, and every image hashed).
    prompt_token_ids: list[int] | None = None
    #: Each delta carries its generated token ids (tool-call parsing needs them).
    return_token_ids: bool = False
    #: A LoRA adapter to run the request on: ``(name, id, path)``, as vLLM keys adapters.
    lora: tuple[str, int, str] | None = None
    #: Videos in prompt order, each ``(frames, metadata)`` (``PreparedVideo.item``), and
    #: their content ids (as ``image_ids``).
    videos: list[Any] = field(default_factory=list)
    video_ids: list[str] | None = None


@dataclass(frozen=True)
class ModelInfo:
    """What the job path needs to know about the served model, gathered once at start."""

    name: str
    max_model_len: int
    #: The resize rule the worker reproduces and applies ahead of vLLM; None for a
    #: family whose processor resizes full-size images itself (``media.families``).
    geometry: ImageGeometry | None
    image_processor: Any
    templater: Any  # has apply_chat_template (the processor, or the tokenizer)
    tokenizer: Any
    placeholder: str  # what the vLLM model class expects per image
    image_token: str  # the token inside it that the processor expands
    default_sampling: dict[str, Any] = field(default_factory=dict)
    #: Most tokens one image may have: vLLM refuses larger ones (its encoder cache size).
    #: None when unknown.
    max_image_tokens: int | None = None
    #: text -> ids without vLLM's tokenizer pool (``model_info.text_encoder``); None: the
    #: tokenizer's own ``encode``.
    encoder: Callable[[str], list[int]] | None = None
    #: The served architecture (vLLM's model class name), for errors and logs.
    architecture: str = ""
    #: What vLLM's model class expects per video, and the token in it that the processor
    #: expands; None for a model that takes no video.
    video_placeholder: str | None = None
    video_token: str | None = None
    #: How videos are sampled and capped (``media.video.VideoLimits``); None: no video.
    video_limits: Any = None
    #: The tokenizer's special tokens as one pattern (``prompt.chat.refuse_special_tokens``).
    special_tokens: re.Pattern[str] | None = None

    def text_token_ids(self, text: str) -> list[int]:
        """A rendered chat prompt's ids: the template wrote any special tokens itself."""
        if self.encoder is not None:
            return self.encoder(text)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def count_text_tokens(self, text: str) -> int:
        return len(self.text_token_ids(text))


class Engine(Protocol):
    info: ModelInfo

    def generate(self, request: EngineRequest) -> AsyncIterator[Delta]: ...

    @property
    def dead(self) -> bool: ...
