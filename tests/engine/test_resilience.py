"""Timeouts, engine death and log hygiene, through the real engine."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from support.jobs import data_uri, image_job, screenshot
from support.server import start_api_server
from vlm_worker.pipeline.runner import JobRunner
from vlm_worker.serving import logs

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.engine


async def test_job_timeout_aborts_the_request(worker):
    runner = JobRunner(worker.engine, replace(worker.settings, job_timeout=1.0))
    start = time.monotonic()
    chunks = [
        c
        async for c in runner.run(
            {"id": "slow", "input": image_job(max_tokens=3500, ignore_eos=True)}
        )
    ]
    elapsed = time.monotonic() - start
    err = chunks[-1]["error"]
    assert err["type"] == "timeout" and "JOB_TIMEOUT=1s" in err["message"]
    assert 1.0 <= elapsed < 2.5
    assert len(chunks) > 1, "text streamed before the deadline is kept"
    for _ in range(100):
        if await worker.engine.num_unfinished() == 0:
            break
        await asyncio.sleep(0.05)
    assert await worker.engine.num_unfinished() == 0


def test_json_logs_hold_facts_not_images_or_secrets(worker, capsys):
    secret = "hf_abcdefghijklmnopqrstuvwxyz123456"
    logs.setup("INFO", "json", {"HF_TOKEN": secret})
    log = logging.getLogger("vlm_worker.pipeline.runner")
    uri = data_uri(screenshot(200, 120))
    try:
        job = image_job(uri, text=f"my token is {secret}", max_tokens=3, stream=False)

        async def run():
            return [c async for c in worker.handler({"id": "log-me", "input": job})]

        (final,) = asyncio.run(run())
        assert final["usage"]["completion_tokens"] == 3
        log.warning("token %s leaked?", secret)
    finally:
        logs.setup("INFO", "text", {})
    err = capsys.readouterr().err
    lines = [json.loads(ln) for ln in err.splitlines() if ln.startswith("{")]
    mine = [ln for ln in lines if ln.get("job_id") == "log-me"]
    assert {ln["msg"] for ln in mine} >= {"job accepted", "job done"}
    done = next(ln for ln in mine if ln["msg"] == "job done")
    assert done["completion_tokens"] == 3 and "total_ms" in done
    assert uri[30:80] not in err and "base64" not in err
    assert secret not in err and "***" in err
    assert "my token is" not in err, "prompts are not logged"


def _descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def test_engine_death_fails_in_flight_jobs_and_exits_nonzero(tiny_model):
    """Kill the engine core mid-job: the job gets engine_error, the worker exits 1."""
    env = {k: v for k, v in os.environ.items() if k != "MODEL_NAME"}
    env["WARMUP"] = "false"
    proc, base = start_api_server(env)
    try:
        result: dict = {}

        def post():
            req = urllib.request.Request(
                base + "/runsync",
                headers={"Content-Type": "application/json"},
                data=json.dumps({"input": image_job(max_tokens=3500, ignore_eos=True)}).encode(),
            )
            with urllib.request.urlopen(req, timeout=120) as resp:
                result.update(json.loads(resp.read()))

        t = threading.Thread(target=post)
        t.start()
        time.sleep(3)  # the job is generating
        victims = _descendants(proc.pid)
        assert victims, "the engine core runs in child processes"
        for child in victims:
            child.kill()
        t.join(60)
        assert not t.is_alive()
        chunks = result["output"]
        assert chunks[-1]["error"]["type"] == "engine_error", chunks[-1]
        assert proc.wait(timeout=60) == 1
        assert "engine is dead" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
