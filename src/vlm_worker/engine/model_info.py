"""Facts about the served model, read once at start from its processor and vLLM's config."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from vlm_worker.adapters.vllm import (
    encoder_cache_size,
    image_placeholder,
    video_loader_for,
    video_placeholder,
)
from vlm_worker.config.settings import WorkerSettings
from vlm_worker.contract.errors import ConfigError
from vlm_worker.engine.protocol import ModelInfo
from vlm_worker.media.families import ImageHandling, image_handling
from vlm_worker.media.geometry import ImageGeometry
from vlm_worker.media.video import VideoLimits
from vlm_worker.prompt.chat import special_token_pattern

log = logging.getLogger("vlm_worker.model")


def load_processor(model: str, revision: str | None, trust_remote_code: bool) -> Any:
    """The same processor class vLLM uses (the torchvision "fast" one)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(
        model, revision=revision, trust_remote_code=trust_remote_code, use_fast=True
    )


def geometry_from(
    image_processor: Any, mm_processor_kwargs: dict[str, Any] | None = None
) -> ImageGeometry:
    """The processor's resize rule as vLLM will apply it: its own size, then the
    ``min_pixels``/``max_pixels`` vLLM passes it (from MM_PROCESSOR_KWARGS / IMAGE_*)."""
    size = getattr(image_processor, "size", None) or {}
    get = size.get if isinstance(size, dict) else lambda k, d=None: getattr(size, k, d)
    min_pixels = get("shortest_edge") or getattr(image_processor, "min_pixels", None) or 56 * 56
    max_pixels = (
        get("longest_edge") or getattr(image_processor, "max_pixels", None) or 28 * 28 * 1280
    )
    overrides = mm_processor_kwargs or {}
    return ImageGeometry(
        patch_size=int(getattr(image_processor, "patch_size", 14)),
        merge_size=int(getattr(image_processor, "merge_size", 2)),
        min_pixels=int(overrides.get("min_pixels") or min_pixels),
        max_pixels=int(overrides.get("max_pixels") or max_pixels),
    )


def model_max_len(model: str, revision: str | None, trust_remote_code: bool) -> int | None:
    """The model's own context length, to cap the worker's default MAX_MODEL_LEN."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            model, revision=revision, trust_remote_code=trust_remote_code
        )
    except Exception as exc:  # vLLM will report the real problem when it loads the model
        log.debug("could not read the model config for max_model_len: %s", exc)
        return None
    text = getattr(config, "text_config", None) or config
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if value else None


def text_encoder(tokenizer: Any, probe: str) -> Callable[[str], list[int]] | None:
    """Prompt text -> token ids through a Rust tokenizer of our own, or None if unusable.

    Why not ``tokenizer.encode``: vLLM makes its tokenizer thread-safe with a pool that
    deep-copies the whole tokenizer (vocabulary dicts included) whenever more threads
    use it at once than it has copies, holding the GIL for each copy: a worker's first
    bursts stalled every stream and image hand-off for the copies' time (measured on
    the H100, ``docs/decisions/0005-token-id-prompts.md``). A private
    ``tokenizers.Tokenizer`` is never reconfigured (transformers sets truncation and
    padding on its backend per call; we never call transformers on this one), so any
    number of threads can encode with it, and it skips transformers' per-call Python.

    ``probe`` (a rendered prompt, special tokens and all) must come out the same both
    ways; a tokenizer whose transformers class adds its own processing falls back.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    own = Tokenizer.from_str(backend.to_str())
    own.no_truncation()
    own.no_padding()

    def encode(text: str) -> list[int]:
        # ``encode_batch`` runs without the GIL (``encode`` holds it throughout: 0.7 s of
        # every stream stalled for a million characters); only building the list takes it.
        return own.encode_batch([text], add_special_tokens=False)[0].ids

    expected = list(tokenizer.encode(probe, add_special_tokens=False))
    if encode(probe) != expected:
        log.warning(
            "the tokenizer's backend encodes prompts differently from its transformers "
            "class; prompts are tokenized through vLLM's tokenizer pool instead"
        )
        return None
    return encode


def _probe_prompt(templater: Any, placeholder: str) -> str:
    """A rendered chat prompt with an image and non-ASCII text, for ``text_encoder``."""
    text = "Click the \u201cSave\u201d button \u2014 \u4fdd\u5b58 \u2713 \U0001f642  (x=12, y=-3.5)"
    try:
        return templater.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
            tokenize=False,
            add_generation_prompt=True,
        )
    except Exception:  # a template that wants another message shape: the raw pieces
        return f"{placeholder}\n{text}\n"


def build_model_info(
    llm: Any, settings: WorkerSettings, engine_kwargs: dict[str, Any], processor: Any = None
) -> ModelInfo:
    model_config = llm.model_config
    trust = bool(engine_kwargs.get("trust_remote_code", False))
    if processor is None:
        processor = load_processor(engine_kwargs["model"], engine_kwargs.get("revision"), trust)
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        raise RuntimeError(f"{engine_kwargs['model']} has no image processor; is it a VLM?")
    tokenizer = (
        llm.tokenizer if getattr(llm, "tokenizer", None) is not None else processor.tokenizer
    )
    chat_template = settings.chat_template_text()
    # Templates render in our prompt threads: the processor's own tokenizer, not vLLM's
    # pooled one (see ``text_encoder``), when the processor has no template of its own.
    templater = (
        processor
        if getattr(processor, "chat_template", None) or chat_template
        else getattr(processor, "tokenizer", None) or tokenizer
    )
    architecture = served_architecture(model_config)
    handling = image_handling(
        architecture,
        image_processor,
        lambda: geometry_from(image_processor, engine_kwargs.get("mm_processor_kwargs")),
    )
    check_image_bounds(handling, settings)
    log.info("image handling", extra=handling.describe())
    placeholder = image_placeholder(model_config)
    image_token = getattr(processor, "image_token", None) or placeholder
    video = video_setup(model_config, processor, settings, architecture)
    served = engine_kwargs.get("served_model_name")
    name = (served[0] if isinstance(served, list) else served) or settings.model_label
    return ModelInfo(
        name=name,
        max_model_len=int(model_config.max_model_len),
        geometry=handling.geometry,
        image_processor=image_processor,
        templater=templater,
        tokenizer=tokenizer,
        placeholder=placeholder,
        image_token=image_token,
        default_sampling=dict(model_config.get_diff_sampling_param() or {}),
        max_image_tokens=encoder_cache_size(llm),
        encoder=text_encoder(tokenizer, _probe_prompt(templater, placeholder)),
        architecture=architecture,
        video_placeholder=video[0],
        video_token=video[1],
        video_limits=video[2],
        special_tokens=special_token_pattern(special_tokens(tokenizer)),
    )


def special_tokens(tokenizer: Any) -> list[str]:
    """The tokenizer's special tokens: bos, eos and the rest it names, and every added
    token marked special (image and turn markers)."""
    named = list(getattr(tokenizer, "all_special_tokens", None) or [])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return named + [t.content for t in added.values() if getattr(t, "special", False)]


def video_setup(
    model_config: Any, processor: Any, settings: WorkerSettings, architecture: str
) -> tuple[str | None, str | None, VideoLimits | None]:
    """``(placeholder, token, limits)`` for a model that takes video, else Nones.

    Sampling follows the model's video processor (its ``fps`` and ``max_frames``) unless
    VIDEO_FPS / VIDEO_MAX_FRAMES say otherwise, through the loader ``vllm serve`` would
    pick for that processor. MAX_VIDEOS_PER_JOB above 0 for a model without video is a
    configuration error, not a surprise at the first video job.
    """
    placeholder = video_placeholder(model_config)
    if placeholder is None:
        if settings.max_videos_per_job > 0:
            raise ConfigError(
                f"MAX_VIDEOS_PER_JOB={settings.max_videos_per_job}, but {architecture} "
                "takes no video: set MAX_VIDEOS_PER_JOB=0"
            )
        return None, None, None
    video_processor = getattr(processor, "video_processor", None)
    token = getattr(processor, "video_token", None) or placeholder
    fps = settings.video_fps or float(getattr(video_processor, "fps", None) or 2.0)
    max_frames = settings.video_max_frames or int(
        getattr(video_processor, "max_frames", None) or 768
    )
    limits = VideoLimits(
        max_bytes=settings.max_video_bytes,
        max_frames=max_frames,
        fps=fps,
        max_duration_s=settings.max_video_seconds,
        max_pixels=settings.max_video_decoded_pixels,
        loader=video_loader_for(video_processor),
    )
    return placeholder, token, limits


def served_architecture(model_config: Any) -> str:
    """The architecture vLLM resolved for the model (its model class's name)."""
    name = getattr(model_config, "architecture", None)
    if isinstance(name, str) and name:
        return name
    names = getattr(getattr(model_config, "hf_config", None), "architectures", None) or [""]
    return str(names[0])


def check_image_bounds(handling: ImageHandling, settings: WorkerSettings) -> None:
    """IMAGE_MIN_PIXELS / IMAGE_MAX_PIXELS are ``smart_resize`` bounds: a model whose
    processor resizes otherwise would ignore them, or fail on every image."""
    if handling.pre_resize:
        return
    for name, value in (
        ("IMAGE_MIN_PIXELS", settings.image_min_pixels),
        ("IMAGE_MAX_PIXELS", settings.image_max_pixels),
    ):
        if value is not None:
            raise ConfigError(
                f"{name} applies to Qwen2-VL-family models only; {handling.architecture} "
                f"resizes with {handling.processor_class}'s own rule: unset {name}"
            )
