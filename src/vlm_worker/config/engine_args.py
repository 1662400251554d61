"""vLLM engine arguments from the environment, discovered from ``AsyncEngineArgs`` itself.

Every dataclass field of the pinned vLLM's ``AsyncEngineArgs`` can be set by its
UPPER_SNAKE name (``GPU_MEMORY_UTILIZATION``, ``LIMIT_MM_PER_PROMPT``, ...). Nothing is
kept by hand, so a vLLM upgrade brings its new flags along and a removed flag stops being
accepted instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from functools import cache
from typing import Any

from vlm_worker.config.env_values import convert, type_label
from vlm_worker.config.settings import WorkerSettings, setting_names
from vlm_worker.contract.errors import ConfigError

#: Engine fields set through the worker's own, more explicit, names.
RENAMED = {"model": "MODEL_NAME", "revision": "MODEL_REVISION", "tokenizer": "TOKENIZER_NAME"}

#: Engine fields whose variable is also a worker setting; the worker's meaning wins (the
#: engine field cannot be set from the environment), for the reason given.
SHARED_NAMES = {
    "LOG_LEVEL": "the worker's own log level; vLLM's stays VLLM_LOGGING_LEVEL (vLLM 0.31 "
    "added a log_level engine argument under the same name)",
}

#: Read by huggingface_hub itself; passing it through engine args would only add a place
#: where a secret could be logged.
NOT_FROM_ENV = frozenset({"hf_token"})

#: Defaults for a single-GPU serverless worker where vLLM's own defaults fit a long-lived
#: server less well. Each can be overridden by its environment variable.
DEFAULT_MAX_MODEL_LEN = 32768


@dataclasses.dataclass(frozen=True)
class EngineField:
    name: str
    env: str
    annotation: Any
    default: Any

    @property
    def label(self) -> str:
        return type_label(self.annotation)


@cache
def engine_fields() -> tuple[EngineField, ...]:
    """All settable ``AsyncEngineArgs`` fields (imports vLLM, so it is cached)."""
    import sys

    from vllm import AsyncEngineArgs

    result = []
    for f in dataclasses.fields(AsyncEngineArgs):
        if not f.init or f.name.startswith("_") or f.name in NOT_FROM_ENV:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        env = RENAMED.get(f.name, f.name.upper())
        result.append(
            EngineField(f.name, env, _resolve(f, sys.modules[AsyncEngineArgs.__module__]), default)
        )
    return tuple(result)


def _resolve(f: dataclasses.Field[Any], module: Any) -> Any:
    """One field's type hint; a hint naming a type-checking-only import falls back to JSON."""
    if not isinstance(f.type, str):
        return f.type
    try:
        return typing._eval_type(typing.ForwardRef(f.type), vars(module), None)  # type: ignore[attr-defined]
    except Exception:
        return Any


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """``AsyncEngineArgs`` keyword arguments, and which of them the user set explicitly."""

    kwargs: dict[str, Any]
    explicit: frozenset[str]


def build_engine_kwargs(
    env: Mapping[str, str],
    settings: WorkerSettings,
    fields: tuple[EngineField, ...] | None = None,
) -> EngineSpec:
    """Keyword arguments for ``AsyncEngineArgs``: the worker's defaults, then the environment.

    ``fields`` is injectable so the conversion rules test without vLLM installed.
    """
    fields = engine_fields() if fields is None else fields
    worker_names = set(setting_names())
    kwargs: dict[str, Any] = {
        "model": settings.resolved_model,
        "limit_mm_per_prompt": {
            "image": settings.max_images_per_job,
            "video": settings.max_videos_per_job,
        },
    }
    problems: list[str] = []
    explicit: set[str] = set()
    for f in fields:
        if f.env in worker_names and f.env not in RENAMED.values():
            continue  # a worker setting of the same name wins; see test_no_name_clash
        raw = env.get(f.env)
        if raw is None or raw.strip() == "":
            continue
        if f.name in RENAMED:
            kwargs[f.name] = raw
            explicit.add(f.name)
            continue
        try:
            kwargs[f.name] = convert(f.env, raw, f.annotation)
        except ConfigError as exc:
            problems.append(f"{exc.message} (expected {f.label})")
            continue
        explicit.add(f.name)
    if problems:
        raise ConfigError("invalid engine arguments: " + "; ".join(problems))
    # The worker's resize bounds are the processor's: IMAGE_* win over MM_PROCESSOR_KWARGS,
    # and model_info reads the final values back from here, so both sides always agree.
    mm_kwargs = dict(kwargs.get("mm_processor_kwargs") or {})
    if settings.image_min_pixels is not None:
        mm_kwargs["min_pixels"] = settings.image_min_pixels
    if settings.image_max_pixels is not None:
        mm_kwargs["max_pixels"] = settings.image_max_pixels
    if mm_kwargs:
        kwargs["mm_processor_kwargs"] = mm_kwargs
    if settings.tokenizer_name and "tokenizer" not in explicit:
        kwargs["tokenizer"] = settings.tokenizer_name
    return EngineSpec(kwargs, frozenset(explicit))


def default_max_model_len(model_max: int | None) -> int | None:
    """Cap the context at DEFAULT_MAX_MODEL_LEN: a 128k window rarely fits one GPU's KV cache."""
    if model_max is None:
        return DEFAULT_MAX_MODEL_LEN
    return min(model_max, DEFAULT_MAX_MODEL_LEN)
