"""CPython internals the worker relies on: a ``str``'s own memory, a pool's processes.

Checked against CPython 3.10-3.12 (the CPU venv runs 3.11, the vLLM image 3.12):

* ``ctypes.pythonapi.PyUnicode_AsUTF8AndSize`` (``ascii_view``): a stable C API
  function, reached through ``ctypes``.
* ``concurrent.futures.ProcessPoolExecutor._processes`` (``pool_pids``): the pool's
  live processes by pid; the executor has no public accessor.

``ascii_view``: an ASCII ``str``'s characters as a read-only bytes view, without copying.
Why: a job's image arrives as a data URI inside the JSON the SDK parsed, a Python ``str``
of megabytes for a 4K screenshot. Whatever copies it (a slice to drop the ``data:``
header, ``str.encode``, pickling it for an image process) holds the GIL for the whole
copy, and every stream on the worker waits that long for its next chunk
(``docs/decisions/0007-gil-sparing-decoding.md``). C code that reads a buffer
(pybase64, ``os.write``) releases the GIL while it reads; given the ``str``'s own memory,
it needs no copy at all.

CPython stores an ASCII ``str`` as one byte per character, and
``PyUnicode_AsUTF8AndSize`` returns that very storage for one (no conversion, no
allocation). The view exports it through a ctypes array that holds a reference to the
``str``, so the view, and any slice of it, keeps the ``str`` alive: none can read freed
memory, whatever a caller keeps. Strings that are not ASCII, and other Python
implementations, get ``None`` and the caller copies as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Iterator
from typing import Any

_as_utf8 = None
if sys.implementation.name == "cpython":
    _as_utf8 = ctypes.pythonapi.PyUnicode_AsUTF8AndSize
    _as_utf8.restype = ctypes.c_void_p
    _as_utf8.argtypes = [ctypes.py_object, ctypes.POINTER(ctypes.c_ssize_t)]


@contextlib.contextmanager
def ascii_view(text: str) -> Iterator[memoryview | None]:
    """``text``'s bytes as a read-only ``memoryview`` (format ``B``) for the block's
    duration, or None.

    Slicing the view copies nothing: ``view[n:]`` is ``text[n:].encode()`` without the copy.
    """
    if _as_utf8 is None or type(text) is not str or not text.isascii():  # isascii is O(1)
        yield None
        return
    size = ctypes.c_ssize_t()
    address = _as_utf8(text, ctypes.byref(size))
    if not address or size.value != len(text):
        yield None
        return
    # The bytes are exported through a ctypes array that holds the str: every view and
    # slice taken from it keeps the str alive, so none can outlive the memory it reads.
    array = (ctypes.c_ubyte * size.value).from_address(address)
    array._owner = text  # type: ignore[attr-defined]
    view = memoryview(array).cast("B").toreadonly()
    try:
        yield view
    finally:
        view.release()


def pool_pids(pool: Any) -> list[int]:
    """The pids of a ``ProcessPoolExecutor``'s live processes (empty before any started)."""
    processes = getattr(pool, "_processes", None) or {}
    return sorted(p.pid for p in list(processes.values()) if p.pid)
