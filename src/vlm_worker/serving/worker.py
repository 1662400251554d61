"""The RunPod worker: start-up (settings → model → engine → warm-up), the handler the
SDK calls, and the process's end (a dead engine, SIGTERM).

Start-up is gated (as worker-vllm's ``main.py`` does): the RunPod loop starts only once
the engine is loaded and warm, and a failed start exits non-zero with the cause, so the
platform never routes jobs to a worker that cannot serve them.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import json
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_worker.adapters.vllm import tool_parser_names
from vlm_worker.config.cpu_defaults import available_memory, cpu_engine_defaults, runs_on_cpu
from vlm_worker.config.engine_args import EngineSpec, build_engine_kwargs, default_max_model_len
from vlm_worker.config.lora_modules import parse_lora_modules, resolve_adapters
from vlm_worker.config.model_source import (
    ModelSource,
    hub_cache_lookup,
    hub_download,
    resolve_model_source,
    served_settings,
    use_source,
)
from vlm_worker.config.settings import TINY_MODEL_DIR, WorkerSettings, load_worker_settings
from vlm_worker.contract.errors import (
    ConfigError,
    EngineDead,
    InvalidInput,
    WorkerError,
    error_chunk,
)
from vlm_worker.contract.openai_shapes import from_worker_error
from vlm_worker.engine.model_info import build_model_info, model_max_len
from vlm_worker.engine.vllm_engine import VllmEngine
from vlm_worker.pipeline.hooks import NO_HOOKS, PipelineHooks
from vlm_worker.pipeline.image_pool import image_pool, thread_count, torch_threads
from vlm_worker.pipeline.runner import JobRunner
from vlm_worker.serving import logs
from vlm_worker.serving.openai_route import OpenAIRoute, openai_request

log = logging.getLogger("vlm_worker.serving.worker")

#: Exit code of a worker whose engine died: the platform starts a new one.
EXIT_ENGINE_DEAD = 1
FATAL_GRACE_S = 3.0


@dataclass
class Worker:
    settings: WorkerSettings
    engine: VllmEngine
    runner: JobRunner
    exiting: bool = field(default=False, init=False)
    #: Set by ``shutdown``: from then on a closed engine is our doing, not a death.
    stopping: bool = field(default=False, init=False)
    openai: OpenAIRoute = field(init=False)

    def __post_init__(self) -> None:
        self.runner.on_fatal = self.on_fatal
        self.openai = OpenAIRoute(self.runner)

    # The runpod SDK checks ``inspect.isasyncgenfunction``: this must stay an async generator.
    async def handler(self, job: dict[str, Any]) -> AsyncIterator[Any]:
        if self.exiting:  # the engine is dead: no fetching, decoding or queueing first
            yield error_chunk(EngineDead("the engine has stopped; this worker is restarting"))
            return
        try:
            request = openai_request(job.get("input"))
        except InvalidInput as err:  # an OpenAI-form job with a key of neither form
            yield from_worker_error(err.to_dict()["error"])
            return
        if request is not None:
            chunks = self.openai.handle(str(job.get("id")), *request)
        else:
            chunks = self.runner.run(job)
        async for chunk in chunks:
            yield chunk

    def concurrency_modifier(self, current: int) -> int:
        """MAX_CONCURRENCY; 0 once the engine is dead, so the SDK takes no more jobs."""
        return 0 if self.exiting else self.settings.max_concurrency

    def runpod_config(self) -> dict[str, Any]:
        return {
            "handler": self.handler,
            "concurrency_modifier": self.concurrency_modifier,
            "return_aggregate_stream": True,
        }

    def warmup(self) -> float:
        """One short image generation through the whole job path; returns seconds."""
        start = time.perf_counter()
        job = {"id": "warmup", "input": warmup_input()}

        async def run() -> list[dict[str, Any]]:
            return [chunk async for chunk in self.runner.run(job)]

        chunks = asyncio.run(run())
        if "error" in chunks[-1]:
            raise RuntimeError(f"warm-up job failed: {chunks[-1]['error']}")
        return time.perf_counter() - start

    def on_fatal(self, err: WorkerError) -> None:
        """Let in-flight jobs report their errors, then exit so the platform replaces us."""
        if self.exiting:
            return
        self.exiting = True
        log.critical(
            "engine is dead; exiting after in-flight jobs report",
            extra={"in_flight": self.runner.in_flight, "error": err.message},
        )

        def exit_later() -> None:
            deadline = time.monotonic() + 30
            while self.runner.in_flight > 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(FATAL_GRACE_S)  # the SDK posts results after the handler returns
            self.shutdown()
            os._exit(EXIT_ENGINE_DEAD)

        threading.Thread(target=exit_later, name="fatal-exit", daemon=True).start()

    def shutdown(self) -> None:
        """Stop vLLM's engine processes and the image workers."""
        self.stopping = True
        self.engine.shutdown()
        self.runner.images.shutdown()

    def start_watchdog(self, interval: float = 2.0) -> None:
        """Notice an engine that dies between jobs, not only during one."""

        def watch() -> None:
            while not (self.exiting or self.stopping):
                # ``stopping`` is set before the engine closes, so a closed engine seen
                # here with it unset did die
                if self.engine.dead and not self.stopping:
                    self.on_fatal(EngineDead("the engine process died while idle"))
                    return
                time.sleep(interval)

        threading.Thread(target=watch, name="engine-watchdog", daemon=True).start()


def prompt_threads(settings: WorkerSettings) -> ThreadPoolExecutor:
    """Threads for template rendering (and image work when there are no image processes).

    This process's torch resizes and normalises images inside vLLM's input processing
    (the model runs in vLLM's engine processes); it gets a quarter of the cores, for the
    reason ``preprocess.torch_threads`` gives.
    """
    import torch

    torch.set_num_threads(torch_threads())
    return ThreadPoolExecutor(
        max_workers=thread_count(settings),
        thread_name_prefix="vlm-pre",
    )


def freeze_startup_heap() -> int:
    """Collect start-up's garbage now and exempt what survives from later collections,
    as ``vllm serve`` does after its start-up; returns the number of objects frozen.

    Start-up (vLLM, torch, transformers, the engine client) leaves a large heap and some
    cyclic garbage in this process. Left alone, a long collection fell into the worker's
    first busy seconds, stalling every stream, image hand-off and prompt thread at once;
    with this collect-and-freeze the benchmark saw none
    (``docs/decisions/0006-heap-freeze.md``). It costs one full collection before the
    worker takes jobs.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def warmup_input() -> dict[str, Any]:
    from PIL import Image

    img = Image.new("RGB", (320, 240), (200, 220, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": uri}},
                    {"type": "text", "text": "Describe the image."},
                ],
            }
        ],
        "max_tokens": 2,
        "stream": False,
    }


def engine_spec(
    env: Mapping[str, str],
    settings: WorkerSettings,
    source: ModelSource | None = None,
    *,
    on_cpu: bool | None = None,
) -> EngineSpec:
    """The engine's arguments: the environment's, the model's folder, and defaults for
    what neither sets (CPU defaults on a machine without a GPU, a capped context)."""
    spec = build_engine_kwargs(env, settings)
    if source is not None:
        spec = use_source(spec, source)
    if on_cpu if on_cpu is not None else runs_on_cpu():
        chosen = cpu_engine_defaults(
            spec, env, tiny=settings.uses_tiny_model, available_bytes=available_memory()
        )
        if chosen:
            log.info(
                "no GPU: CPU engine defaults for what the environment leaves unset",
                extra={"cpu_defaults": json.dumps(chosen)},
            )
        spec = EngineSpec({**spec.kwargs, **chosen}, spec.explicit)
    if "max_model_len" not in spec.kwargs:
        model_max = model_max_len(
            spec.kwargs["model"],
            spec.kwargs.get("revision"),
            bool(spec.kwargs.get("trust_remote_code", False)),
        )
        spec.kwargs["max_model_len"] = default_max_model_len(model_max)
    return spec


#: Builds the tiny test model into a folder: ``tools.tiny_model`` in a checkout, which
#: ``handler.py`` passes in (the package itself ships no model builder).
TinyModelBuilder = Callable[[Path], Any]


def ensure_tiny_model(settings: WorkerSettings, build: TinyModelBuilder | None) -> None:
    if not settings.uses_tiny_model or (TINY_MODEL_DIR / "config.json").exists():
        return
    if build is None:
        raise ConfigError(
            "MODEL_NAME is not set and the tiny test model is not built at "
            f"{TINY_MODEL_DIR}: set MODEL_NAME to the model to serve, or run `make model` "
            "in a checkout of vlm-worker"
        )
    log.info("building the tiny test model", extra={"path": str(TINY_MODEL_DIR)})
    build(TINY_MODEL_DIR)


def check_tool_parser(settings: WorkerSettings) -> None:
    """TOOL_CALL_PARSER names one of vLLM's parsers: a typo fails the start, not a job."""
    name = settings.tool_call_parser
    if name is not None and name not in (known := tool_parser_names()):
        raise ConfigError(
            f"TOOL_CALL_PARSER={name!r} is not one of vLLM's tool parsers: {', '.join(known)}"
        )


def start_worker(
    env: Mapping[str, str] | None = None,
    *,
    warmup: bool | None = None,
    hooks: PipelineHooks = NO_HOOKS,
    build_tiny_model: TinyModelBuilder | None = None,
) -> Worker:
    """Everything before serving; raises ``ConfigError`` or the engine's own error.

    ``hooks`` observe the job path (the benchmark's); ``build_tiny_model`` is called when
    the tiny test model is to be served and is not built yet.
    """
    env = os.environ if env is None else env
    settings = load_worker_settings(env)
    logs.setup(settings.log_level, settings.log_format, env)
    check_tool_parser(settings)
    lora_modules = parse_lora_modules(settings.lora_modules)
    source = resolve_model_source(env, settings)  # fails fast on a model that is nowhere
    settings = served_settings(settings, source)
    if settings.uses_tiny_model:
        log.warning(
            "MODEL_NAME is not set: serving the built-in tiny random-weight model; "
            "its output is gibberish by design"
        )
    ensure_tiny_model(settings, build_tiny_model)
    spec = engine_spec(env, settings, source)
    cache_dir = env.get("DOWNLOAD_DIR") or None
    adapters = resolve_adapters(
        lora_modules,
        spec.kwargs,
        cached=hub_cache_lookup(cache_dir),
        download=hub_download(cache_dir),
        base_names=(settings.model_label, settings.openai_model_id),
    )
    shown = {
        k: v
        for k, v in spec.kwargs.items()
        if k in spec.explicit or k in ("model", "max_model_len", "limit_mm_per_prompt")
    }
    threads = prompt_threads(settings)
    images = image_pool(settings, hooks)
    images.spawn()  # worker processes import torch while the engine loads
    log.info("starting engine", extra={"engine_args": json.dumps(shown, default=str)})
    t0 = time.perf_counter()
    try:
        engine = VllmEngine.start(
            spec.kwargs,
            lambda llm: build_model_info(llm, settings, spec.kwargs),
            on_start=hooks.engine_started,
        )
    except BaseException:
        images.shutdown()
        raise
    log.info(
        "engine ready",
        extra={
            "seconds": round(time.perf_counter() - t0, 1),
            "max_model_len": engine.info.max_model_len,
        },
    )
    try:
        pids = images.start(engine.info.geometry, engine.info.image_processor)
    except BaseException:
        images.shutdown()
        engine.shutdown()
        raise
    log.info("image workers ready", extra={"mode": images.mode, "pids": pids})
    runner = JobRunner(
        engine, settings, executor=threads, images=images, hooks=hooks, adapters=adapters
    )
    worker = Worker(settings, engine, runner)
    if settings.warmup if warmup is None else warmup:
        seconds = worker.warmup()
        log.info("warm-up done", extra={"seconds": round(seconds, 2)})
    t0 = time.perf_counter()
    frozen = freeze_startup_heap()
    log.info(
        "start-up heap frozen",
        extra={"objects": frozen, "seconds": round(time.perf_counter() - t0, 2)},
    )
    return worker


def stop_engine_on_sigterm(worker: Worker) -> None:
    """Stop vLLM's engine processes when the platform stops this worker.

    uvicorn (``--rp_serve_api``) re-raises SIGTERM after its own graceful shutdown, which
    would kill this process without running ``finally`` blocks and leave the engine core
    running as an orphan holding the GPU. The SDK's queue loop installs its own handler
    while it runs and returns normally, so the ``finally`` in ``main`` covers that path.

    A forked child inherits the handler with a copy of the worker: the SDK's heartbeat
    process does, and multiprocessing ends it with SIGTERM as the worker exits. There the
    handler just exits: stopping the copied engine would wait a minute on a loop thread
    the fork did not copy, and hold up the worker's own exit as long.
    """
    owner = os.getpid()

    def on_term(signum: int, frame: Any) -> None:
        if os.getpid() != owner:
            os._exit(0)
        log.info("SIGTERM: stopping the engine")
        worker.shutdown()
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
