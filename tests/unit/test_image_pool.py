"""Image work in worker processes: same pixels as in-process, errors intact, crashes contained.

The pool here is real (spawned processes running the real decode and resize with the tiny
model's processor); only ``crash_on_marker`` stands in for a decoder that segfaults.
"""

from __future__ import annotations

import asyncio
import base64
import os
import pickle
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pytest

from support.fakes import CRASH_MARKER, crash_on_marker
from support.jobs import data_uri, encode, screenshot
from vlm_worker.config.settings import WorkerSettings
from vlm_worker.contract.errors import ImageDecodeError, InvalidInput, PromptTooLong, WorkerError
from vlm_worker.media.geometry import ImageGeometry
from vlm_worker.media.images import ImageLimits, PreparedImage, prepare_source
from vlm_worker.pipeline.image_pool import ImagePool, default_processes, image_pool, torch_threads

GEOMETRY = ImageGeometry(max_pixels=1003520)
LIMITS = ImageLimits(max_bytes=8 << 20, max_source_pixels=50_000_000)


@pytest.fixture(scope="module")
def pool(processor: Any) -> Any:
    workers = ImagePool(processes=2, threads=None, fn=crash_on_marker)
    workers.spawn()
    workers.start(GEOMETRY, processor.image_processor)
    yield workers
    workers.shutdown()


def prepare(workers: ImagePool, processor: Any, source: str | bytes, **kw: Any) -> Any:
    return asyncio.run(
        workers.prepare(
            source,
            field=kw.get("field", "messages[0].content[0]"),
            geometry=kw.get("geometry", GEOMETRY),
            processor=processor.image_processor,
            limits=kw.get("limits", LIMITS),
        )
    )


@pytest.mark.parametrize(
    ("cores", "processes", "threads"),
    [(1, 0, 1), (2, 0, 1), (3, 0, 1), (4, 2, 1), (8, 4, 2), (16, 8, 4), (64, 8, 16)],
)
def test_process_and_thread_counts_follow_the_cores(cores, processes, threads):
    assert default_processes(cores) == processes
    assert torch_threads(cores) == threads


def test_settings_choose_the_mode():
    threads = image_pool(WorkerSettings(preprocess_processes=0))
    threads.shutdown()
    assert threads.mode == "threads"
    two = image_pool(WorkerSettings(preprocess_processes=2))
    try:
        assert two.mode == "2 processes"
    finally:
        two.shutdown()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="nice is per thread on Linux")
def test_image_threads_run_at_lower_priority_than_the_worker():
    """Only the image threads: the event loop and the prompt threads keep the worker's."""
    import threading

    from vlm_worker.pipeline.image_pool import NICENESS

    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    workers = image_pool(WorkerSettings(preprocess_processes=0, preprocess_threads=2))
    try:
        mine = nice()
        assert workers.threads.submit(nice).result() == min(19, mine + NICENESS)
        assert nice() == mine
        assert ThreadPoolExecutor(1).submit(nice).result() == mine
    finally:
        workers.shutdown()


def test_start_runs_every_process(pool):
    pids = pool.pids()
    assert len(pids) == 2
    assert all(psutil.Process(p).is_running() for p in pids)


def test_image_processes_yield_the_cpu_to_streams_and_the_engine(pool):
    """Lower priority (``NICENESS``) than the worker process that streams the tokens."""
    from vlm_worker.pipeline.image_pool import NICENESS

    mine = psutil.Process().nice()
    assert [psutil.Process(p).nice() for p in pool.pids()] == [min(19, mine + NICENESS)] * 2
    # every thread of theirs (Linux keeps nice per thread), torch's pool included
    threads = [t.id for p in pool.pids() for t in psutil.Process(p).threads()]
    assert len(threads) > 2
    assert {os.getpriority(os.PRIO_PROCESS, t) for t in threads} == {min(19, mine + NICENESS)}


@pytest.mark.parametrize(
    "source",
    [
        data_uri(screenshot(1280, 720, 1)),  # resized: 1288x728
        base64.b64encode(encode(screenshot(640, 480, 2), "JPEG", quality=80)).decode(),
        encode(screenshot(300, 200, 3), "PNG"),  # bytes, as a fetched URL arrives
        data_uri(screenshot(28 * 20, 28 * 10, 4)),  # already the processor's size
    ],
    ids=["png-data-uri", "jpeg-raw-base64", "fetched-bytes", "fixed-point"],
)
def test_a_process_gives_the_same_image_as_this_process(pool, processor, source, monkeypatch):
    from vlm_worker.pipeline import pixel_files

    received = []
    real = pixel_files.receive

    def counting(*args: Any) -> Any:
        received.append(args[0])
        return real(*args)

    monkeypatch.setattr(pixel_files, "receive", counting)  # unpickling looks it up by name
    local = prepare_source(
        source,
        field="f",
        geometry=GEOMETRY,
        processor=processor.image_processor,
        limits=LIMITS,
    )
    remote = prepare(pool, processor, source, field="f")
    assert remote.image.mode == local.image.mode == "RGB"
    assert remote.image.size == local.image.size == remote.resized_size
    assert remote.image.tobytes() == local.image.tobytes()
    assert (remote.original_size, remote.format, remote.nbytes, remote.sha256) == (
        local.original_size,
        local.format,
        local.nbytes,
        local.sha256,
    )
    assert remote.content_id == local.content_id
    # the pixels came back through a file in /dev/shm, which is gone
    assert len(received) == 1 and not os.path.exists(received[0])


def leftover_files() -> list[str]:
    """Pixel and source files whose owner is this process (the image processes' parent)."""
    from vlm_worker.pipeline import pixel_files

    return [
        p.name
        for prefix in (pixel_files.PREFIX, pixel_files.SOURCE_PREFIX)
        for p in pixel_files.SHM_DIR.glob(f"{prefix}{os.getpid()}-*")
    ]


def noise(width: int, height: int, seed: int) -> Any:
    """Random pixels: ~3 bytes per pixel as PNG, as large as real screenshots' files."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8))


@pytest.mark.parametrize("as_bytes", [False, True], ids=["data-uri", "fetched-bytes"])
def test_a_large_source_reaches_the_process_through_a_file(pool, processor, monkeypatch, as_bytes):
    from vlm_worker.pipeline import pixel_files

    png = encode(noise(640, 480, 7), "PNG")
    source = png if as_bytes else data_uri(noise(640, 480, 7))
    assert len(source) > pixel_files.SOURCE_MIN_BYTES
    written = []
    real = pixel_files._write_new

    def spying(path: Any, data: Any) -> None:
        written.append(path)
        real(path, data)

    monkeypatch.setattr(pixel_files, "_write_new", spying)  # the feeder thread looks it up
    local = prepare_source(
        source, field="f", geometry=GEOMETRY, processor=processor.image_processor, limits=LIMITS
    )
    remote = prepare(pool, processor, source, field="f")
    assert remote.image.tobytes() == local.image.tobytes()
    assert remote.sha256 == local.sha256 and remote.nbytes == len(png)
    sources = [p for p in written if p.name.startswith(pixel_files.SOURCE_PREFIX)]
    assert len(sources) == 1 and not sources[0].exists()
    assert leftover_files() == []


def test_through_the_pipe_when_asked(pool, processor):
    pool.ship_pixels = False
    try:
        remote = prepare(pool, processor, data_uri(screenshot(1280, 720, 1)))
    finally:
        pool.ship_pixels = True
    assert remote.image.size == (1288, 728)


def test_jobs_cancelled_while_their_image_is_prepared_leave_no_file(pool, processor):
    async def cancel_midway() -> None:
        tasks = [
            asyncio.ensure_future(
                pool.prepare(
                    data_uri(noise(1280, 720, seed)),  # sent through a file as well
                    field="f",
                    geometry=GEOMETRY,
                    processor=processor.image_processor,
                    limits=LIMITS,
                )
            )
            for seed in range(4)
        ]
        await asyncio.sleep(0.01)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(cancel_midway())
    # The images finish in their processes all the same, and their pixels are read when
    # each result arrives. A later job can overtake them on the other process (CI once
    # saw a file left after two more jobs), so this waits until the executor has taken
    # in every result (CPython drops a work item only after unpickling its result).
    prepare(pool, processor, data_uri(screenshot(64, 48, 9)))
    deadline = time.monotonic() + 30
    while pool._pool._pending_work_items and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pool._pool._pending_work_items, "the cancelled images never finished"
    assert leftover_files() == []


@pytest.mark.parametrize(
    ("source", "limits", "kind", "words"),
    [
        ("data:image/png;base64,@@@@", LIMITS, InvalidInput, "base64 is invalid"),
        (
            data_uri(screenshot(64, 64)),
            ImageLimits(max_bytes=100, max_source_pixels=10**8),
            InvalidInput,
            "MAX_IMAGE_BYTES=100",
        ),
        (
            base64.b64encode(b"GIF89a not really").decode(),
            LIMITS,
            ImageDecodeError,
            "not a supported image",
        ),
        (
            data_uri(screenshot(400, 300)),
            ImageLimits(max_bytes=8 << 20, max_source_pixels=1000),
            ImageDecodeError,
            "MAX_IMAGE_SOURCE_PIXELS=1000",
        ),
    ],
    ids=["bad-base64", "too-many-bytes", "not-an-image", "too-many-pixels"],
)
def test_errors_cross_the_process_boundary_intact(pool, processor, source, limits, kind, words):
    with pytest.raises(kind, match=words) as info:
        prepare(pool, processor, source, limits=limits, field="messages[1].content[0]")
    assert info.value.field == "messages[1].content[0]"


def test_worker_errors_pickle_with_type_field_and_message():
    for err in (
        InvalidInput("bad", field="messages"),
        PromptTooLong("long", field=None),
        WorkerError("x"),
    ):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err)
        assert back.to_dict() == err.to_dict()


def test_a_crashing_image_fails_alone_and_the_pool_recovers(pool, processor):
    good = [data_uri(screenshot(200 + 8 * i, 150, i)) for i in range(3)]

    async def run() -> list[Any]:
        jobs = [CRASH_MARKER, *good]
        return await asyncio.gather(
            *(
                pool.prepare(
                    s,
                    field=f"job{i}",
                    geometry=GEOMETRY,
                    processor=processor.image_processor,
                    limits=LIMITS,
                )
                for i, s in enumerate(jobs)
            ),
            return_exceptions=True,
        )

    before = pool.restarts
    crashed, *fine = asyncio.run(run())
    assert isinstance(crashed, ImageDecodeError)
    assert crashed.field == "job0" and "crashed the image worker process" in crashed.message
    assert [r.original_size for r in fine] == [(200, 150), (208, 150), (216, 150)]
    assert pool.restarts == before + 1
    # the replacement pool serves the next image
    assert prepare(pool, processor, good[0]).original_size == (200, 150)


def test_content_id_names_bytes_and_target_size(processor):
    uri = data_uri(screenshot(1280, 720))
    kw = {"field": "f", "processor": processor.image_processor, "limits": LIMITS}
    a = prepare_source(uri, geometry=GEOMETRY, **kw)
    b = prepare_source(uri, geometry=GEOMETRY, **kw)
    small = prepare_source(uri, geometry=replace(GEOMETRY, max_pixels=200_000), **kw)
    assert a.content_id == b.content_id == f"{a.sha256}-1288x728"
    assert small.content_id != a.content_id
    # an image the processor would not keep at the target size goes to vLLM unresized,
    # and its id says so
    strip = prepare_source(data_uri(screenshot(100, 19000)), geometry=GEOMETRY, **kw)
    assert strip.resized_size == (56, 13804)
    assert strip.image.size == (100, 19000) and strip.content_id.endswith("-original")


def test_shutdown_stops_the_processes(processor):
    workers = ImagePool(processes=1, threads=None)
    workers.start(GEOMETRY, processor.image_processor)
    (pid,) = workers.pids()
    workers.shutdown()
    assert not psutil.pid_exists(pid)


class CountingThreads(ThreadPoolExecutor):
    def __init__(self) -> None:
        super().__init__(1)
        self.calls = 0

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return super().submit(*args, **kwargs)


def test_a_job_alone_is_prepared_in_a_thread_others_in_processes(processor):
    threads = CountingThreads()
    workers = ImagePool(processes=1, threads=threads)
    workers.start(GEOMETRY, processor.image_processor)
    uri = data_uri(screenshot(200, 120))

    def run(alone: bool) -> Any:
        return asyncio.run(
            workers.prepare(
                uri,
                field="f",
                geometry=GEOMETRY,
                processor=processor.image_processor,
                limits=LIMITS,
                alone=alone,
            )
        )

    try:
        by_thread, by_process = run(True), run(False)
        assert threads.calls == 1
        assert by_thread.image.tobytes() == by_process.image.tobytes()
        workers.threads_when_alone = False
        run(True)
        assert threads.calls == 1
    finally:
        workers.shutdown()
        threads.shutdown()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGKILL and reparenting")
def test_image_processes_exit_when_the_worker_is_killed(tmp_path):
    """A worker killed without shutting its pool down (the OOM killer) leaves no processes."""
    import signal
    import subprocess
    import textwrap

    pids = tmp_path / "pids"
    script = textwrap.dedent(
        f"""
        import os, signal
        from vlm_worker.pipeline.image_pool import ImagePool

        workers = ImagePool(processes=1, threads=None)
        workers.spawn()
        with open({str(pids)!r}, "w") as f:
            print(*[future.result() for future in workers._spawned], file=f)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    # no pipes: an image process that outlived the worker would hold them open forever
    done = subprocess.run(
        [sys.executable, "-c", script],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=120,
    )
    assert done.returncode == -signal.SIGKILL
    (pid,) = pids.read_text().split()
    try:
        child = psutil.Process(int(pid))
    except psutil.NoSuchProcess:
        return  # already gone
    gone, alive = psutil.wait_procs([child], timeout=30)
    if alive:
        child.kill()
    assert gone, "the image process outlived its killed worker"


def test_a_decode_past_its_deadline_is_stopped_and_the_others_carry_on(processor):
    """A decoder that never returns (a scan bomb, say): its process is killed at
    IMAGE_DECODE_TIMEOUT, the job fails by name, and a job queued behind it in the same
    pool still gets its image (retried alone, as after a crash)."""
    from support.fakes import HANG_MARKER

    workers = ImagePool(processes=1, threads=None, fn=crash_on_marker, decode_timeout=1.0)
    workers.spawn()
    workers.start(GEOMETRY, processor.image_processor)
    try:
        (stuck_pid,) = workers.pids()

        async def both() -> list[Any]:
            kwargs = {"geometry": GEOMETRY, "processor": processor.image_processor}
            hang = workers.prepare(HANG_MARKER, field="messages[0]", limits=LIMITS, **kwargs)
            good = workers.prepare(data_uri(), field="messages[1]", limits=LIMITS, **kwargs)
            return await asyncio.gather(hang, good, return_exceptions=True)

        started = time.monotonic()
        stuck, good = asyncio.run(both())
        assert isinstance(stuck, ImageDecodeError) and stuck.field == "messages[0]"
        assert "IMAGE_DECODE_TIMEOUT=1s" in stuck.message
        assert isinstance(good, PreparedImage), good
        assert time.monotonic() - started < 60  # the deadline, then one solo process start
        assert not psutil.pid_exists(stuck_pid) and workers.restarts == 1
        assert not list(Path("/dev/shm").glob(f"vlm-worker-claim-{os.getpid()}-*"))
    finally:
        workers.shutdown()


def test_a_pixel_file_that_cannot_be_read_fails_its_own_job_only(pool, processor):
    from support.fakes import LOST_PIXELS_MARKER

    restarts = pool.restarts
    with pytest.raises(ImageDecodeError, match="pixels could not be read back") as lost:
        prepare(pool, processor, LOST_PIXELS_MARKER, field="messages[0].content[2]")
    assert lost.value.field == "messages[0].content[2]"
    assert pool.restarts == restarts  # the pool did not break: other jobs were untouched
    assert prepare(pool, processor, data_uri()).image.size == (308, 196)


def test_files_of_a_call_whose_process_died_are_removed(pool, processor):
    from support.fakes import SHIP_AND_DIE_MARKER

    with pytest.raises(ImageDecodeError, match="crashed the image worker process"):
        prepare(pool, processor, SHIP_AND_DIE_MARKER)
    assert not list(Path("/dev/shm").glob(f"vlm-worker-pixels-{os.getpid()}-*"))
    assert not list(Path("/dev/shm").glob(f"vlm-worker-claim-{os.getpid()}-*"))


def test_a_running_worker_sweeps_its_own_stale_files(tmp_path):
    from vlm_worker.pipeline import pixel_files

    me = os.getpid()
    old = tmp_path / f"{pixel_files.PREFIX}{me}-abc"
    fresh = tmp_path / f"{pixel_files.SOURCE_PREFIX}{me}-def"
    other = tmp_path / f"{pixel_files.PREFIX}1-ghi"  # another worker's: not ours to judge
    for path in (old, fresh, other):
        path.write_bytes(b"x")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    os.utime(other, (time.time() - 3600, time.time() - 3600))
    assert pixel_files.sweep_stale(tmp_path, older_than=600) == 1
    assert not old.exists() and fresh.exists() and other.exists()
