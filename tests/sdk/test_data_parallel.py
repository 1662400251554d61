"""Every engine of the worker used: ``DATA_PARALLEL_SIZE=2`` runs two vLLM engine cores
under the worker's one in-process ``AsyncLLM`` (vLLM's own load balancing), as deployed
behind a job queue. On a GPU machine each core takes a GPU; on the CPU both share it, which
is enough to show that jobs reach both, and that a scale-down stops every process.
"""

from __future__ import annotations

import re
import time

import psutil
import pytest
from benchmarks.runpod_queue import RunpodQueue

from support.jobs import image_job
from support.server import deployed_worker, log_tail

pytestmark = pytest.mark.engine

#: vLLM's per-engine stats line (``LoggingStatLogger``, one per data-parallel rank).
STATS = re.compile(r"Engine (\d{3}): Avg prompt throughput: ([0-9.]+) tokens/s")


def test_two_data_parallel_engines_both_serve_and_stop_with_the_worker(tiny_model, tmp_path):
    log_path = tmp_path / "worker.log"
    with RunpodQueue(hold_s=1.0) as queue, deployed_worker(
        queue, log_path, MODEL_NAME=tiny_model, DATA_PARALLEL_SIZE="2", MAX_CONCURRENCY="8",
        WARMUP="false", VLLM_LOG_STATS_INTERVAL="1", RUNPOD_PING_INTERVAL="1000",
    ) as proc:  # fmt: skip
        worker = psutil.Process(proc.pid)
        cores = [p for p in worker.children(recursive=True)
                 if "EngineCore" in " ".join(p.cmdline())]  # fmt: skip
        assert len(cores) == 2, [p.cmdline() for p in worker.children(recursive=True)]

        ids = queue.submit(
            [image_job(max_tokens=8 + i % 3, ignore_eos=True) for i in range(8)], "dp"
        )
        jobs = queue.wait(ids, timeout=300)
        for i, job in enumerate(jobs):
            assert job.result["output"][-1]["usage"]["completion_tokens"] == 8 + i % 3

        # vLLM logs each engine's prompt throughput once a second while it works: both
        # ranks must have prefilled prompts, so the balancer gave jobs to each.
        deadline = time.monotonic() + 15
        busy: set[str] = set()
        while busy != {"000", "001"} and time.monotonic() < deadline:
            time.sleep(0.5)
            text = log_path.read_text(errors="replace")
            busy = {m[1] for m in STATS.finditer(text) if float(m[2]) > 0}
        assert busy == {"000", "001"}, log_tail(log_path)

        proc.terminate()
        assert proc.wait(timeout=120) == 0, log_tail(log_path)
        text = log_path.read_text(errors="replace")
        assert "engine is dead" not in text and "engine shutdown raised" not in text
        _, alive = psutil.wait_procs(cores, timeout=30)
        assert not alive, f"engine cores left running: {alive}"
