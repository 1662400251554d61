"""The RunPod Hub listing (``.runpod/hub.json``) and its test jobs (``.runpod/tests.json``).

Rendered from the same fields as the console template (``console.console_fields``), so
the Hub's form offers exactly the variables the worker reads, with the same defaults and
choices. What only the Hub needs lives here: the listing text, the GPU pools, a real
model as MODEL_NAME's default (the worker's own default, the tiny test model, would
deploy gibberish) and which inputs show without "advanced".
"""

from __future__ import annotations

from typing import Any

from .console import MINIMUM_CUDA_VERSION, ConsoleField

TITLE = "VLM Worker: Qwen2.5-VL on vLLM"
DESCRIPTION = (
    "Vision-language models (Qwen2-VL, Qwen2.5-VL, GTA1, OpenCUA) on vLLM's in-process "
    "engine: chat messages with images in, streamed text out, with usage and timings."
)
HUB_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
TEST_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
#: RunPod GPU pools with 24 GB or more: a 7B model in bf16 is ~16.6 GB of weights.
GPU_POOLS = "ADA_24,ADA_32_PRO,AMPERE_48,ADA_48_PRO,AMPERE_80,ADA_80_PRO"
TEST_GPU = "NVIDIA GeForce RTX 4090"
#: Driver CUDA versions the Hub may place the worker on: the console template's minimum.
CUDA_VERSIONS = (MINIMUM_CUDA_VERSION,)
CONTAINER_DISK_GB = 60
PRESETS = (
    ("Qwen2.5-VL 7B Instruct", {"MODEL_NAME": "Qwen/Qwen2.5-VL-7B-Instruct"}),
    ("Qwen2.5-VL 3B Instruct", {"MODEL_NAME": "Qwen/Qwen2.5-VL-3B-Instruct"}),
)
#: Shown without expanding "advanced".
BASIC = frozenset(
    {
        "MODEL_NAME",
        "MODEL_REVISION",
        "HF_TOKEN",
        "MAX_MODEL_LEN",
        "GPU_MEMORY_UTILIZATION",
        "MAX_CONCURRENCY",
        "MAX_IMAGES_PER_JOB",
        "DEFAULT_MAX_TOKENS",
    }
)
#: The Hub's test jobs run on a small real model, with a context that fits a 24 GB card.
TEST_ENV = {"MODEL_NAME": TEST_MODEL, "MAX_MODEL_LEN": "8192"}
TEXT_JOB: dict[str, Any] = {
    "messages": [{"role": "user", "content": "Name the three primary colours."}],
    "max_tokens": 32,
    "temperature": 0,
    "stream": False,
}
#: Milliseconds; the first job includes a cold start that downloads the test model.
TEST_TIMEOUT_MS = 600_000


def hub_input(f: ConsoleField) -> dict[str, Any]:
    """One env var as a Hub input: string, number, boolean or a string with options."""
    default = HUB_MODEL if f.env == "MODEL_NAME" else f.default
    spec: dict[str, Any] = {
        "name": f.title,
        "type": {"number": "number", "toggle": "boolean"}.get(f.kind, "string"),
        "description": f.description,
    }
    if f.env == "MODEL_NAME":
        spec["type"] = "huggingface"
    if f.kind == "select":
        spec["options"] = [{"label": o or "unset (default)", "value": o} for o in f.options]
    if f.kind == "number":
        spec.update({k: v for k, v in (("min", f.minimum), ("max", f.maximum)) if v is not None})
    if f.kind == "toggle":
        spec.update({"trueValue": "true", "falseValue": "false"})
    if default is not None:
        spec["default"] = default
    spec["advanced"] = f.env not in BASIC
    return {"key": f.env, "input": spec}


def hub_json(fields: list[ConsoleField]) -> dict[str, Any]:
    envs = {f.env for f in fields}
    for _, defaults in PRESETS:
        unknown = set(defaults) - envs
        if unknown:
            raise KeyError(f"preset sets variables the worker does not read: {sorted(unknown)}")
    return {
        "title": TITLE,
        "description": DESCRIPTION,
        "type": "serverless",
        "category": "language",
        "config": {
            "runsOn": "GPU",
            "containerDiskInGb": CONTAINER_DISK_GB,
            "gpuCount": 1,
            "gpuIds": GPU_POOLS,
            "allowedCudaVersions": list(CUDA_VERSIONS),
            "presets": [{"name": n, "defaults": d} for n, d in PRESETS],
            "env": [hub_input(f) for f in fields],
        },
    }


def tests_json(fields: list[ConsoleField], image_job: dict[str, Any]) -> dict[str, Any]:
    """A text-only job and ``image_job`` (test_input.json's, with its embedded image)."""
    unknown = set(TEST_ENV) - {f.env for f in fields}
    if unknown:
        raise KeyError(f"test env sets variables the worker does not read: {sorted(unknown)}")
    return {
        "tests": [
            {"name": "text_only", "input": TEXT_JOB, "timeout": TEST_TIMEOUT_MS},
            {"name": "embedded_image", "input": image_job, "timeout": TEST_TIMEOUT_MS},
        ],
        "config": {
            "gpuTypeId": TEST_GPU,
            "gpuCount": 1,
            "env": [{"key": k, "value": v} for k, v in TEST_ENV.items()],
            "allowedCudaVersions": list(CUDA_VERSIONS),
        },
    }
