"""The worker as deployed: ``python handler.py`` with RunPod's webhook variables, so the
runpod SDK's own job loop takes jobs from a queue (``benchmarks.runpod_queue``, a loopback
stand-in for RunPod's), posts each chunk to job-stream and the result to job-done, caps
jobs in flight at ``MAX_CONCURRENCY`` and stops a job RunPod cancels.

The local ``/runsync`` server the other SDK tests use calls the handler directly; none of
this runs there.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from benchmarks.runpod_queue import RunpodQueue

from support.jobs import image_job
from support.server import deployed_worker, log_tail

pytestmark = pytest.mark.engine

CONCURRENCY = 2


@pytest.fixture(scope="module")
def deployed(tiny_model, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("queue") / "worker.log"
    with RunpodQueue(hold_s=1.0) as queue, deployed_worker(
        queue, log_path, MODEL_NAME=tiny_model, MAX_CONCURRENCY=str(CONCURRENCY),
        LOG_FORMAT="json", RUNPOD_PING_INTERVAL="1000",
    ) as proc:  # fmt: skip
        yield queue, proc, log_path


def _logged(path: Path, msg: str, job_id: str) -> bool:
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("msg") == msg and record.get("job_id") == job_id:
                return True
    return False


def test_queued_jobs_come_back_through_job_done_never_more_than_max_concurrency_at_once(
    deployed,
):
    queue, _, log_path = deployed
    good = [image_job(max_tokens=6 + i, ignore_eos=True) for i in range(5)]
    bad = {"messages": [{"role": "bot", "content": "x"}]}
    openai = {
        "openai_route": "/v1/chat/completions",
        "openai_input": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
                         "ignore_eos": True},
    }  # fmt: skip
    ids = queue.submit([*good, bad, openai], prefix="batch")
    jobs = queue.wait(ids, timeout=240)

    assert queue.max_in_flight == CONCURRENCY, "the cap is used, and never exceeded"
    assert all(t.given <= t.asked <= CONCURRENCY for t in queue.takes)
    for i, job in enumerate(jobs[:5]):
        output = job.result["output"]
        # the aggregate (return_aggregate_stream) is what was streamed, chunk for chunk
        assert [s["output"] for s in job.stream] == output
        *text, final = output
        assert text and all(c["text"] for c in text)
        assert final["usage"]["completion_tokens"] == 6 + i
        assert final["images"][0]["original_size"] == [320, 200]
    # a bad job fails on the platform with the error object as a JSON string
    failed = jobs[5].result
    assert "output" not in failed
    error = json.loads(failed["error"])
    assert error["type"] == "invalid_input" and error["field"] == "messages[0].role"
    (answer,) = jobs[6].result["output"]
    assert answer["object"] == "chat.completion"
    assert answer["usage"]["completion_tokens"] == 5
    assert queue.pings >= 1, "the SDK's heartbeat reaches the queue"
    assert not queue.unauthorized
    assert queue.api_key not in log_path.read_text(errors="replace")


def test_a_job_runpod_cancels_is_aborted_and_frees_its_slot(deployed):
    queue, proc, log_path = deployed
    long = image_job(max_tokens=3000, ignore_eos=True)
    first, second = queue.submit([long, long], prefix="long")
    queue.wait_taken(first, 60)
    queue.wait_taken(second, 60)
    deadline = time.monotonic() + 60
    while not queue.jobs[first].stream and time.monotonic() < deadline:
        time.sleep(0.1)
    assert queue.jobs[first].stream, "the long job streams before it is stopped"
    queue.stop(first)

    (short,) = queue.submit([image_job(max_tokens=4, ignore_eos=True)], prefix="after")
    (done,) = queue.wait([short], timeout=60)
    assert done.result["output"][-1]["usage"]["completion_tokens"] == 4
    # it ran in the slot the stopped job left, while the other long job still runs
    assert queue.jobs[second].done is None
    assert queue.jobs[first].done is None, "a stopped job posts no result"
    deadline = time.monotonic() + 10
    while not _logged(log_path, "job cancelled", first) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _logged(log_path, "job cancelled", first), log_tail(log_path)

    queue.stop(second)
    deadline = time.monotonic() + 30
    while not _logged(log_path, "job cancelled", second) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _logged(log_path, "job cancelled", second)
    assert proc.poll() is None, "stopping jobs leaves the worker serving"


def test_sigterm_stops_the_deployed_worker_cleanly(deployed):
    """RunPod scales a worker down with SIGTERM: the SDK's loop ends, the engine stops,
    and that is not reported as an engine death (nor exits as one). Runs last."""
    _queue, proc, log_path = deployed
    began = time.monotonic()
    proc.terminate()
    assert proc.wait(timeout=90) == 0, log_tail(log_path)
    # the SDK's heartbeat child inherits the SIGTERM handler; it must not stop a copy of
    # the engine (a minute's wait on a loop thread the fork lacks) and delay the exit
    assert time.monotonic() - began < 40, log_tail(log_path)
    text = log_path.read_text(errors="replace")
    assert "engine is dead" not in text, log_tail(log_path)
    assert "engine shutdown raised" not in text, log_tail(log_path)
    assert "SIGTERM: stopping the engine" in text or "Received shutdown signal" in text
