"""Large payloads between the worker and its image processes, through files in ``/dev/shm``.

Both ways, a ``ProcessPoolExecutor`` would pickle the payload into one pipe shared by
every process, in a thread of the worker that holds the GIL for the whole pickle and
re-takes it for each 64 KB write. Through a file in RAM the pipe carries a path, and the
worker's side of the copy is one ``write`` or ``read`` with the GIL released.

**Sources out** (``OutgoingSource``). A job's image as it came: a data URI of megabytes
for a 4K screenshot. Pickling it held the GIL (the pool's queue-feeder thread was the
largest holder while such jobs were handed out), and a streaming job's chunks waited
behind it. The file is written from the ``str``'s own memory
(``adapters.cpython.ascii_view``), when the pool's feeder thread pickles the
call, so nothing is copied while holding the GIL and no extra thread hop is added. The
image process reads it and removes it; the worker removes it too once the job has its
image or gave up on it, so a job cancelled, or a process killed, before the read leaves
nothing behind.

**Pixels back** (``ship``/``receive``). A resized screenshot's pixels crossed the result
pipe in dozens of 64 KB writes, each read in the worker by one result thread that
re-takes the GIL after every read, behind the event loops and vLLM's output processing:
on the H200 that wait rivalled the image work itself
(``docs/decisions/0002-dev-shm-transport.md`` has the numbers). The worker reads the pixels with one ``read`` and removes the file at once,
in that same result thread, whether or not the job is still waiting for them.

Where there is no ``/dev/shm``, or it is full (Docker's default is 64 MB), payloads go
through the pipe as before. A file outlives its transfer only when the worker itself is
killed mid-way; ``sweep`` removes those of dead workers at the next start.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from vlm_worker.adapters.cpython import ascii_view

SHM_DIR = Path("/dev/shm")
PREFIX = "vlm-worker-pixels-"
SOURCE_PREFIX = "vlm-worker-source-"
#: A call's claim: which image process runs it, and since when (``claim``).
CLAIM_PREFIX = "vlm-worker-claim-"
#: In an image process: its worker's pid, set when the process starts. Files are named
#: after it rather than after the current parent, which is another process once the
#: worker has died: a file written in that moment still names its dead owner, and
#: ``sweep`` removes it (one named after pid 1 would stay until the machine restarts).
owner_pid: int | None = None
#: In an image process: the call it is working on (``claim``), so the files it writes
#: carry the call's id and the worker can remove them if the call never returns.
current_call: str | None = None
#: Files of this worker older than this are swept while it runs (``sweep_stale``): a
#: call's files are read within seconds, or their call has failed.
STALE_AFTER_S = 600.0
#: Smaller sources go through the pipe: a file costs more than pickling them.
SOURCE_MIN_BYTES = 256 << 10


class ShippedPixels:
    """Stands in for a PIL image inside an image process's result; unpickles as the
    image itself, read back from its file."""

    def __init__(self, path: str, mode: str, size: tuple[int, int]) -> None:
        self.path, self.mode, self.size = path, mode, size

    def __reduce__(self) -> tuple[Any, tuple[str, str, tuple[int, int]]]:
        return receive, (self.path, self.mode, self.size)


def ship(img: Image.Image, directory: Path = SHM_DIR) -> Image.Image | ShippedPixels:
    """In an image process: the pixels written to a file, or the image itself if they
    cannot be (they then travel through the pipe)."""
    if not directory.is_dir():
        return img
    # The worker process is this process's parent: its pid names the file's owner.
    call = f"{current_call}-" if current_call else ""
    path = directory / f"{PREFIX}{owner_pid or os.getppid()}-{call}{uuid.uuid4().hex}"
    try:
        _write_new(path, memoryview(img.tobytes()))
    except OSError:  # no room (ENOSPC), not writable: the pipe still works
        return img
    return ShippedPixels(str(path), img.mode, img.size)


class UnreadPixels:
    """What ``receive`` gives when a pixel file cannot be read: raising there, inside the
    pool's result thread, would break the pool and fail every job in it; this fails the
    one job whose pixels they were (``ImagePool`` checks)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def receive(path: str, mode: str, size: tuple[int, int]) -> Image.Image | UnreadPixels:
    """In the worker process, while unpickling a result: read the pixels, remove the file."""
    try:
        with open(path, "rb", buffering=0) as f:
            data = f.read()
        return Image.frombytes(mode, size, data)
    except (OSError, ValueError) as exc:
        return UnreadPixels(f"{type(exc).__name__}: {exc}")
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


class IncomingSource:
    """In an image process: where a job's source waits (``OutgoingSource`` wrote it)."""

    def __init__(self, path: str | None, is_text: bool) -> None:
        self.path, self.is_text = path, is_text  # path None: the job was given up

    def read(self) -> str | bytes:
        """The source as it was sent; the file is removed."""
        if self.path is None:
            raise RuntimeError("the job was cancelled before its image was sent")
        try:
            with open(self.path, "rb", buffering=0) as f:
                data = f.read()
        finally:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        return data.decode("ascii") if self.is_text else data


class OutgoingSource:
    """A job's source (data URI or fetched bytes) on its way to an image process.

    Pickling it, which the pool's queue-feeder thread does, writes the source to a new
    file in ``directory`` and sends the path; if that fails, or the source is not ASCII
    text or bytes, the source itself is pickled. Each pickling writes its own file (a
    retried job is pickled again); ``discard`` removes them all and stops further ones.
    """

    def __init__(self, source: str | bytes, directory: Path = SHM_DIR) -> None:
        self.source = source
        self.directory = directory
        self.paths: list[Path] = []
        self._lock = threading.Lock()
        self._discarded = False

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        source = self.source
        is_text = isinstance(source, str)
        with _bytes_of(source) as data:
            if data is None or not self.directory.is_dir():
                return _same, (source,)
            path = self.directory / f"{SOURCE_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
            with self._lock:
                if self._discarded:
                    return IncomingSource, (None, is_text)
                self.paths.append(path)
            try:
                _write_new(path, data)
            except OSError:  # no room (ENOSPC), not writable: the pipe still works
                return _same, (source,)
        return IncomingSource, (str(path), is_text)

    def discard(self) -> None:
        """The job has its image, or gave up on it: remove any file still there."""
        with self._lock:
            self._discarded = True
            paths, self.paths = self.paths, []
        for path in paths:
            with contextlib.suppress(OSError):
                path.unlink()


def outgoing(source: str | bytes) -> OutgoingSource | None:
    """An ``OutgoingSource`` for a source worth a file, else None (pickle it as it is).

    Whether ``/dev/shm`` is there is checked when it is pickled, which falls back to the
    pipe."""
    return OutgoingSource(source) if len(source) >= SOURCE_MIN_BYTES else None


@contextlib.contextmanager
def _bytes_of(source: str | bytes) -> Iterator[memoryview | None]:
    """The source's bytes without a copy (None: an ASCII view is not to be had)."""
    if isinstance(source, str):
        with ascii_view(source) as view:
            yield view
    else:
        yield memoryview(source)


def _same(source: str | bytes) -> str | bytes:
    return source


def _write_new(path: Path, data: memoryview) -> None:
    """``data`` into a new private file, the GIL released while it is written; on any
    failure the file is removed and the error raised."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            while data:
                data = data[os.write(fd, data) :]
        finally:
            os.close(fd)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def _claim_path(call_id: str, owner: int, directory: Path) -> Path:
    return directory / f"{CLAIM_PREFIX}{owner}-{call_id}"


@contextlib.contextmanager
def claim(call_id: str, directory: Path = SHM_DIR) -> Iterator[None]:
    """In an image process, around one call: who runs it and since when, for the worker's
    decode deadline (``ImagePool``). Files, not the pool's pipes: the worker must read
    them while the process is stuck in a decoder, holding nothing it could answer with."""
    global current_call
    owner = owner_pid or os.getppid()
    path = _claim_path(call_id, owner, directory)
    with contextlib.suppress(OSError):
        path.write_text(f"{os.getpid()} {time.time()}")
    current_call = call_id
    try:
        yield
    finally:
        current_call = None
        with contextlib.suppress(OSError):
            path.unlink()


def claimed(call_id: str, directory: Path = SHM_DIR) -> tuple[int, float] | None:
    """In the worker: ``(pid, started)`` of the process running ``call_id``, if it has
    started (and the claim could be written)."""
    try:
        pid, started = _claim_path(call_id, os.getpid(), directory).read_text().split()
        return int(pid), float(started)
    except (OSError, ValueError):
        return None


def unclaim(call_id: str, directory: Path = SHM_DIR) -> None:
    """The worker's side, after a call: its claim, and pixel files it wrote that nobody
    read (its process was killed, or the pool broke before the result came back)."""
    with contextlib.suppress(OSError):
        _claim_path(call_id, os.getpid(), directory).unlink()
    with contextlib.suppress(OSError):
        for path in directory.glob(f"{PREFIX}{os.getpid()}-{call_id}-*"):
            with contextlib.suppress(OSError):
                path.unlink()


def sweep_stale(directory: Path = SHM_DIR, older_than: float = STALE_AFTER_S) -> int:
    """Remove this worker's own files older than ``older_than`` seconds; returns how many.
    ``sweep`` covers dead workers at start; this covers a long-running one."""
    removed, now, me = 0, time.time(), str(os.getpid())
    with contextlib.suppress(OSError):
        for prefix in (PREFIX, SOURCE_PREFIX, CLAIM_PREFIX):
            for path in directory.glob(f"{prefix}{me}-*"):
                with contextlib.suppress(OSError):
                    if now - path.stat().st_mtime > older_than:
                        path.unlink()
                        removed += 1
    return removed


def sweep(directory: Path = SHM_DIR) -> int:
    """Remove the files of worker processes that no longer run; returns how many."""
    removed = 0
    with contextlib.suppress(OSError):
        for prefix in (PREFIX, SOURCE_PREFIX, CLAIM_PREFIX):
            for path in directory.glob(f"{prefix}*"):
                owner = path.name[len(prefix) :].split("-", 1)[0]
                if owner.isdigit() and not _alive(int(owner)):
                    with contextlib.suppress(OSError):
                        path.unlink()
                        removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
