"""A str's bytes without a copy (``adapters.cpython.ascii_view``)."""

from __future__ import annotations

import sys

import pytest

from vlm_worker.adapters.cpython import ascii_view

pytestmark = pytest.mark.skipif(
    sys.implementation.name != "cpython", reason="reads CPython's str storage"
)


@pytest.mark.parametrize("text", ["", "a", "data:image/png;base64," + "QUJD" * 50_000])
def test_the_view_holds_the_strings_bytes(text):
    with ascii_view(text) as view:
        assert view is not None
        assert view.readonly and view.format == "B" and len(view) == len(text)
        assert bytes(view) == text.encode("ascii")
        assert bytes(view[22:30]) == text[22:30].encode("ascii")


def test_the_view_reads_the_strings_own_memory_not_a_copy():
    import numpy as np

    text = "QUJD" * 1000
    # a compact ASCII str's characters follow its header: sizeof("") is header + NUL
    chars_at = id(text) + sys.getsizeof("") - 1
    with ascii_view(text) as view:
        assert np.frombuffer(view, np.uint8).ctypes.data == chars_at
        assert view.obj._owner is text  # no bytes object in between; the str is held


def test_the_view_is_released_when_the_block_ends():
    text = "abc" * 10
    with ascii_view(text) as view:
        pass
    with pytest.raises(ValueError, match="released"):
        bytes(view)


@pytest.mark.parametrize("text", ["caf\u00e9", "\u4fdd\u5b58", "\U0001f642"])
def test_strings_that_are_not_ascii_get_none(text):
    with ascii_view(text) as view:
        assert view is None


def test_str_subclasses_get_none():
    class Marked(str):
        pass

    with ascii_view(Marked("abc")) as view:
        assert view is None


def test_a_slice_kept_after_the_block_still_reads_its_bytes():
    """A slice outliving the str once read freed memory (a crash, seen in a probe); the
    view now holds the str. In a child process, so a regression cannot take pytest down."""
    import subprocess

    script = """
import gc
from vlm_worker.adapters.cpython import ascii_view
text = "".join(["QUJD"] * 100_000)
with ascii_view(text) as view:
    kept = view[4:12]
del text, view
gc.collect()
junk = ["x" * 400_000 for _ in range(50)]  # reuse the freed memory, were it freed
assert bytes(kept) == b"QUJDQUJD", bytes(kept)
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
