"""Local runs: ``python handler.py`` with ``test_input.json`` or ``--test_input '{...}'``.

The runpod SDK's own local mode does not iterate generator handlers (it reports success
without running anything), so the job is executed here, through the real handler, and
each chunk is printed as it arrives.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from vlm_worker.serving.worker import Worker


def local_job(args: argparse.Namespace, cwd: Path) -> dict[str, Any] | None:
    """The job a local run should execute, as the runpod SDK would pick it, or None."""
    if args.rp_serve_api:
        return None
    if args.test_input:
        return json.loads(args.test_input)
    if os.environ.get("RUNPOD_WEBHOOK_GET_JOB"):
        return None
    path = cwd / "test_input.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    return None


async def run_local(worker: Worker, job: dict[str, Any]) -> bool:
    """Run one job through the real handler, printing each chunk, then the result.

    Returns whether the job succeeded.
    """
    job = {"id": job.get("id", "local_test"), "input": job.get("input")}
    chunks = []
    async for chunk in worker.handler(job):
        chunks.append(chunk)
        print("chunk:", json.dumps(chunk, ensure_ascii=False), flush=True)
    failed = bool(chunks) and "error" in chunks[-1]
    text = "".join(c.get("text", "") for c in chunks)
    result = {
        "id": job["id"],
        "status": "FAILED" if failed else "COMPLETED",
        "text": text,
        "output": chunks,
    }
    print("result:", json.dumps(result, ensure_ascii=False), flush=True)
    return not failed
