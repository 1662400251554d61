"""RunPod's deployment files, generated from the settings the code reads.

``worker-config.json`` (the console's template form), ``.runpod/hub.json`` and
``.runpod/tests.json`` (the RunPod Hub) are all rendered from one list of fields: every
worker setting (``WorkerSettings``), a curated set of vLLM engine arguments whose types,
options and defaults come from ``engine_args.engine_fields()`` (a ``Literal`` becomes a
select), and ``HF_TOKEN``. ``python -m vlm_worker.console --write`` rewrites the three
files; ``--check`` exits 1 when a committed file differs (the test suite runs it), so a
setting cannot be added, renamed or retyped without the console form following.
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

from .engine_args import DEFAULT_MAX_MODEL_LEN, EngineField, engine_fields
from .settings import WorkerSettings, env_name, setting_fields

ROOT = Path(__file__).resolve().parents[2]

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
    """(this project's version, the vLLM it pins): both from pyproject.toml."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    (pin,) = [r for r in project["optional-dependencies"]["gpu"] if r.startswith("vllm==")]
    return project["version"], pin.removeprefix("vllm==")


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


# --------------------------------------------------------------------- files
def dump(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def rendered(root: Path = ROOT) -> dict[Path, str]:
    """Every generated file's path and its current content."""
    from .hub import hub_json, tests_json

    fields = console_fields()
    test_input = json.loads((root / "test_input.json").read_text(encoding="utf-8"))
    return {
        root / "worker-config.json": dump(worker_config(fields, root)),
        root / ".runpod" / "hub.json": dump(hub_json(fields)),
        root / ".runpod" / "tests.json": dump(tests_json(fields, test_input["input"])),
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
                f"{path} is out of date; run python -m vlm_worker.console --write",
                file=sys.stderr,
            )
        return 1 if out_of_date else 0
    sys.stdout.write(next(iter(files.values())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
