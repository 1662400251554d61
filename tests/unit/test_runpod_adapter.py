"""The runpod SDK's job-state file holds job ids, not the jobs' inputs (adapters.runpod)."""

from __future__ import annotations

import pickle

import pytest
from runpod.serverless.modules.worker_state import JobsProgress

from vlm_worker.adapters.runpod import persist_job_ids_only


@pytest.fixture
def progress(tmp_path, monkeypatch):
    monkeypatch.setattr(JobsProgress, "_STATE_DIR", str(tmp_path))
    monkeypatch.setattr(JobsProgress, "_STATE_FILE", str(tmp_path / ".runpod_jobs.pkl"))
    persist_job_ids_only()
    persist_job_ids_only()  # idempotent: wrapping twice would still work, but once is enough
    state = JobsProgress()
    set.clear(state)
    yield state
    set.clear(state)


def test_a_taken_jobs_input_stays_in_memory_and_out_of_the_state_file(progress, tmp_path):
    screenshot = "data:image/png;base64," + "A" * 3_000_000
    for i in range(4):  # what the SDK's job loop does with each job it takes
        progress.add({"id": f"job-{i}", "input": {"messages": [screenshot]}})
    state_file = tmp_path / ".runpod_jobs.pkl"
    # a few hundred bytes for four ids, not 4 x 3 MB
    assert state_file.stat().st_size < 2_000
    with state_file.open("rb") as f:
        saved = pickle.load(f)
    assert {job.id for job in saved} == {f"job-{i}" for i in range(4)}
    assert all(job.input is None for job in saved)

    # re-reading the file (before every job-take) keeps the inputs held in memory, which
    # the local server's /run -> /stream reads back
    assert set(progress.get_job_list().split(",")) == {f"job-{i}" for i in range(4)}
    assert progress.get("job-2").input == {"messages": [screenshot]}

    progress.remove({"id": "job-2", "input": None})
    assert progress.get_job_count() == 3 and progress.get("job-2") is None
    with state_file.open("rb") as f:
        assert {job.id for job in pickle.load(f)} == {"job-0", "job-1", "job-3"}


def test_ids_another_process_saved_are_read_as_in_progress(progress, tmp_path):
    """The heartbeat process and the job loop share the file; a job only the file knows of
    is in progress."""
    progress.add("local")
    other = {job for job in progress} | {type(next(iter(progress)))(id="elsewhere")}
    with (tmp_path / ".runpod_jobs.pkl").open("wb") as f:
        pickle.dump(other, f)
    assert set(progress.get_job_list().split(",")) == {"local", "elsewhere"}
