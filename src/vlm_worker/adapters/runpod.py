"""The runpod SDK's internals the worker relies on. Checked against runpod 1.10.0.

* ``runpod.serverless.modules.worker_state.JobsProgress`` and ``Job``
  (``persist_job_ids_only``): the SDK's record of the jobs in progress. Its
  ``_save_state`` and ``_load_state`` are replaced.

Why: on a deployed worker (RunPod's job queue, not the local ``/runsync`` server),
``JobsProgress`` saves itself to ``.runpod_jobs.pkl`` in the working directory on every
job taken and every job finished. It does this so that the heartbeat, a separate process,
can report the ids in progress, and it re-reads the file before every job-take. It
pickles whole jobs, inputs included. With screenshots sent as base64 (megabytes each),
every job's start and end wrote the input of every job in flight, and every take read it
all back. That ran on the event loop that every stream waits on, and halved a GPU's
throughput (``docs/decisions/0011-job-state-ids-only.md``). Readers of the file use
only ids, so the file now holds ids alone. Jobs keep their inputs in memory: the local
server's ``/run`` stores a job there and ``/stream`` reads it back.
"""

from __future__ import annotations

from typing import Any

from runpod.serverless.modules import worker_state

CHECKED_AGAINST = "1.10.0"


def persist_job_ids_only() -> None:
    """Make the SDK's job-state file hold job ids, not jobs. Idempotent."""
    cls: Any = worker_state.JobsProgress
    if getattr(cls, "_vlm_worker_ids_only", False):
        return
    save, load = cls._save_state, cls._load_state

    def save_ids(self: Any) -> None:
        held = set(self)
        set.clear(self)
        set.update(self, {worker_state.Job(id=job.id) for job in held})
        try:
            save(self)
        finally:
            set.clear(self)
            set.update(self, held)

    def load_keeping_inputs(self: Any) -> None:
        held = {job.id: job for job in self}
        load(self)
        loaded = set(self)
        set.clear(self)
        set.update(self, {held.get(job.id, job) for job in loaded})

    cls._save_state, cls._load_state = save_ids, load_keeping_inputs
    cls._vlm_worker_ids_only = True
