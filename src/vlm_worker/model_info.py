"""Facts about the served model, read once at start from its processor and vLLM's config."""

from __future__ import annotations

import logging
from typing import Any

from .engine import ModelInfo
from .engine_args import DEFAULT_MAX_MODEL_LEN
from .images import ImageGeometry
from .settings import WorkerSettings

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


def build_model_info(
    llm: Any, settings: WorkerSettings, engine_kwargs: dict[str, Any], processor: Any = None
) -> ModelInfo:
    from vllm.model_executor.model_loader.utils import get_model_cls

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
    templater = (
        processor if getattr(processor, "chat_template", None) or chat_template else tokenizer
    )
    placeholder = get_model_cls(model_config).get_placeholder_str("image", 0)
    image_token = getattr(processor, "image_token", None) or placeholder
    served = engine_kwargs.get("served_model_name")
    name = (served[0] if isinstance(served, list) else served) or settings.model_label
    return ModelInfo(
        name=name,
        max_model_len=int(model_config.max_model_len),
        geometry=geometry_from(image_processor, engine_kwargs.get("mm_processor_kwargs")),
        image_processor=image_processor,
        templater=templater,
        tokenizer=tokenizer,
        placeholder=placeholder,
        image_token=image_token,
        default_sampling=dict(model_config.get_diff_sampling_param() or {}),
        max_image_tokens=encoder_cache_tokens(llm),
    )


def encoder_cache_tokens(llm: Any) -> int | None:
    """vLLM's encoder cache size in tokens: it refuses any image with more tokens.

    vLLM sizes it at start from the largest image its *engine-level* processor bounds allow
    (or MAX_NUM_BATCHED_TOKENS if larger); grounding jobs, which bring their own bounds,
    are capped by it. None when this vLLM does not expose it (then nothing is capped).
    """
    size = getattr(getattr(llm, "input_processor", None), "mm_encoder_cache_size", None)
    return int(size) if isinstance(size, int) and size > 0 else None


__all__ = ["DEFAULT_MAX_MODEL_LEN", "build_model_info", "geometry_from", "model_max_len"]
