"""Shared fixtures: one real vLLM engine (CPU, tiny model) for the whole test session.

Helpers live in ``support/``; this file holds only fixtures and the session's environment.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import pytest
from tools.tiny_model import build_tiny_model

from support.server import CPU_ENGINE_ENV
from vlm_worker.config.settings import TINY_MODEL_DIR
from vlm_worker.pipeline.hooks import PipelineHooks

# What `make test` exports, repeated so `pytest` alone runs the same engine.
for _k, _v in CPU_ENGINE_ENV.items():
    os.environ.setdefault(_k, _v)


class EngineHandle(PipelineHooks):
    """The bare ``AsyncLLM`` under the session's worker, and its loop: tests compare the
    job path with what vLLM does on its own (``PipelineHooks.engine_started``)."""

    llm: Any = None
    loop: asyncio.AbstractEventLoop | None = None

    def engine_started(self, llm: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.llm, self.loop = llm, loop


@pytest.fixture(scope="session")
def tiny_model() -> str:
    build_tiny_model(TINY_MODEL_DIR)
    return str(TINY_MODEL_DIR)


@pytest.fixture(scope="session")
def processor(tiny_model: str) -> Any:
    from vlm_worker.engine.model_info import load_processor

    return load_processor(tiny_model, None, False)


@pytest.fixture(scope="session")
def engine_handle() -> EngineHandle:
    return EngineHandle()


@pytest.fixture(scope="session")
def worker(tiny_model: str, engine_handle: EngineHandle) -> Iterator[Any]:
    """The real worker: settings from the environment, vLLM on the CPU, warm-up included."""
    from vlm_worker.serving.worker import start_worker

    env = {k: v for k, v in os.environ.items() if k != "MODEL_NAME"}
    env["MAX_CONCURRENCY"] = "8"
    env["PREPROCESS_PROCESSES"] = "0"  # threads; test_worker_e2e compares with a process
    # tool calling as `vllm serve --enable-auto-tool-choice --tool-call-parser hermes`
    env["TOOL_CALL_PARSER"] = "hermes"
    env["ENABLE_AUTO_TOOL_CHOICE"] = "true"
    env["GROUNDING_STYLE"] = "gta1"  # the convention test_grounding_e2e checks
    w = start_worker(env, hooks=engine_handle)
    try:
        yield w
    finally:
        w.shutdown()
