"""How many decoded pixels may be in flight across jobs, and each image's share of it.

Every image passes ``MAX_IMAGE_SOURCE_PIXELS`` on its own, but sixteen jobs at once, each
with a 64-megapixel image, held about 10 GB of decoded pixels and decoder buffers
together. The budget makes the images wait for each other instead: an image that would
take the total past it waits until enough earlier ones are done (then resized, their
full-size pixels are gone); one image larger than the whole budget runs alone. Nothing
fails for want of budget; ``JOB_TIMEOUT`` still bounds the wait.

The size comes from the image's header, read here without decoding the image: a header
the worker cannot read here counts as the largest image allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import warnings
from collections.abc import AsyncIterator

import pybase64
from PIL import Image

#: Bytes of decoded data one pixel costs while an image is prepared (RGBA from the
#: decoder, RGB after conversion, the resize's float buffers): what the budget's default
#: divides the memory by.
BYTES_PER_PIXEL = 10

#: Enough of an inline image to read its header from: PNG, GIF, BMP and WebP state their
#: size in the first bytes; a JPEG after its EXIF segment (at most 64 KB).
_HEADER_BYTES = 72 * 1024
_DATA_URI_HEAD = re.compile(r"^data:[^,]{0,256},", re.I)


def default_budget(available_bytes: int) -> int:
    """A quarter of the memory available at start, in pixels."""
    return max(1, available_bytes // 4 // BYTES_PER_PIXEL)


def header_pixels(source: str | bytes, worst_case: int) -> int:
    """Width x height from an image's header, decoding no pixels; ``worst_case`` when the
    header cannot be read from the first bytes (the decoder will say what is wrong)."""
    try:
        if isinstance(source, str):
            head = _DATA_URI_HEAD.match(source[:300])
            start = head.end() if head else 0
            chars = "".join(source[start : start + _HEADER_BYTES * 4 // 3 + 4].split())
            data = pybase64.b64decode(chars[: len(chars) // 4 * 4], validate=False)
        else:
            data = source[:_HEADER_BYTES]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            width, height = Image.open(io.BytesIO(data)).size
        return max(1, width * height)
    except Exception:  # not an image, not base64, a header beyond the first bytes
        return worst_case


class PixelBudget:
    """Pixels in flight, shared by every job on the worker's event loop."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_flight = 0
        #: The most pixels that were in flight at once (for tests and logs).
        self.peak = 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        """Wait until ``pixels`` fit (or nothing else is in flight), hold them, give back."""
        share = min(pixels, self.capacity)
        async with self._changed:
            await self._changed.wait_for(
                lambda: self.in_flight == 0 or self.in_flight + share <= self.capacity
            )
            self.in_flight += share
            self.peak = max(self.peak, self.in_flight)
        try:
            yield
        finally:
            async with self._changed:
                self.in_flight -= share
                self._changed.notify_all()
