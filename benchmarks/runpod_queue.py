"""RunPod's job queue, as the runpod SDK's deployed worker loop talks to it, on loopback.

A worker started with ``RUNPOD_WEBHOOK_GET_JOB`` set runs the SDK's deployed loop
(``rp_scale.JobScaler``): it long-polls job-take (the batch route when it has room for
several jobs), posts each streamed chunk to job-stream and the result to job-done,
long-polls job-stop for cancelled jobs and pings. Nothing else runs that loop off RunPod:
the SDK's local ``/runsync`` server calls the handler directly, without
``MAX_CONCURRENCY``'s cap, without the loop's one-second wait before refilling a full
worker, and without the result's trip through job-done. This fake serves those routes, so
tests and benchmarks can run the worker exactly as deployed.

The URL shapes follow what the SDK builds from RunPod's variables (``$ID`` and
``$RUNPOD_POD_ID`` substituted, ``&job_in_progress=``, ``&batch_size=`` and ``&isStream=``
appended). The server runs on its own thread and loop, so synchronous tests and asyncio
benchmarks use it alike.
"""

from __future__ import annotations

import asyncio
import collections
import json
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

HOST = "127.0.0.1"


@dataclass
class QueuedJob:
    """One job's trip through the queue; times are ``time.perf_counter()`` seconds."""

    id: str
    input: Any
    queued: float
    taken: float | None = None
    done: float | None = None
    #: What the worker posted to job-done: ``{"output": [...]}`` or ``{"error": "..."}``.
    result: dict[str, Any] | None = None
    #: Each body posted to job-stream, in order.
    stream: list[dict[str, Any]] = field(default_factory=list)
    first_stream: float | None = None


@dataclass
class Take:
    """One job-take request: when it was answered, how many jobs it asked for and got, and
    whether the worker said it had jobs in progress."""

    at: float
    asked: int
    given: int
    in_progress: bool


class RunpodQueue:
    """The queue's routes on a free loopback port; ``with RunpodQueue() as q:``."""

    def __init__(self, hold_s: float = 2.0, worker_id: str = "queue-worker") -> None:
        """``hold_s``: how long job-take and job-stop hold an empty poll open (RunPod's
        long-poll), so an idle worker does not spin."""
        self.hold_s = hold_s
        self.worker_id = worker_id
        self.api_key = "rpa_loopback_" + secrets.token_hex(12)
        #: Requests that came without the key, by path: RunPod would refuse them.
        self.unauthorized: list[str] = []
        self.jobs: dict[str, QueuedJob] = {}
        self.takes: list[Take] = []
        self.pings = 0
        self.max_in_flight = 0
        self.first_poll = threading.Event()
        self._in_flight = 0
        self._count = 0
        self._changed = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._pending: collections.deque[QueuedJob] = collections.deque()
        self._stops: list[str] = []
        self._arrived: asyncio.Condition | None = None
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="runpod-queue",
                                        daemon=True)  # fmt: skip
        self.base = ""

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> RunpodQueue:
        self._thread.start()
        self.base = self._call(self._start())
        return self

    def __exit__(self, *exc: Any) -> None:
        self._call(self._runner.cleanup() if self._runner else asyncio.sleep(0))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def env(self) -> dict[str, str]:
        """The variables RunPod gives a serverless worker, pointing at this queue."""
        tail = "?gpu=loopback"
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{self.base}/job-take/$ID{tail}",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{self.base}/job-done/$RUNPOD_POD_ID/$ID{tail}",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{self.base}/job-stream/$RUNPOD_POD_ID/$ID{tail}",
            "RUNPOD_WEBHOOK_PING": f"{self.base}/ping/$RUNPOD_POD_ID{tail}",
            "RUNPOD_POD_ID": self.worker_id,
            # the key RunPod's routes authenticate the worker with; without it the SDK
            # sends no heartbeat
            "RUNPOD_AI_API_KEY": self.api_key,
            # RunPod's own start-up checks (disk, network, a CUDA kernel) are the platform's
            # business, and the network one needs the internet.
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
            "RUNPOD_SKIP_GPU_CHECK": "true",
        }

    # --------------------------------------------------------------------- driving
    def submit(self, inputs: list[Any], prefix: str = "job") -> list[str]:
        """Queue one job per input, all at the same instant; returns their ids."""
        return self._call(self._submit(inputs, prefix))

    def stop(self, job_id: str) -> None:
        """Signal the worker to stop ``job_id`` (RunPod's cancel), through job-stop."""
        self._call(self._add_stop(job_id))

    def wait(self, ids: list[str], timeout: float) -> list[QueuedJob]:
        """The jobs once every one has a result; TimeoutError naming how many are missing."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                missing = [i for i in ids if self.jobs[i].done is None]
                if not missing:
                    return [self.jobs[i] for i in ids]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(missing)} of {len(ids)} jobs have no result "
                                       f"after {timeout} s (first: {missing[0]})")  # fmt: skip
                self._changed.wait(left)

    def wait_taken(self, job_id: str, timeout: float) -> QueuedJob:
        """The job once the worker has taken it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.jobs[job_id].taken is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{job_id} not taken after {timeout} s")
                self._changed.wait(left)
            return self.jobs[job_id]

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # ------------------------------------------------------------------- internals
    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    async def _start(self) -> str:
        self._arrived = asyncio.Condition()
        app = web.Application(client_max_size=64 * 1024**2, middlewares=[self._auth])
        app.router.add_get("/job-take/{worker}", self._take)
        app.router.add_get("/job-take-batch/{worker}", self._take)
        app.router.add_get("/job-stop/{worker}", self._stop_poll)
        app.router.add_post("/job-done/{worker}/{job}", self._done)
        app.router.add_post("/job-stream/{worker}/{job}", self._stream)
        app.router.add_get("/ping/{worker}", self._ping)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind((HOST, 0))
        await web.SockSite(self._runner, sock).start()
        return f"http://{HOST}:{sock.getsockname()[1]}"

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.headers.get("Authorization") != self.api_key:
            self.unauthorized.append(request.path)
            return web.Response(status=401)
        return await handler(request)

    async def _submit(self, inputs: list[Any], prefix: str) -> list[str]:
        assert self._arrived is not None
        now = time.perf_counter()
        ids = []
        async with self._arrived:
            for payload in inputs:
                self._count += 1
                job = QueuedJob(f"{prefix}-{self._count}", payload, now)
                self.jobs[job.id] = job
                self._pending.append(job)
                ids.append(job.id)
            self._arrived.notify_all()
        return ids

    async def _take(self, request: web.Request) -> web.Response:
        assert self._arrived is not None
        self.first_poll.set()
        batch = request.path.startswith("/job-take-batch/")
        asked = int(request.query.get("batch_size", "1")) if batch else 1
        async with self._arrived:
            try:
                await asyncio.wait_for(self._arrived.wait_for(lambda: bool(self._pending)),
                                       self.hold_s)  # fmt: skip
            except asyncio.TimeoutError:
                return web.Response(status=204)
            jobs = [self._pending.popleft() for _ in range(min(asked, len(self._pending)))]
        now = time.perf_counter()
        with self._changed:
            for job in jobs:
                job.taken = now
            self._in_flight += len(jobs)
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            self.takes.append(Take(now, asked, len(jobs),
                                   request.query.get("job_in_progress") == "1"))  # fmt: skip
            self._changed.notify_all()
        bodies = [{"id": j.id, "input": j.input} for j in jobs]
        return web.json_response(bodies if batch else bodies[0])

    async def _add_stop(self, job_id: str) -> None:
        assert self._arrived is not None
        async with self._arrived:
            self._stops.append(job_id)
            self._arrived.notify_all()

    async def _stop_poll(self, request: web.Request) -> web.Response:
        assert self._arrived is not None
        async with self._arrived:
            try:
                await asyncio.wait_for(self._arrived.wait_for(lambda: bool(self._stops)),
                                       self.hold_s)  # fmt: skip
            except asyncio.TimeoutError:
                return web.Response(status=204)
            ids, self._stops = self._stops, []
        return web.json_response({"jobsToStop": ids})

    async def _done(self, request: web.Request) -> web.Response:
        body = json.loads(await request.text())
        job = self.jobs[request.match_info["job"]]
        with self._changed:
            if job.done is None:
                self._in_flight -= 1
            job.done, job.result = time.perf_counter(), body
            self._changed.notify_all()
        return web.Response(text="ok")

    async def _stream(self, request: web.Request) -> web.Response:
        body = json.loads(await request.text())
        job = self.jobs[request.match_info["job"]]
        with self._changed:
            job.first_stream = job.first_stream or time.perf_counter()
            job.stream.append(body)
        return web.Response(text="ok")

    async def _ping(self, request: web.Request) -> web.Response:
        self.pings += 1
        return web.Response(text="ok")
