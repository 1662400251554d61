"""The worker's own settings: one frozen object, built once at start from the environment.

The dataclass fields below ARE the settings table: each field's metadata names its
environment variable, category and help text. Docs, the console template and validation
all read from here, so a variable cannot be documented without being read, or read
without being documented.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vlm_worker.config.env_values import convert
from vlm_worker.contract.errors import ConfigError
from vlm_worker.media.address_policy import DomainAllowList

#: Where `make` builds the tiny random-weight model that runs when MODEL_NAME is unset.
TINY_MODEL_DIR = Path(__file__).resolve().parents[3] / ".models" / "tiny-qwen2.5-vl"


def _setting(
    default: Any,
    help: str,
    *,
    category: str,
    minimum: float | None = None,
    maximum: float | None = None,
    secret: bool = False,
    env: str | None = None,
) -> Any:
    return field(
        default=default,
        metadata={
            "help": help,
            "category": category,
            "minimum": minimum,
            "maximum": maximum,
            "secret": secret,
            "env": env,
        },
    )


@dataclass(frozen=True)
class WorkerSettings:
    """What the worker itself reads; vLLM's engine arguments live in ``engine_args``."""

    model_name: str | None = _setting(
        None,
        "Hugging Face repo id or local path of the model to serve. Unset: the built-in tiny "
        "random-weight Qwen2.5-VL model (gibberish output, for tests and demos only).",
        category="Model",
    )
    model_revision: str | None = _setting(
        None, "Branch, tag or commit of MODEL_NAME to load.", category="Model"
    )
    tokenizer_name: str | None = _setting(
        None, "Tokenizer repo id or path, if not MODEL_NAME's own.", category="Model"
    )
    custom_chat_template: str | None = _setting(
        None,
        "Jinja chat template (the text itself, or a path to a file) replacing the model's.",
        category="Model",
    )
    lora_modules: str | None = _setting(
        None,
        "LoRA adapters served by name, as `vllm serve --lora-modules`: `name=path` pairs, "
        'comma-separated, or a JSON list of {"name", "path"}; a path is a folder or a '
        "Hugging Face repo id. A request whose `model` is an adapter's name runs on it. "
        "Needs ENABLE_LORA=true (and MAX_LORA_RANK at least the adapters' rank).",
        category="Model",
    )
    baked_model_manifest: str = _setting(
        "/models/manifest.json",
        "Manifest that builder/bake_model.py writes when a model is baked into the image. "
        "If the file exists, the worker serves that local snapshot offline (HF_HUB_OFFLINE=1), "
        "unless MODEL_NAME names a different model.",
        category="Model",
    )
    max_concurrency: int = _setting(
        32,
        "Jobs this worker runs at once; they share the engine through continuous batching. "
        "The SDK refills a full worker once a second, so a low value leaves the GPU idle "
        "between jobs; a high one holds jobs here that other workers could start "
        "(docs/benchmarks.md).",
        category="Worker",
        minimum=1,
        maximum=1024,
    )
    warmup: bool = _setting(
        True,
        "Run one short image generation before taking the first job.",
        category="Worker",
    )
    job_timeout: float | None = _setting(
        None,
        "Seconds one job may take from start to last token; past it the engine request is "
        "aborted and the job fails with a `timeout` error. Unset: no limit.",
        category="Worker",
        minimum=0.1,
    )
    preprocess_threads: int | None = _setting(
        None,
        "Threads rendering prompts off the event loop, and as many again, at lower CPU "
        "priority, preparing images in the worker process (all of them when "
        "PREPROCESS_PROCESSES is 0; a job that runs alone otherwise). Unset: one per CPU core.",
        category="Worker",
        minimum=1,
        maximum=256,
    )
    preprocess_processes: int | None = _setting(
        None,
        "Worker processes decoding and resizing images: an image that crashes a decoder "
        "fails its own job, not the worker. 0: threads of the worker process instead, as "
        "fast in the benchmark and without the processes' memory (~0.8 GiB each), but a "
        "decoder crash takes the worker down. Unset: half the CPU cores (at most 8) on "
        "machines with 4 or more cores, else 0. A job alone on the worker is decoded in a "
        "thread either way (faster when there is no other job to protect).",
        category="Worker",
        minimum=0,
        maximum=64,
    )
    default_max_tokens: int = _setting(
        512, "max_tokens when a job does not set it.", category="Generation", minimum=1
    )
    max_n: int = _setting(
        8,
        "Most choices (`n`) one request may ask for; each is a sequence of its own in the "
        "engine's batch.",
        category="Generation",
        minimum=1,
        maximum=256,
    )
    max_job_text_chars: int = _setting(
        1_000_000,
        "Most characters of text one job may carry (messages, prompt, instructions), checked "
        "before the job is parsed or tokenized; images and videos have their own caps.",
        category="Worker",
        minimum=1,
    )
    max_content_parts: int = _setting(
        1024,
        "Most messages plus content parts one job may carry, checked before parsing.",
        category="Worker",
        minimum=1,
    )
    max_images_per_job: int = _setting(
        4,
        "Images one job may carry (vLLM's `limit_mm_per_prompt`); they keep their order. "
        "A grounding job takes one.",
        category="Images",
        minimum=0,
        maximum=64,
    )
    image_min_pixels: int | None = _setting(
        None,
        "Lower bound on an image's resized area (pixels). Unset: the model processor's.",
        category="Images",
        minimum=1,
    )
    image_max_pixels: int | None = _setting(
        None,
        "Upper bound on an image's resized area (pixels). Unset: the model processor's.",
        category="Images",
        minimum=1,
    )
    grounding_style: Literal[
        "auto", "gta1", "qwen2.5-vl", "qwen3-vl", "ui-tars-1.5", "ui-tars", "opencua"
    ] = _setting(
        "auto",
        "The grounding convention (prompt, answer format, coordinate space, resize bounds): "
        "auto (from the model's architecture and name; unknown models get gta1), gta1, "
        "qwen2.5-vl, qwen3-vl, ui-tars-1.5, ui-tars (v1), opencua.",
        category="Grounding",
    )
    grounding_coordinates: Literal["absolute", "relative-1000", "relative-1"] | None = _setting(
        None,
        "The space the model answers in: absolute (pixels of the resized image), "
        "relative-1000 or relative-1. Unset: the style's.",
        category="Grounding",
    )
    grounding_constrain: bool = _setting(
        False,
        "Constrain grounding answers to the style's format (vLLM structured outputs) unless "
        "a job sets `constrain`: a point always comes back.",
        category="Grounding",
    )
    grounding_min_pixels: int | None = _setting(
        None,
        "Lower bound on a grounding job's resized image area (pixels). Unset: the style's "
        "reference (GTA1: 3136), else the processor's.",
        category="Grounding",
        minimum=1,
    )
    grounding_max_pixels: int | None = _setting(
        None,
        "Upper bound on a grounding job's resized image area (pixels). Unset: the style's "
        "reference (GTA1: 4096x2160), else the processor's. Capped, with a start-up "
        "warning, at what the engine's encoder cache takes.",
        category="Grounding",
        minimum=1,
    )
    max_pixels_in_flight: int | None = _setting(
        None,
        "Most decoded image pixels in flight across jobs; an image that would pass it waits "
        "for earlier ones (one larger than it runs alone). Unset: a quarter of the memory "
        "available at start, at 10 bytes a pixel.",
        category="Images",
        minimum=1,
    )
    max_image_bytes: int = _setting(
        20 * 1024 * 1024,
        "Largest encoded image accepted, in bytes (inline or fetched).",
        category="Images",
        minimum=1,
    )
    max_image_source_pixels: int = _setting(
        64_000_000,
        "Largest decoded image accepted (width x height) before resizing; guards against "
        "decompression bombs. Checked from the header, before any pixel is decoded.",
        category="Images",
        minimum=1,
        maximum=178_956_970,  # Pillow refuses anything larger outright
    )
    image_decode_timeout: float | None = _setting(
        30.0,
        "Seconds one image (or video) may take to decode and resize in an image process; "
        "past it the process is killed, the job fails with `image_decode` and the process "
        "is replaced. Threads (PREPROCESS_PROCESSES=0, a job alone) cannot be stopped.",
        category="Images",
        minimum=0.1,
    )
    image_fetch_timeout: float = _setting(
        15.0,
        "Seconds allowed to fetch one image URL: DNS, connects, every redirect and the body.",
        category="Images",
        minimum=0.1,
    )
    allowed_image_domains: tuple[str, ...] | None = _setting(
        None,
        "Host names image URLs may use, comma-separated; each also allows its subdomains "
        "(`example.com` allows `cdn.example.com`, not `evil-example.com`). Unset: any public "
        "host.",
        category="Images",
    )
    allow_private_image_urls: bool = _setting(
        False,
        "Let image URLs reach loopback, private (10/8, 172.16/12, 192.168/16, fc00::/7) and "
        "carrier-grade NAT addresses. Off: only public addresses are fetched. Link-local, "
        "cloud metadata, multicast and reserved addresses are refused either way.",
        category="Images",
    )
    max_videos_per_job: int = _setting(
        0,
        "Videos one job may carry (vLLM's `limit_mm_per_prompt`); 0 turns video off. Only "
        "for models that take video (Qwen2-VL, Qwen2.5-VL, Qwen3-VL). Raises the engine's "
        "start-up profiling and encoder cache to a whole video's tokens.",
        category="Video",
        minimum=0,
        maximum=16,
    )
    max_video_bytes: int = _setting(
        64 * 1024 * 1024,
        "Largest encoded video accepted, in bytes (inline or fetched).",
        category="Video",
        minimum=1,
    )
    video_fps: float | None = _setting(
        None,
        "Frames sampled per second of video. Unset: the model's video processor's (2 for "
        "the Qwen families).",
        category="Video",
        minimum=0.01,
        maximum=60,
    )
    video_max_frames: int | None = _setting(
        None,
        "Most frames sampled from one video. Unset: the model's video processor's.",
        category="Video",
        minimum=1,
        maximum=4096,
    )
    max_video_seconds: float = _setting(
        300.0,
        "Longest video accepted, in seconds, from its container's header.",
        category="Video",
        minimum=0.1,
    )
    max_video_decoded_pixels: int = _setting(
        256_000_000,
        "Most pixels one video may decode to: sampled frames x width x height, checked from "
        "the header before any frame is decoded (3 bytes each while the job runs).",
        category="Video",
        minimum=1,
    )
    default_min_batch_size: int = _setting(
        1,
        "Tokens in the first streamed chunk; later chunks grow towards DEFAULT_BATCH_SIZE.",
        category="Streaming",
        minimum=1,
    )
    default_batch_size: int = _setting(
        50, "Largest number of tokens per streamed chunk.", category="Streaming", minimum=1
    )
    default_batch_size_growth_factor: float = _setting(
        3.0,
        "Each streamed chunk may hold this many times more tokens than the last.",
        category="Streaming",
        minimum=1.0,
    )
    openai_served_model_name_override: str | None = _setting(
        None,
        "Model id the OpenAI-compatible route reports and accepts. Unset: MODEL_NAME.",
        category="OpenAI",
    )
    openai_accept_any_model: bool = _setting(
        False,
        "Accept any `model` in OpenAI-compatible requests instead of answering 404 for "
        "names other than the served one.",
        category="OpenAI",
    )
    tool_call_parser: str | None = _setting(
        None,
        "vLLM's tool-call parser for the model's format (`hermes` for Qwen2.5-VL and most "
        "Qwen fine-tunes), as `vllm serve --tool-call-parser`: needed for `tool_choice` "
        "`auto`, `required` and a named function.",
        category="OpenAI",
    )
    enable_auto_tool_choice: bool = _setting(
        False,
        "Let the model decide whether to call a tool (`tool_choice: auto`, the default when "
        "a request has tools), as `vllm serve --enable-auto-tool-choice`. Needs "
        "TOOL_CALL_PARSER.",
        category="OpenAI",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = _setting(
        "INFO", "Worker log level.", category="Worker"
    )
    log_format: Literal["text", "json"] = _setting(
        "text", "text for people, json for one JSON object per line.", category="Worker"
    )

    @property
    def resolved_model(self) -> str:
        return self.model_name or str(TINY_MODEL_DIR)

    @property
    def model_label(self) -> str:
        """The name jobs report: MODEL_NAME as given, or the tiny model's folder name."""
        return self.model_name or TINY_MODEL_DIR.name

    @property
    def openai_model_id(self) -> str:
        return self.openai_served_model_name_override or self.model_label

    @property
    def uses_tiny_model(self) -> bool:
        return self.model_name is None

    def chat_template_text(self) -> str | None:
        """The custom template's text; a value naming an existing file is read from it."""
        value = self.custom_chat_template
        if value is None:
            return None
        if "{" not in value and len(value) < 4096 and Path(value).is_file():
            return Path(value).read_text(encoding="utf-8")
        return value


def env_name(f: dataclasses.Field[Any]) -> str:
    return f.metadata.get("env") or f.name.upper()


def setting_fields() -> tuple[dataclasses.Field[Any], ...]:
    return dataclasses.fields(WorkerSettings)


def setting_names() -> list[str]:
    return [env_name(f) for f in setting_fields()]


def load_worker_settings(env: Mapping[str, str]) -> WorkerSettings:
    """Read every setting from ``env``; report all bad values at once, not one per restart."""
    hints = typing.get_type_hints(WorkerSettings)
    values: dict[str, Any] = {}
    problems: list[str] = []
    for f in setting_fields():
        name = env_name(f)
        raw = env.get(name)
        if raw is None or raw.strip() == "":
            continue
        try:
            value = convert(name, raw, hints[f.name])
            _check_range(name, raw, value, f)
        except ConfigError as exc:
            problems.append(exc.message)
            continue
        values[f.name] = value
    settings = None
    if not problems:
        settings = WorkerSettings(**values)
        lo, hi = settings.image_min_pixels, settings.image_max_pixels
        if lo is not None and hi is not None and lo > hi:
            problems.append(f"IMAGE_MIN_PIXELS={lo} is larger than IMAGE_MAX_PIXELS={hi}")
        glo, ghi = settings.grounding_min_pixels, settings.grounding_max_pixels
        if glo is not None and ghi is not None and glo > ghi:
            problems.append(f"GROUNDING_MIN_PIXELS={glo} is larger than GROUNDING_MAX_PIXELS={ghi}")
        if settings.default_min_batch_size > settings.default_batch_size:
            problems.append(
                f"DEFAULT_MIN_BATCH_SIZE={settings.default_min_batch_size} is larger than "
                f"DEFAULT_BATCH_SIZE={settings.default_batch_size}"
            )
        if settings.enable_auto_tool_choice and not settings.tool_call_parser:
            problems.append(
                "ENABLE_AUTO_TOOL_CHOICE=true needs TOOL_CALL_PARSER (e.g. hermes for Qwen)"
            )
        try:  # here, not when the fetcher is built: that is after the engine has loaded
            DomainAllowList.parse(settings.allowed_image_domains)
        except ConfigError as exc:
            problems.append(exc.message)
    if problems:
        raise ConfigError("invalid settings: " + "; ".join(problems))
    assert settings is not None
    return settings


def _check_range(name: str, raw: str, value: Any, f: dataclasses.Field[Any]) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    lo, hi = f.metadata.get("minimum"), f.metadata.get("maximum")
    if lo is not None and value < lo:
        raise ConfigError(f"{name}={raw!r} is below the minimum {lo:g}")
    if hi is not None and value > hi:
        raise ConfigError(f"{name}={raw!r} is above the maximum {hi:g}")
