"""``python handler.py`` as a user types it: exit codes, and a plain run on a CPU machine."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
import pytest

from support.server import CPU_ENGINE_ENV, ROOT, clean_env
from vlm_worker.serving.main import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK


def handler(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "handler.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def engine_cores() -> set[int]:
    return {
        p.pid
        for p in psutil.process_iter(["name", "cmdline"])
        if "EngineCore" in (p.info["name"] or "")
        or "EngineCore" in " ".join(p.info["cmdline"] or [])
    }


@pytest.mark.parametrize("marker", ["RUNPOD_WEBHOOK_GET_JOB", "RUNPOD_POD_ID"])
def test_model_name_unset_on_runpod_exits_2_before_any_engine(marker, tmp_path):
    before = engine_cores()
    env = clean_env(
        **{marker: "https://api.runpod.ai/v2/endpoint/job-take/worker"},
        BAKED_MODEL_MANIFEST=str(tmp_path / "no-manifest.json"),
    )
    started = time.monotonic()
    proc = handler(env, timeout=60)
    seconds = time.monotonic() - started
    assert proc.returncode == EXIT_CONFIG == 2, proc.stderr[-2000:]
    assert seconds < 10, f"took {seconds:.1f} s"
    assert "MODEL_NAME is not set" in proc.stderr
    output = proc.stdout + proc.stderr
    assert "starting engine" not in output and "Initializing a V1 LLM engine" not in output
    assert engine_cores() <= before


def test_test_input_that_is_not_json_exits_2():
    proc = handler(clean_env(), "--test_input", "{not json", timeout=60)
    assert proc.returncode == EXIT_CONFIG
    assert "not valid JSON" in proc.stderr


def test_plain_python_handler_on_cpu_generates_text(tiny_model):
    """None of the Makefile's variables: the worker picks the CPU engine's defaults itself
    (and says so), and the README's command runs test_input.json for real."""
    env = clean_env()
    assert not set(CPU_ENGINE_ENV) & set(env)
    proc = handler(env)
    assert proc.returncode == EXIT_OK, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("result:")]
    result = json.loads(line.removeprefix("result:"))
    assert result["status"] == "COMPLETED" and result["text"]
    assert result["output"][-1]["usage"]["completion_tokens"] > 0
    assert "no GPU: CPU engine defaults" in proc.stderr
    assert "kv_cache_memory_bytes" in proc.stderr


def test_exit_codes_are_distinct_and_documented():
    assert (EXIT_OK, EXIT_FAILURE, EXIT_CONFIG) == (0, 1, 2)
    readme = (ROOT / "README.md").read_text()
    for code, when in (
        (EXIT_OK, "on success"),
        (EXIT_FAILURE, "when it failed to start"),
        (EXIT_CONFIG, "on a configuration error"),
    ):
        assert f" {code} {when}" in readme.replace("\n", " ")
