"""Small video clips made by the tests themselves (no fixture files): ``cv2.VideoWriter``."""

from __future__ import annotations

import os
import tempfile

import cv2
import numpy as np

W, H = 128, 96


def clip(
    n: int = 20,
    fps: float = 10.0,
    fourcc: str = "mp4v",
    ext: str = ".mp4",
    size: tuple[int, int] = (W, H),
) -> bytes:
    """An n-frame clip of a square moving across a still background (frames differ)."""
    width, height = size
    fd, path = tempfile.mkstemp(suffix=ext)
    os.close(fd)
    try:
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*fourcc), fps, (width, height))
        assert writer.isOpened(), fourcc
        for i in range(n):
            frame = np.full((height, width, 3), (30, 60, 90), np.uint8)
            x = (i * 5) % max(1, width - 30)
            frame[20:50, x : x + 30] = (0, 0, 255)
            writer.write(frame)
        writer.release()
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)
