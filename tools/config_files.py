"""Every file derived from the settings the code reads: README's table and RunPod's forms.

``worker-config.json`` (the console's template form), ``.runpod/hub.json`` and
``.runpod/tests.json`` (the RunPod Hub) are all rendered from one list of fields: every
worker setting (``WorkerSettings``), a curated set of vLLM engine arguments whose types,
options and defaults come from ``engine_args.engine_fields()`` (a ``Literal`` becomes a
select), and ``HF_TOKEN``. The README's settings table is rendered from the settings
alone. ``python -m tools.config_files --write`` (``make config``) rewrites all four;
``--check`` exits 1 when a committed file differs (the test suite runs it), so a setting
cannot be added, renamed or retyped without its documentation and forms following.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from vlm_worker.config.engine_args import DEFAULT_MAX_MODEL_LEN, EngineField, engine_fields
from vlm_worker.config.env_values import type_label
from vlm_worker.config.settings import WorkerSettings, env_name, setting_fields

ROOT = Path(__file__).resolve().parents[1]

#: The image the console template deploys: push the build under this name (README).
IMAGE_REPOSITORY = "vlm-worker"
#: The CUDA version of the vllm/vllm-openai image's torch (2.11.0 is built for CUDA 13.0),
#: i.e. the oldest driver CUDA a host needs. Check after a vLLM upgrade with
#: ``docker run --rm --entrypoint python3 IMAGE -c "import torch; print(torch.version.cuda)"``.
MINIMUM_CUDA_VERSION = "13.0"

Kind = Literal["text", "number", "toggle", "select"]


@dataclass(frozen=True)
class ConsoleField:
    """One environment variable as the console and the Hub show it."""

    env: str
    title: str
    description: str
    category: str
    kind: Kind
    default: str | int | float | bool | None = None
    options: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    #: Who reads it: a worker setting, a vLLM engine argument, or huggingface_hub itself.
    reader: Literal["worker", "engine", "huggingface_hub"] = "worker"


#: The engine arguments worth a form field (any other is still settable by its env name):
#: env name -> (category, title, description). Types, options and defaults come from vLLM.
ENGINE_ARGS: dict[str, tuple[str, str, str]] = {
    "TRUST_REMOTE_CODE": (
        "Model",
        "Trust remote code",
        "Run the model repo's own Python code (needed by some models, e.g. OpenCUA).",
    ),
    "SERVED_MODEL_NAME": (
        "Model",
        "Served model name",
        "The model name jobs report. Unset: MODEL_NAME.",
    ),
    "QUANTIZATION": (
        "Model",
        "Quantization",
        "Weight quantization method (awq, gptq, fp8, ...). Unset: read from the model's config.",
    ),
    "MAX_MODEL_LEN": (
        "Engine",
        "Max model length",
        f"Context length in tokens (prompt, image tokens and output). Unset: the model's, "
        f"capped at {DEFAULT_MAX_MODEL_LEN}.",
    ),
    "GPU_MEMORY_UTILIZATION": (
        "Engine",
        "GPU memory utilization",
        "Fraction of GPU memory vLLM may use for weights, activations and KV cache.",
    ),
    "DTYPE": ("Engine", "Data type", "Weights and activations dtype; auto: the model's."),
    "KV_CACHE_DTYPE": (
        "Engine",
        "KV cache data type",
        "KV cache dtype; fp8 roughly doubles the tokens that fit in memory.",
    ),
    "TENSOR_PARALLEL_SIZE": (
        "Engine",
        "Tensor parallel size",
        "GPUs the model is split across; set it to the endpoint's GPU count.",
    ),
    "MAX_NUM_SEQS": (
        "Engine",
        "Max sequences",
        "Requests the engine batches at once. Unset: vLLM's default for the GPU.",
    ),
    "MAX_NUM_BATCHED_TOKENS": (
        "Engine",
        "Max batched tokens",
        "Tokens per engine step (chunked prefill). Unset: vLLM's default for the GPU.",
    ),
    "ENFORCE_EAGER": (
        "Engine",
        "Enforce eager",
        "Skip CUDA graph capture: faster cold start, slower generation.",
    ),
    "ENABLE_PREFIX_CACHING": (
        "Engine",
        "Prefix caching",
        "Reuse the KV cache of shared prompt prefixes. Unset: vLLM's default.",
    ),
    "ENABLE_CHUNKED_PREFILL": (
        "Engine",
        "Chunked prefill",
        "Split long prompts across engine steps. Unset: vLLM's default.",
    ),
    "SEED": ("Engine", "Seed", "Engine random seed (jobs may set their own seed)."),
    "DISABLE_LOG_STATS": ("Engine", "Disable log stats", "Stop vLLM's periodic stats log lines."),
    "LIMIT_MM_PER_PROMPT": (
        "Images",
        "Media per prompt",
        "Most images/videos per prompt, e.g. image=2,video=0. Unset: "
        "image=MAX_IMAGES_PER_JOB,video=0.",
    ),
    "MM_PROCESSOR_KWARGS": (
        "Images",
        "Processor arguments",
        "JSON or k=v pairs for the model's processor. IMAGE_MIN_PIXELS/IMAGE_MAX_PIXELS "
        "fill min_pixels/max_pixels.",
    ),
    "MM_PROCESSOR_CACHE_GB": (
        "Images",
        "Processor cache (GB)",
        "Memory for caching processed images across requests.",
    ),
}

HF_TOKEN = ConsoleField(
    env="HF_TOKEN",
    title="Hugging Face token",
    description="Access token for gated or private models; read by huggingface_hub, never "
    "logged. Store it as a RunPod secret and enter {{ RUNPOD_SECRET_hf_token }}.",
    category="Model",
    kind="text",
    reader="huggingface_hub",
)

#: Category order in the form; categories not listed follow in order of appearance.
CATEGORY_ORDER = ("Model", "Engine", "Worker", "Generation", "Images", "Streaming")

_ACRONYMS = {"hf": "HF", "url": "URL", "json": "JSON", "openai": "OpenAI", "mm": "MM"}


def kind_of(annotation: Any) -> tuple[Kind, tuple[str, ...]]:
    """The form widget for a type: bool a toggle, numbers a number, a Literal a select.

    An optional bool becomes a select with an empty choice, since a toggle cannot say
    "unset, let vLLM decide".
    """
    args = get_args(annotation)
    union = get_origin(annotation) in (Union, types.UnionType)
    members = [a for a in args if a is not type(None)] if union else [annotation]
    optional = union and type(None) in args
    if len(members) != 1:
        return "text", ()
    member = members[0]
    if member is bool:
        return ("select", ("", "true", "false")) if optional else ("toggle", ())
    if member in (int, float):
        return "number", ()
    if get_origin(member) is Literal:
        choices = tuple(str(c) for c in get_args(member))
        return "select", (("", *choices) if optional else choices)
    return "text", ()


def _title(env: str) -> str:
    words = [_ACRONYMS.get(w, w) for w in env.lower().split("_")]
    return " ".join([words[0][:1].upper() + words[0][1:], *words[1:]])


def _default(value: Any) -> str | int | float | bool | None:
    """A scalar default as is; a factory-made one (a dict, a config object) shows as unset."""
    return value if isinstance(value, (bool, int, float, str)) else None


def worker_fields() -> list[ConsoleField]:
    hints = typing.get_type_hints(WorkerSettings)
    result = []
    for f in setting_fields():
        kind, options = kind_of(hints[f.name])
        result.append(
            ConsoleField(
                env=env_name(f),
                title=_title(env_name(f)),
                description=f.metadata["help"],
                category=f.metadata["category"],
                kind=kind,
                default=_default(f.default),
                options=options,
                minimum=f.metadata.get("minimum"),
                maximum=f.metadata.get("maximum"),
            )
        )
    return result


def engine_console_fields(fields: tuple[EngineField, ...] | None = None) -> list[ConsoleField]:
    """The curated engine arguments; a name vLLM no longer has raises instead of lingering."""
    by_env = {f.env: f for f in (engine_fields() if fields is None else fields)}
    missing = sorted(set(ENGINE_ARGS) - set(by_env))
    if missing:
        raise KeyError(f"vLLM has no engine argument for: {', '.join(missing)}")
    result = []
    for env, (category, title, description) in ENGINE_ARGS.items():
        field = by_env[env]
        kind, options = kind_of(field.annotation)
        result.append(
            ConsoleField(
                env=env,
                title=title,
                description=description,
                category=category,
                kind=kind,
                default=_default(field.default),
                options=options,
                reader="engine",
            )
        )
    return result


def console_fields(engine: tuple[EngineField, ...] | None = None) -> list[ConsoleField]:
    """Every field of the form, in category order, each category in table order."""
    fields = [*worker_fields(), HF_TOKEN, *engine_console_fields(engine)]
    seen = list(dict.fromkeys(f.category for f in fields))
    order = [c for c in CATEGORY_ORDER if c in seen] + [c for c in seen if c not in CATEGORY_ORDER]
    return sorted(fields, key=lambda f: order.index(f.category))


# ---------------------------------------------------------------- versions
def project_versions(root: Path = ROOT) -> tuple[str, str]:
    """(this project's version, the default vLLM release): both from pyproject.toml, whose
    `gpu` extra gives the tested range; its lower bound is the image's default release."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    (spec,) = [r for r in project["optional-dependencies"]["gpu"] if r.startswith("vllm")]
    (low,) = [p.removeprefix(">=") for p in spec.removeprefix("vllm").split(",") if ">=" in p]
    return project["version"], low.strip()


def image_name(root: Path = ROOT) -> str:
    version, vllm = project_versions(root)
    return f"{IMAGE_REPOSITORY}:{version}-vllm{vllm}"


# ---------------------------------------------------------- worker-config.json
def _schema_entry(f: ConsoleField) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "env_var_name": f.env,
        "value": "" if f.default is None else f.default,
        "title": f.title,
        "description": f.description,
        "required": False,
        "type": f.kind,
    }
    if f.kind == "select":
        entry["options"] = [{"value": o, "label": o or "unset (default)"} for o in f.options]
    return entry


def worker_config(fields: list[ConsoleField], root: Path = ROOT) -> dict[str, Any]:
    """RunPod's console format: versions -> image and categories; schema -> one per env var."""
    version, _ = project_versions(root)
    categories: dict[str, list[str]] = {}
    for f in fields:
        categories.setdefault(f.category, []).append(f.env)
    return {
        "versions": {
            version: {
                "imageName": image_name(root),
                "minimumCudaVersion": MINIMUM_CUDA_VERSION,
                "categories": [{"title": t, "settings": s} for t, s in categories.items()],
            }
        },
        "schema": {f.env: _schema_entry(f) for f in fields},
    }


# ------------------------------------------------------------ RunPod Hub
# The RunPod Hub listing (``.runpod/hub.json``) and its test jobs (``.runpod/tests.json``).
#
# Rendered from the same fields as the console template (``console_fields``), so
# the Hub's form offers exactly the variables the worker reads, with the same defaults and
# choices. What only the Hub needs lives here: the listing text, the GPU pools, a real
# model as MODEL_NAME's default (the worker's own default, the tiny test model, would
# deploy gibberish) and which inputs show without "advanced".
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


# ------------------------------------------------------- README's table
START = "<!-- settings:start (generated by `make config`) -->"
END = "<!-- settings:end -->"


def settings_table() -> str:
    hints = typing.get_type_hints(WorkerSettings)
    rows = ["| Variable | Type | Default | What it does |", "| --- | --- | --- | --- |"]
    for f in setting_fields():
        default = "unset" if f.default is None else f"`{f.default}`"
        help_text = f.metadata["help"].replace("|", "\\|")
        rows.append(f"| `{env_name(f)}` | {type_label(hints[f.name])} | {default} | {help_text} |")
    return "\n".join(rows)


def render_into(text: str) -> str:
    head, sep, rest = text.partition(START)
    if not sep:
        raise ValueError("README has no settings table markers")
    _, sep2, tail = rest.partition(END)
    if not sep2:
        raise ValueError("README settings table has no end marker")
    return f"{head}{START}\n{settings_table()}\n{END}{tail}"


# --------------------------------------------------------------------- files
def dump(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def rendered(root: Path = ROOT) -> dict[Path, str]:
    """Every generated file's path and its current content."""
    fields = console_fields()
    test_input = json.loads((root / "test_input.json").read_text(encoding="utf-8"))
    return {
        root / "worker-config.json": dump(worker_config(fields, root)),
        root / ".runpod" / "hub.json": dump(hub_json(fields)),
        root / ".runpod" / "tests.json": dump(tests_json(fields, test_input["input"])),
        root / "README.md": render_into((root / "README.md").read_text(encoding="utf-8")),
    }


def stale(files: dict[Path, str]) -> list[Path]:
    return [p for p, text in files.items() if not p.is_file() or p.read_text("utf-8") != text]


def main(argv: list[str] | None = None, render: Callable[[], dict[Path, str]] = rendered) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the generated files")
    mode.add_argument("--check", action="store_true", help="exit 1 if any is out of date")
    args = parser.parse_args(argv)
    files = render()
    if args.write:
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
        return 0
    if args.check:
        out_of_date = stale(files)
        for path in out_of_date:
            print(
                f"{path} is out of date; run python -m tools.config_files --write",
                file=sys.stderr,
            )
        return 1 if out_of_date else 0
    print(settings_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
