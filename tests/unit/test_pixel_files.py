"""Pixels handed back from image processes through files in /dev/shm (``pixel_files``)."""

from __future__ import annotations

import errno
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vlm_worker.pipeline import pixel_files

pytestmark = pytest.mark.skipif(not pixel_files.SHM_DIR.is_dir(), reason="no /dev/shm here")


def noise_image(width: int = 1288, height: int = 728) -> Image.Image:
    rng = np.random.default_rng(width + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8))


def ours() -> list[str]:
    """Pixel files that name this process as their owner (``ship`` names its parent's pid,
    which, for a test calling it directly, is the test runner's parent)."""
    owner = f"{pixel_files.PREFIX}{os.getppid()}-"
    return sorted(p.name for p in pixel_files.SHM_DIR.glob(f"{owner}*"))


def test_pixels_travel_through_a_private_file_and_the_file_is_gone_after(tmp_path):
    img = noise_image()
    shipped = pixel_files.ship(img, tmp_path)
    assert isinstance(shipped, pixel_files.ShippedPixels)
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
    shipped = pixel_files.ship(noise_image(64, 48))
    assert isinstance(shipped, pixel_files.ShippedPixels)
    assert os.path.dirname(shipped.path) == str(pixel_files.SHM_DIR)
    assert os.path.basename(shipped.path) in ours()
    pickle.loads(pickle.dumps(shipped))
    assert os.path.basename(shipped.path) not in ours()


def test_without_the_folder_the_image_goes_through_the_pipe(tmp_path):
    img = noise_image(64, 48)
    assert pixel_files.ship(img, tmp_path / "missing") is img


def test_a_full_folder_falls_back_to_the_pipe_and_leaves_nothing(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pixel_files.os, "write", full)
    img = noise_image(64, 48)
    assert pixel_files.ship(img, tmp_path) is img
    assert list(tmp_path.iterdir()) == []


def test_modes_other_than_rgb_survive(tmp_path):
    for mode in ("L", "RGBA"):
        img = noise_image(40, 30).convert(mode)
        back = pickle.loads(pickle.dumps(pixel_files.ship(img, tmp_path)))
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
        "dead": f"{pixel_files.PREFIX}{dead_pid}-abc",
        "dead source": f"{pixel_files.SOURCE_PREFIX}{dead_pid}-abc",
        "alive": f"{pixel_files.PREFIX}{os.getpid()}-def",
        "alive source": f"{pixel_files.SOURCE_PREFIX}{os.getpid()}-def",
        "other": "psm_1234",
        "odd": f"{pixel_files.PREFIX}notapid-x",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    assert pixel_files.sweep(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        names[k] for k in ("alive", "alive source", "other", "odd")
    )


def test_files_name_the_worker_they_started_under_even_after_it_died(tmp_path, monkeypatch):
    """An image process orphaned mid-job (its parent now another pid) still names the
    dead worker, so the next start's sweep removes what it wrote."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    monkeypatch.setattr(pixel_files, "owner_pid", int(dead.stdout))
    shipped = pixel_files.ship(noise_image(16, 8), tmp_path)
    assert os.path.basename(shipped.path).startswith(f"{pixel_files.PREFIX}{int(dead.stdout)}-")
    assert pixel_files.sweep(tmp_path) == 1
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- sources out
BIG_URI = "data:image/png;base64," + "QUJD" * 100_000  # 400 kB, above SOURCE_MIN_BYTES


@pytest.mark.parametrize("source", [BIG_URI, b"\x89PNG" + bytes(range(256)) * 2000])
def test_a_source_travels_as_a_path_and_arrives_as_it_was_sent(tmp_path, source):
    sent = pixel_files.OutgoingSource(source, tmp_path)
    message = pickle.dumps(sent)
    assert len(message) < 500  # a path, not the payload
    (path,) = tmp_path.iterdir()
    assert path.stat().st_size == len(source)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.name.startswith(f"{pixel_files.SOURCE_PREFIX}{os.getpid()}-")
    incoming = pickle.loads(message)
    assert isinstance(incoming, pixel_files.IncomingSource)
    back = incoming.read()
    assert type(back) is type(source) and back == source
    assert list(tmp_path.iterdir()) == []  # the reader removed it


def test_discard_removes_unread_files_and_stops_new_ones(tmp_path):
    sent = pixel_files.OutgoingSource(BIG_URI, tmp_path)
    first, second = pickle.dumps(sent), pickle.dumps(sent)  # a retried job: pickled twice
    assert len(list(tmp_path.iterdir())) == 2
    sent.discard()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError):  # an image process that reads late finds nothing
        pickle.loads(first).read()
    late = pickle.loads(pickle.dumps(sent))  # a feeder thread that pickles after discard
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="cancelled"):
        late.read()
    del second


@pytest.mark.parametrize(
    "source",
    ["data:image/png;base64," + "\u00e9" * 300_000],  # not ASCII: no view of it to write
    ids=["non-ascii"],
)
def test_what_cannot_be_written_is_pickled_as_it_is(tmp_path, source):
    assert pickle.loads(pickle.dumps(pixel_files.OutgoingSource(source, tmp_path))) == source
    assert list(tmp_path.iterdir()) == []


def test_no_folder_or_a_full_one_sends_the_source_itself(tmp_path, monkeypatch):
    missing = pixel_files.OutgoingSource(BIG_URI, tmp_path / "missing")
    assert pickle.loads(pickle.dumps(missing)) == BIG_URI

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pixel_files.os, "write", full)
    assert pickle.loads(pickle.dumps(pixel_files.OutgoingSource(BIG_URI, tmp_path))) == BIG_URI
    assert list(tmp_path.iterdir()) == []


def test_only_large_sources_get_a_file():
    assert pixel_files.outgoing("data:image/png;base64,QUJD") is None
    assert isinstance(pixel_files.outgoing(BIG_URI), pixel_files.OutgoingSource)
