"""The worker as users start it: ``python handler.py`` in a child process."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

#: The repository's root, where ``handler.py`` and ``test_input.json`` are.
ROOT = Path(__file__).resolve().parents[2]

#: Variables of ``make test``'s CPU engine: a child started with these runs the engine as
#: the test session's does. ``clean_env`` drops them all.
CPU_ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "ENFORCE_EAGER": "true",
    "DTYPE": "bfloat16",
    "MAX_MODEL_LEN": "4096",
    "MAX_NUM_SEQS": "8",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def worker_env(**extra: str) -> dict[str, str]:
    """This process's environment (the test session's CPU engine) for a child worker, off
    RunPod and with the tiny model."""
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_NAME", "RUNPOD_WEBHOOK_GET_JOB")}
    return {**env, **extra}


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the CPU engine's variables nor MODEL_NAME:
    what a user who just typed ``python handler.py`` has."""
    env = {k: v for k, v in os.environ.items() if k not in CPU_ENGINE_ENV and k != "MODEL_NAME"}
    return {**env, **extra}


def start_api_server(env: dict[str, str], timeout: float = 300) -> tuple[Any, str]:
    """``python handler.py --rp_serve_api`` on a free loopback port, once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "handler.py",
            "--rp_serve_api",
            "--rp_api_host",
            "127.0.0.1",
            "--rp_api_port",
            str(port),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"API server exited: {proc.stderr.read()[-3000:]}")
        try:
            urllib.request.urlopen(base + "/docs", timeout=2)
            return proc, base
        except OSError:
            if time.monotonic() > deadline:
                stop_process(proc, timeout=10)
                raise RuntimeError("API server did not come up") from None
            time.sleep(1)


def log_tail(path: Path, chars: int = 4000) -> str:
    """The end of a child worker's log, for an assertion's message."""
    return path.read_text(errors="replace")[-chars:]


def stop_process(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM, as the platform stops a worker; SIGKILL if it outlives ``timeout``, and
    then its children too: a killed worker leaves vLLM's engine processes running, and
    they would slow every test after it."""
    if proc.poll() is not None:
        return
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        psutil.wait_procs(children, timeout=30)


@contextlib.contextmanager
def deployed_worker(queue: Any, log_path: Path, **env: str) -> Iterator[subprocess.Popen]:
    """``python handler.py`` as RunPod runs it: the SDK's job loop polling ``queue`` (a
    ``benchmarks.runpod_queue.RunpodQueue``), its output in ``log_path``. Yields once the
    worker has asked for its first job; stops it on the way out, if a test has not."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "handler.py"], cwd=ROOT, env=worker_env(**queue.env(), **env),
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            if not queue.first_poll.wait(400):
                raise RuntimeError(f"the worker never polled: {log_tail(log_path)}")
            yield proc
        finally:
            stop_process(proc)
