"""Resized pixels from an image process to the worker through a file in ``/dev/shm``.

Why: a ``ProcessPoolExecutor`` returns results through one pipe that every worker process
shares. A 1288x728 screenshot's pixels (2.8 MB) cross it in ~45 writes of 64 KB, each
read in the worker process by one result thread that re-takes the GIL after every read,
behind the event loops and vLLM's output processing. The H200 benchmark's trace put
15-16 ms (p50; 54 ms at worst) between an image process finishing its work and the job
resuming with the pixels, at 8 concurrent jobs, against 21 ms for the work itself; with
this, 9-12 ms (p50; 17-27 ms at worst) on the same kind of machine. What is left (writing
the file, the pool's result thread, the hand-off to the event loop) was not split
further; with images prepared in threads the same step takes 0.4 ms.

Through a file in RAM the pipe carries a path; the worker reads the pixels with one
``read`` (the GIL released for all of it) and removes the file at once, in that same
result thread, whether or not the job is still waiting for them (a cancelled job leaves
nothing behind). Where there is no ``/dev/shm``, or it is full (Docker's default is
64 MB), the pixels go through the pipe as before.

A file outlives only a worker process killed between the image process writing it and
the result thread reading it; ``sweep`` removes those of dead workers at the next start.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Any

from PIL import Image

SHM_DIR = Path("/dev/shm")
PREFIX = "vlm-worker-pixels-"


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
    path = directory / f"{PREFIX}{os.getppid()}-{uuid.uuid4().hex}"
    data = memoryview(img.tobytes())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            while data:
                data = data[os.write(fd, data) :]
        finally:
            os.close(fd)
    except OSError:  # no room (ENOSPC), not writable: the pipe still works
        with contextlib.suppress(OSError):
            os.unlink(path)
        return img
    return ShippedPixels(str(path), img.mode, img.size)


def receive(path: str, mode: str, size: tuple[int, int]) -> Image.Image:
    """In the worker process, while unpickling a result: read the pixels, remove the file."""
    try:
        with open(path, "rb", buffering=0) as f:
            data = f.read()
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    return Image.frombytes(mode, size, data)


def sweep(directory: Path = SHM_DIR) -> int:
    """Remove pixel files left by worker processes that no longer run; returns how many."""
    removed = 0
    with contextlib.suppress(OSError):
        for path in directory.glob(f"{PREFIX}*"):
            owner = path.name[len(PREFIX) :].split("-", 1)[0]
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
