"""Pixels handed back from image processes through files in /dev/shm (``shm_pixels``)."""

from __future__ import annotations

import errno
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vlm_worker import shm_pixels

pytestmark = pytest.mark.skipif(not shm_pixels.SHM_DIR.is_dir(), reason="no /dev/shm here")


def noise_image(width: int = 1288, height: int = 728) -> Image.Image:
    rng = np.random.default_rng(width + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8))


def ours() -> list[str]:
    """Pixel files that name this process as their owner (``ship`` names its parent's pid,
    which, for a test calling it directly, is the test runner's parent)."""
    owner = f"{shm_pixels.PREFIX}{os.getppid()}-"
    return sorted(p.name for p in shm_pixels.SHM_DIR.glob(f"{owner}*"))


def test_pixels_travel_through_a_private_file_and_the_file_is_gone_after(tmp_path):
    img = noise_image()
    shipped = shm_pixels.ship(img, tmp_path)
    assert isinstance(shipped, shm_pixels.ShippedPixels)
    (path,) = tmp_path.iterdir()
    assert path.stat().st_size == 1288 * 728 * 3
    assert path.stat().st_mode & 0o777 == 0o600
    message = pickle.dumps(shipped)
    assert len(message) < 500  # a path, not 2.8 MB
    back = pickle.loads(message)
    assert isinstance(back, Image.Image) and back.mode == "RGB" and back.size == img.size
    assert np.array_equal(np.asarray(back), np.asarray(img))
    assert list(tmp_path.iterdir()) == []


def test_in_dev_shm_named_after_the_worker_process():
    shipped = shm_pixels.ship(noise_image(64, 48))
    assert isinstance(shipped, shm_pixels.ShippedPixels)
    assert os.path.dirname(shipped.path) == str(shm_pixels.SHM_DIR)
    assert os.path.basename(shipped.path) in ours()
    pickle.loads(pickle.dumps(shipped))
    assert os.path.basename(shipped.path) not in ours()


def test_without_the_folder_the_image_goes_through_the_pipe(tmp_path):
    img = noise_image(64, 48)
    assert shm_pixels.ship(img, tmp_path / "missing") is img


def test_a_full_folder_falls_back_to_the_pipe_and_leaves_nothing(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shm_pixels.os, "write", full)
    img = noise_image(64, 48)
    assert shm_pixels.ship(img, tmp_path) is img
    assert list(tmp_path.iterdir()) == []


def test_modes_other_than_rgb_survive(tmp_path):
    for mode in ("L", "RGBA"):
        img = noise_image(40, 30).convert(mode)
        back = pickle.loads(pickle.dumps(shm_pixels.ship(img, tmp_path)))
        assert back.mode == mode and np.array_equal(np.asarray(back), np.asarray(img))


def test_sweep_removes_only_files_of_workers_that_are_gone(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    names = {
        "dead": f"{shm_pixels.PREFIX}{dead_pid}-abc",
        "alive": f"{shm_pixels.PREFIX}{os.getpid()}-def",
        "other": "psm_1234",
        "odd": f"{shm_pixels.PREFIX}notapid-x",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    assert shm_pixels.sweep(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        names[k] for k in ("alive", "other", "odd")
    )
