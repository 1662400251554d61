"""The entry point ``handler.py`` calls, and the process's exit codes.

Exit codes, each tested:

* ``0``: a local test job completed, or the worker was stopped (SIGTERM, the SDK's loop
  ended).
* ``1`` (``EXIT_FAILURE``): the worker could not start although its configuration is
  valid (the model cannot be found or downloaded, the engine failed to load), a local
  test job failed, or the engine died while serving (the platform starts a new worker).
* ``2`` (``EXIT_CONFIG``): the configuration is wrong and retrying cannot help: a setting
  with a bad value, a test input that is not JSON, or ``MODEL_NAME`` unset on RunPod with
  no model baked into the image. These fail within seconds, before any engine starts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from vlm_worker.adapters.runpod import persist_job_ids_only
from vlm_worker.contract.errors import ConfigError
from vlm_worker.serving.local_run import local_job, run_local
from vlm_worker.serving.worker import (
    EXIT_ENGINE_DEAD,
    TinyModelBuilder,
    start_worker,
    stop_engine_on_sigterm,
)

EXIT_OK = 0
EXIT_FAILURE = EXIT_ENGINE_DEAD
EXIT_CONFIG = 2


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The runpod SDK's flags that decide what this process does; the SDK reads the rest."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--rp_serve_api", action="store_true")
    parser.add_argument("--test_input", default=None)
    args, _ = parser.parse_known_args(argv)
    return args


def main(
    argv: list[str] | None = None, *, build_tiny_model: TinyModelBuilder | None = None
) -> None:
    """Start the worker, then run the local test job or serve RunPod's queue.

    ``build_tiny_model``: how to build the tiny test model when ``MODEL_NAME`` is unset on
    a local run and it is not built yet (``handler.py`` passes ``tools.tiny_model``'s).
    """
    import runpod

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        job = local_job(args, Path.cwd())
    except json.JSONDecodeError as exc:
        print(f"error: the test input is not valid JSON: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    try:
        worker = start_worker(build_tiny_model=build_tiny_model)
    except ConfigError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    except Exception as exc:
        logging.getLogger("vlm_worker").critical(
            "worker failed to start", exc_info=True, extra={"cause": f"{type(exc).__name__}: {exc}"}
        )
        print(f"error: the worker failed to start: {type(exc).__name__}: {exc}", file=sys.stderr)
        os._exit(EXIT_FAILURE)  # the engine core child may keep a normal exit waiting
    if job is not None:
        ok = asyncio.run(run_local(worker, job))
        worker.shutdown()
        sys.exit(EXIT_OK if ok else EXIT_FAILURE)
    worker.start_watchdog()
    stop_engine_on_sigterm(worker)
    persist_job_ids_only()
    try:
        runpod.serverless.start(worker.runpod_config())
    finally:
        worker.shutdown()
