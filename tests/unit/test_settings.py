"""Settings and engine arguments from the environment: conversion, defaults, errors."""

from __future__ import annotations

from typing import Literal

import pytest

from vlm_worker.config.engine_args import (
    DEFAULT_MAX_MODEL_LEN,
    EngineField,
    build_engine_kwargs,
    default_max_model_len,
    engine_fields,
)
from vlm_worker.config.settings import TINY_MODEL_DIR, load_worker_settings, setting_names
from vlm_worker.contract.errors import ConfigError

FIELDS = (
    EngineField("model", "MODEL_NAME", str, None),
    EngineField("revision", "MODEL_REVISION", str | None, None),
    EngineField("max_model_len", "MAX_MODEL_LEN", int | None, None),
    EngineField("gpu_memory_utilization", "GPU_MEMORY_UTILIZATION", float, 0.92),
    EngineField("enforce_eager", "ENFORCE_EAGER", bool, False),
    EngineField("dtype", "DTYPE", Literal["auto", "bfloat16", "float16"], "auto"),
    EngineField("limit_mm_per_prompt", "LIMIT_MM_PER_PROMPT", dict[str, int], None),
    EngineField("served_model_name", "SERVED_MODEL_NAME", str | list[str] | None, None),
)


def test_defaults_point_at_the_tiny_model():
    settings = load_worker_settings({})
    assert settings.uses_tiny_model and settings.resolved_model == str(TINY_MODEL_DIR)
    assert settings.max_images_per_job == 4 and settings.warmup is True


def test_values_are_converted_to_their_types():
    s = load_worker_settings(
        {
            "MAX_CONCURRENCY": "32",
            "WARMUP": "off",
            "IMAGE_FETCH_TIMEOUT": "2.5",
            "MODEL_NAME": "Qwen/Qwen2.5-VL-7B-Instruct",
            "LOG_FORMAT": "JSON",
        }
    )
    assert (s.max_concurrency, s.warmup, s.image_fetch_timeout) == (32, False, 2.5)
    assert s.resolved_model == "Qwen/Qwen2.5-VL-7B-Instruct" and s.log_format == "json"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"MAX_CONCURRENCY": "many"}, "MAX_CONCURRENCY='many' is not an integer"),
        ({"MAX_CONCURRENCY": "0"}, "MAX_CONCURRENCY='0' is below the minimum 1"),
        ({"WARMUP": "maybe"}, "WARMUP='maybe' is not a boolean"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT='xml' is not accepted; choose one of text, json"),
        (
            {"IMAGE_MIN_PIXELS": "9000", "IMAGE_MAX_PIXELS": "100"},
            "IMAGE_MIN_PIXELS=9000 is larger",
        ),
        (
            {"DEFAULT_MIN_BATCH_SIZE": "60"},
            "DEFAULT_MIN_BATCH_SIZE=60 is larger than DEFAULT_BATCH",
        ),
    ],
)
def test_bad_values_name_the_variable_and_value(env, expected):
    with pytest.raises(ConfigError) as info:
        load_worker_settings(env)
    assert expected in info.value.message


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as info:
        load_worker_settings({"MAX_CONCURRENCY": "x", "WARMUP": "y"})
    assert "MAX_CONCURRENCY" in info.value.message and "WARMUP" in info.value.message


def test_engine_kwargs_conversion_and_worker_defaults():
    settings = load_worker_settings({"MAX_IMAGES_PER_JOB": "2", "IMAGE_MAX_PIXELS": "500000"})
    spec = build_engine_kwargs(
        {
            "MAX_MODEL_LEN": "8_192",
            "ENFORCE_EAGER": "1",
            "DTYPE": "BFloat16",
            "GPU_MEMORY_UTILIZATION": "0.8",
            "SERVED_MODEL_NAME": "a,b",
            "MODEL_REVISION": "main",
        },
        settings,
        FIELDS,
    )
    kw = spec.kwargs
    assert kw["max_model_len"] == 8192 and kw["enforce_eager"] is True
    assert kw["dtype"] == "bfloat16" and kw["gpu_memory_utilization"] == 0.8
    assert kw["served_model_name"] == ["a", "b"] and kw["revision"] == "main"
    assert kw["limit_mm_per_prompt"] == {"image": 2, "video": 0}
    # the processor inside vLLM must agree with the worker's resize bounds
    assert kw["mm_processor_kwargs"] == {"max_pixels": 500000}
    assert "max_model_len" in spec.explicit and "limit_mm_per_prompt" not in spec.explicit


@pytest.mark.parametrize(
    "raw", ['{"image": 3, "video": 0}', "image=3,video=0", " image = 3 , video=0 "]
)
def test_dict_fields_accept_json_and_pairs(raw):
    spec = build_engine_kwargs({"LIMIT_MM_PER_PROMPT": raw}, load_worker_settings({}), FIELDS)
    assert spec.kwargs["limit_mm_per_prompt"] == {"image": 3, "video": 0}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"MAX_MODEL_LEN": "long"}, "MAX_MODEL_LEN='long' is not an integer"),
        ({"DTYPE": "int3"}, "DTYPE='int3' is not accepted; choose one of auto, bfloat16, float16"),
        ({"LIMIT_MM_PER_PROMPT": "{bad"}, "LIMIT_MM_PER_PROMPT='{bad' is not valid JSON"),
        ({"LIMIT_MM_PER_PROMPT": "image"}, "neither a JSON object nor key=value pairs"),
    ],
)
def test_bad_engine_values(env, expected):
    with pytest.raises(ConfigError) as info:
        build_engine_kwargs(env, load_worker_settings({}), FIELDS)
    assert expected in info.value.message


def test_max_model_len_default_is_capped_by_the_model():
    assert default_max_model_len(128000) == DEFAULT_MAX_MODEL_LEN
    assert default_max_model_len(4096) == 4096
    assert default_max_model_len(None) == DEFAULT_MAX_MODEL_LEN


def test_every_engine_arg_of_the_pinned_vllm_is_settable():
    """Discovered from AsyncEngineArgs, not a hand-kept list."""
    import dataclasses

    from vllm import AsyncEngineArgs

    names = {f.name for f in engine_fields()}
    expected = {
        f.name
        for f in dataclasses.fields(AsyncEngineArgs)
        if f.init and not f.name.startswith("_") and f.name != "hf_token"
    }
    assert names == expected and len(names) > 150
    envs = {f.env for f in engine_fields()}
    assert {"MODEL_NAME", "MODEL_REVISION", "TOKENIZER_NAME", "LIMIT_MM_PER_PROMPT"} <= envs


def test_no_name_clash_between_worker_settings_and_engine_args():
    """A clash is either a renamed engine field or one listed, with its reason, in
    SHARED_NAMES; a new vLLM field under a worker setting's name fails here until it is."""
    from vlm_worker.config.engine_args import SHARED_NAMES

    engine_envs = {f.env for f in engine_fields()}
    clash = (set(setting_names()) & engine_envs) - {
        "MODEL_NAME",
        "MODEL_REVISION",
        "TOKENIZER_NAME",
    }
    assert clash <= set(SHARED_NAMES)
    assert set(SHARED_NAMES) <= set(setting_names())


def test_a_shared_name_sets_the_worker_setting_only():
    from vlm_worker.config.engine_args import EngineField

    fields = (EngineField("log_level", "LOG_LEVEL", str, None),)
    spec = build_engine_kwargs({"LOG_LEVEL": "DEBUG"}, load_worker_settings({}), fields)
    assert "log_level" not in spec.kwargs


def test_real_engine_fields_convert():
    settings = load_worker_settings({})
    spec = build_engine_kwargs(
        {
            "LIMIT_MM_PER_PROMPT": "image=2",
            "KV_CACHE_DTYPE": "fp8",
            "SEED": "3",
            "COMPILATION_CONFIG": '{"mode": 0}',
            "HF_OVERRIDES": '{"a": 1}',
        },
        settings,
    )
    kw = spec.kwargs
    assert kw["limit_mm_per_prompt"] == {"image": 2} and kw["kv_cache_dtype"] == "fp8"
    assert kw["seed"] == 3 and kw["compilation_config"] == {"mode": 0}
    assert kw["hf_overrides"] == {"a": 1}
