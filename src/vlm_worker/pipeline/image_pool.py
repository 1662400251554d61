"""Where images are decoded and resized: worker processes, or threads on small machines.

Why processes: the worker process has one GIL, shared by the RunPod handler, vLLM's
output processing (detokenizing every running request at every engine step) and the
image work. Much of that work holds the GIL even in C: base64, Pillow's PNG decode loop
re-taking it for every chunk, the PIL-to-tensor copy, and a streaming job's chunks wait
behind it. A child process does all of it and sends back only the resized RGB pixels.
The source goes there and the pixels come back through files in ``/dev/shm``
(``pixel_files``), so this process copies neither while holding the GIL. The
measurements behind this: ``docs/decisions/0001-image-processes.md``.

A job alone on the worker is prepared in a thread all the same: with no other job's
stream to protect, the round trip to a process (pickling, pipes, thread hand-offs) would
only add to its time to first token. The
price: a decoder crash on such a job takes the worker down (RunPod restarts it) instead
of failing only that job.

A child that dies (a decoder crash, the OOM killer) breaks a ``ProcessPoolExecutor`` for
every job in it; the pool is replaced and each of those jobs retried alone in a new
process, so one bad image costs its own job an error and the others a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any

from PIL import Image

from vlm_worker.adapters.cpython import pool_pids
from vlm_worker.adapters.transformers import warm_imports
from vlm_worker.contract.errors import ImageDecodeError, VideoDecodeError
from vlm_worker.media.geometry import ImageGeometry
from vlm_worker.media.images import ImageLimits, PreparedImage, prepare_source
from vlm_worker.pipeline import pixel_files
from vlm_worker.pipeline.hooks import NO_HOOKS, PipelineHooks, PrepareFn

if TYPE_CHECKING:  # imported where used: numpy would start its threads before ``nice``
    from vlm_worker.media.video import PreparedVideo, VideoLimits

log = logging.getLogger("vlm_worker.pipeline.image_pool")


def default_processes(cpu_count: int | None = None) -> int:
    """Half the cores, at most 8, from 4 cores up; 0 (threads) below.

    On 2 cores the engine (or the CUDA driver's threads) already takes the machine: extra
    interpreters, each importing torch, would buy no parallelism.
    """
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    return 0 if cores < 4 else min(8, cores // 2)


def torch_threads(cpu_count: int | None = None) -> int:
    """Intra-op threads for one resize: a quarter of the cores.

    With torch's default of one thread per core, every concurrent job's resize would fan
    out over all cores at once and thrash; a quarter per resize keeps a single 4K image
    fast and lets several resize side by side.
    """
    return max(1, (cpu_count if cpu_count is not None else (os.cpu_count() or 1)) // 4)


#: How much lower the image processes' CPU priority is than the worker's (``nice``).
#: Streams and the engine are latency work; preparing a new job's image is throughput
#: work that can wait a few milliseconds for them (the streams' gaps it saved:
#: ``docs/decisions/0001-image-processes.md``). Lowering one's own priority needs no
#: privilege.
NICENESS = 10

#: How long the image processes may take to import and warm up at start.
START_TIMEOUT_S = 300.0


def lower_thread_priority() -> None:
    """Thread-pool initializer: the calling thread, alone, at ``nice`` +``NICENESS``.

    For images prepared in threads (small machines, ``PREPROCESS_PROCESSES=0``, and a job
    alone): the same rule as for image processes, streams and the engine first. It
    matters more since libpng decodes with the GIL released, so image threads now take
    whole cores (what was and was not shown: ``docs/benchmarks.md``). Linux keeps a nice
    value per thread; elsewhere this does nothing rather than lower the whole process.
    """
    if not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    with contextlib.suppress(OSError):
        os.setpriority(
            os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + NICENESS)
        )


def thread_count(settings: Any) -> int:
    """``PREPROCESS_THREADS``, unset: one per core (at least 2); for prompts and for images."""
    return settings.preprocess_threads or max(2, os.cpu_count() or 2)


def image_threads(count: int) -> ThreadPoolExecutor:
    """Threads for image work, each at lower priority (``lower_thread_priority``)."""
    return ThreadPoolExecutor(
        max_workers=count, thread_name_prefix="vlm-img", initializer=lower_thread_priority
    )


def _init_child(threads: int) -> None:
    """Runs once per worker process: the imports the image path needs (seconds).

    ``nice`` first: Linux keeps it per thread, and a thread takes its creator's, so the
    threads that the imports and torch's thread pool start after it inherit it too.
    """
    os.nice(NICENESS)
    worker = os.getppid()
    pixel_files.owner_pid = worker
    threading.Thread(
        target=_exit_with_parent, args=(worker,), name="parent-watch", daemon=True
    ).start()
    import torch
    import torchvision.transforms.v2.functional  # noqa: F401

    warm_imports()
    torch.set_num_threads(threads)


#: How often an image process checks that the worker still runs.
PARENT_CHECK_S = 1.0


def _exit_with_parent(parent: int) -> None:
    """Exit once the worker process is gone, however it went.

    A pool's processes wait for work on a pipe that each of them also holds open for
    writing, so a worker killed without shutting its pool down (SIGKILL, the OOM killer)
    would leave them waiting forever, each holding its memory (seen on the CPU machine).
    """
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(0)


def _pid() -> int:
    return os.getpid()


#: How often a running worker sweeps its own stale files out of ``/dev/shm``.
SWEEP_EVERY_S = 60.0


def _checked(result: Any, field: str, what: str) -> Any:
    """A result whose pixel file could not be read fails its own job, by name."""
    if isinstance(getattr(result, "image", None), pixel_files.UnreadPixels):
        error = VideoDecodeError if what == "video" else ImageDecodeError
        raise error(
            f"the {what}'s pixels could not be read back from its image process "
            f"({result.image.reason})",
            field=field,
        )
    return result


def _claimed(call_id: str, work: Callable[[], Any]) -> Any:
    """Runs in an image process: ``work`` under a claim naming this process and the time,
    so the worker can stop it at its deadline (``pixel_files.claim``)."""
    with pixel_files.claim(call_id):
        return work()


def _in_process(
    fn: PrepareFn, source: str | bytes | pixel_files.IncomingSource, ship: bool, **kwargs: Any
) -> PreparedImage:
    """Runs in an image process: the source read from ``/dev/shm`` if it was sent that
    way, the work, and its pixels sent back the same way (``pixel_files`` says why)."""
    if isinstance(source, pixel_files.IncomingSource):
        source = source.read()
    prepared = fn(source, **kwargs)
    if not ship or not isinstance(prepared.image, Image.Image):
        return prepared
    return dataclasses.replace(prepared, image=pixel_files.ship(prepared.image))


def _warm(geometry: ImageGeometry | None, processor: Any) -> int:
    """Run the whole path on a screenshot-sized image, twice, in each process.

    Proves every process can prepare an image before the worker takes jobs, and moves
    its first-use costs (allocator arenas, page faults on multi-MB buffers, torch's first
    resize at that size) out of the first jobs. The pause spreads a round of these tasks
    over the processes that are up. (The slow first busy round the H100 benchmark once
    showed was not here: it was vLLM's tokenizer pool, see ``model_info.text_encoder``.)
    """
    import io

    from PIL import Image, ImageDraw

    img = Image.new("RGB", (1920, 1080), (236, 238, 242))
    draw = ImageDraw.Draw(img)
    for i in range(12):
        draw.rectangle([60 + 150 * i, 90, 180 + 150 * i, 700], fill=(40 + 15 * i, 120, 200))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    started = time.monotonic()
    for _ in range(2):
        prepare_source(
            buf.getvalue(),
            field="warmup",
            geometry=geometry,
            processor=processor,
            limits=ImageLimits(64 << 20, 1 << 24),
        )
    time.sleep(max(0.0, 0.3 - (time.monotonic() - started)))
    return os.getpid()


class ImagePool:
    """Runs ``prepare_source`` off the event loop, in processes (``processes > 0``) or
    in ``threads``; the job runner awaits ``prepare`` and never sees which."""

    def __init__(
        self,
        *,
        processes: int,
        threads: Executor | None,
        fn: PrepareFn = prepare_source,
        torch_threads_per_process: int | None = None,
        threads_when_alone: bool = True,
        owns_threads: bool = False,
        hooks: PipelineHooks = NO_HOOKS,
        decode_timeout: float | None = None,
    ) -> None:
        self.processes = processes
        #: Seconds one call may run in an image process (IMAGE_DECODE_TIMEOUT); None: no
        #: limit. Threads cannot be stopped, so calls in threads have none.
        self.decode_timeout = decode_timeout
        self.hooks = hooks
        self.threads = threads
        self._owns_threads = owns_threads
        self.fn = fn
        self.threads_when_alone = threads_when_alone
        #: Pixels come back from image processes through /dev/shm (False: the pipe).
        self.ship_pixels = True
        #: Large sources go to image processes through /dev/shm (False: the pipe).
        self.ship_sources = True
        self._torch_threads = torch_threads_per_process or torch_threads()
        self._lock = threading.Lock()
        if processes:
            pixel_files.sweep()  # files of a worker that was killed mid-transfer
        self._pool: ProcessPoolExecutor | None = self._new_pool() if processes else None
        self._spawned: list[Any] = []
        self.restarts = 0
        self._swept = time.monotonic()

    @property
    def mode(self) -> str:
        return f"{self.processes} processes" if self.processes else "threads"

    def _new_pool(self, processes: int | None = None) -> ProcessPoolExecutor:
        # spawn, never fork: the parent holds CUDA state and many threads.
        return ProcessPoolExecutor(
            max_workers=processes or self.processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_child,
            initargs=(self._torch_threads,),
        )

    def spawn(self) -> None:
        """Start every worker process now, without waiting: they import torch while the
        engine loads. (The pool would otherwise start them one by one as work arrives.)"""
        if self._pool is not None:
            self._spawned = [self._pool.submit(_pid) for _ in range(self.processes)]

    def start(self, geometry: ImageGeometry | None, processor: Any) -> list[int]:
        """Wait for the worker processes and run an image through the pool, so a broken
        set-up (an unpicklable processor, a missing import) fails the start, not a job.
        Returns the workers' pids."""
        if self._pool is None:
            return []
        if not self._spawned:
            self.spawn()
        for future in self._spawned:
            future.result()
        # Until every process has warmed up: one still importing torch takes no task, so
        # a round can land wholly on those already up (and a pid that ran a task has run
        # its initializer: its imports and ``nice``).
        warmed: set[int] = set()
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(warmed) < self.processes:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(warmed)} of {self.processes} image processes started within "
                    f"{START_TIMEOUT_S:g} s"
                )
            rounds = [self._pool.submit(_warm, geometry, processor) for _ in range(self.processes)]
            warmed.update(future.result() for future in rounds)
        return self.pids()

    async def prepare(
        self,
        source: str | bytes,
        *,
        field: str,
        geometry: ImageGeometry | None,
        processor: Any,
        limits: ImageLimits,
        alone: bool = False,
    ) -> PreparedImage:
        """``alone``: no other job is running, so a thread is the faster place."""
        loop = asyncio.get_running_loop()
        kwargs = {"field": field, "geometry": geometry, "processor": processor, "limits": limits}
        fn = self.hooks.image_function() or self.fn
        if self._pool is None or (alone and self.threads_when_alone):
            return await loop.run_in_executor(self.threads, functools.partial(fn, source, **kwargs))
        sent = pixel_files.outgoing(source) if self.ship_sources else None
        work = functools.partial(_in_process, fn, sent or source, self.ship_pixels, **kwargs)
        try:
            return await self._in_pool(work, field)
        finally:
            if sent is not None:
                sent.discard()

    async def prepare_video(
        self, source: str | bytes, *, field: str, limits: VideoLimits, alone: bool = False
    ) -> PreparedVideo:
        """A video sampled and decoded as ``prepare_image`` is: in a process, or a thread
        when alone. Its frames come back pickled: a video's sampled frames are what vLLM
        gets, with no resize of ours to spare them."""
        from vlm_worker.media.video import prepare_video

        loop = asyncio.get_running_loop()
        work = functools.partial(prepare_video, source, field=field, limits=limits)
        if self._pool is None or (alone and self.threads_when_alone):
            return await loop.run_in_executor(self.threads, work)
        return await self._in_pool(work, field, "video")

    async def _in_pool(self, work: Callable[[], Any], field: str, what: str = "image") -> Any:
        pool = self._pool
        assert pool is not None
        try:
            return await self._run(pool, work, field, what)
        except BrokenProcessPool:
            self._replace(pool)
        # Every job in a broken pool fails, not only the one whose image killed it; each
        # is retried alone, so only the culprit kills its process again.
        log.warning(f"image worker process died; retrying the {what} alone", extra={"field": field})
        solo = self._new_pool(1)
        try:
            return await self._run(solo, work, field, what)
        except BrokenProcessPool:
            error = VideoDecodeError if what == "video" else ImageDecodeError
            raise error(
                f"the {what} could not be decoded: it crashed the image worker process",
                field=field,
            ) from None
        finally:
            solo.shutdown(wait=False, cancel_futures=True)

    async def _run(
        self, pool: ProcessPoolExecutor, work: Callable[[], Any], field: str, what: str
    ) -> Any:
        """``work`` in ``pool``; past ``decode_timeout`` from when a process took it (not
        from when it was queued), that process is killed and the call fails by name. The
        pool breaks with it: its other calls are retried alone (``_in_pool``)."""
        loop = asyncio.get_running_loop()
        call_id = uuid.uuid4().hex
        if time.monotonic() - self._swept > SWEEP_EVERY_S:
            self._swept = time.monotonic()
            pixel_files.sweep_stale()
        future = loop.run_in_executor(pool, functools.partial(_claimed, call_id, work))
        try:
            if self.decode_timeout is None:
                return _checked(await future, field, what)
            while True:
                done, _ = await asyncio.wait({future}, timeout=self.decode_timeout / 4)
                if done:
                    return _checked(future.result(), field, what)
                claim = pixel_files.claimed(call_id)
                if claim is None or time.time() - claim[1] <= self.decode_timeout:
                    continue
                pid = claim[0]
                if pid in pool_pids(pool):  # a process of this pool, never another
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                future.cancel()
                if pool is self._pool:
                    self._replace(pool)
                log.warning(
                    f"image decode deadline passed; its process was killed ({what})",
                    extra={"field": field, "pid": pid, "seconds": self.decode_timeout},
                )
                error = VideoDecodeError if what == "video" else ImageDecodeError
                raise error(
                    f"decoding the {what} took longer than IMAGE_DECODE_TIMEOUT="
                    f"{self.decode_timeout:g}s; its decoder was stopped",
                    field=field,
                )
        finally:
            pixel_files.unclaim(call_id)

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        """A new pool, once per breakage however many jobs noticed it."""
        with self._lock:
            if self._pool is broken:
                self._pool = self._new_pool()
                self.spawn()  # all of them now, not one by one as jobs arrive
                self.restarts += 1
                broken.shutdown(wait=False, cancel_futures=True)

    def pids(self) -> list[int]:
        """The live worker processes (for tests and the memory benchmark)."""
        pool = self._pool
        if pool is None:
            return []
        return pool_pids(pool)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._owns_threads and self.threads is not None:
            self.threads.shutdown(wait=False, cancel_futures=True)


def image_pool(settings: Any, hooks: PipelineHooks = NO_HOOKS) -> ImagePool:
    """The workers the settings ask for (``PREPROCESS_PROCESSES``, unset: by core count),
    with their own low-priority threads (``PREPROCESS_THREADS``, unset: one per core)."""
    processes = settings.preprocess_processes
    if processes is None:
        processes = default_processes()
    threads = image_threads(thread_count(settings))
    return ImagePool(
        processes=processes,
        threads=threads,
        owns_threads=True,
        hooks=hooks,
        decode_timeout=settings.image_decode_timeout,
    )
