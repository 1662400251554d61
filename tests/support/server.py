"""The worker as users start it: ``python handler.py`` in a child process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

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
                proc.kill()
                raise RuntimeError("API server did not come up") from None
            time.sleep(1)
