"""Video decoding: the frames and metadata ``vllm serve`` would sample, and clear refusals.

Every clip is made here with ``cv2.VideoWriter`` (a moving square, so frames differ), and
every expected sampling comes from the real classes: vLLM's loaders called directly, and
transformers' Qwen2-VL / Qwen3-VL video processors. Nothing here starts an engine.
"""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import cv2
import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
from transformers.video_utils import VideoMetadata

from support.video import H, W, clip
from vlm_worker.adapters import vllm as vllm_adapter
from vlm_worker.contract.errors import InvalidInput, VideoDecodeError, WorkerError
from vlm_worker.media.video import (
    MAX_BYTES_SETTING,
    MAX_DURATION_SETTING,
    MAX_PIXELS_SETTING,
    PreparedVideo,
    VideoLimits,
    prepare_video,
)

FIELD = "messages[0].content[1].video_url.url"
#: Codecs this cv2 build may write; the first that round-trips is used.
CODECS = (("mp4v", ".mp4"), ("MJPG", ".avi"))


def frame_count(data: bytes) -> int:
    stream = io.BytesIO(data)  # kept alive past release(): OpenCV 5 does not hold it
    cap = cv2.VideoCapture(stream, vllm_adapter.cv2_stream_api(), [])
    try:
        n = 0
        while cap.isOpened() and cap.grab():
            n += 1
        return n
    finally:
        cap.release()


@pytest.fixture(scope="module", autouse=True)
def vllm_imported() -> None:
    """Import vLLM's video module once, outside the tests that time themselves."""
    vllm_adapter.video_loader_names()


@pytest.fixture(scope="module")
def codec() -> tuple[str, str]:
    for fourcc, ext in CODECS:
        try:
            if frame_count(clip(20, 10.0, fourcc, ext)) == 20:
                return fourcc, ext
        except AssertionError:
            continue
    pytest.skip("no codec round-trips in this cv2 build")


@pytest.fixture(scope="module")
def video(codec: tuple[str, str]) -> bytes:
    return clip(20, 10.0, *codec)


def limits(loader: str = "qwen2_vl", **overrides: object) -> VideoLimits:
    values: dict[str, object] = {
        "max_bytes": 1 << 20,
        "max_frames": 32,
        "fps": 2.0,
        "max_duration_s": 60.0,
        "max_pixels": 10**8,
        "loader": loader,
    }
    values.update(overrides)
    return VideoLimits(**values)  # type: ignore[arg-type]


def load_directly(loader: str, data: bytes, lim: VideoLimits) -> tuple[np.ndarray, dict]:
    """vLLM's loader, called as the brief's call would (and as vllm serve's connector does)."""
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY

    return VIDEO_LOADER_REGISTRY.load(loader).load_bytes(
        data, num_frames=lim.max_frames, fps=lim.fps, max_frames=lim.max_frames
    )


@contextmanager
def quick(seconds: float = 1.0) -> Iterator[None]:
    start = time.monotonic()
    yield
    assert time.monotonic() - start < seconds


# ---------------------------------------------------------------- sampling as vLLM samples


@pytest.mark.parametrize("loader", ["qwen2_vl", "qwen3_vl", "opencv"])
@pytest.mark.parametrize(
    ("n", "fps", "max_frames"), [(20, 10.0, 32), (45, 15.0, 32), (45, 15.0, 4)]
)
def test_frames_and_metadata_are_vllm_loaders(codec, loader, n, fps, max_frames):
    data = clip(n, fps, *codec)
    lim = limits(loader, max_frames=max_frames)
    with quick():
        video = prepare_video(data, field=FIELD, limits=lim)
    frames, metadata = load_directly(loader, data, lim)
    assert video.metadata == metadata
    assert video.frames.dtype == np.uint8 and video.frames.shape == (len(frames), H, W, 3)
    np.testing.assert_array_equal(video.frames, frames)
    assert video.vllm_item[1] is video.metadata
    assert len(video.frames) <= max_frames
    assert len({f.tobytes() for f in video.frames}) == len(video.frames)  # frames differ
    assert video.original_size == (W, H)
    assert video.duration_s == pytest.approx(n / fps)
    assert video.source_fps == pytest.approx(fps)


@pytest.mark.parametrize("total", [2, 3, 4, 7, 20, 45, 451, 1000, 5000])
@pytest.mark.parametrize("source_fps", [1.0, 10.0, 24.0, 29.97, 60.0])
@pytest.mark.parametrize(("fps", "max_frames"), [(2.0, 768), (1.0, 32), (2.0, 7)])
def test_header_indices_are_the_transformers_qwen_sampling(total, source_fps, fps, max_frames):
    """What the caps count is what transformers' processors would sample (fps mode)."""
    metadata = VideoMetadata(total_num_frames=total, fps=source_fps)
    qwen2 = Qwen2VLVideoProcessor().sample_frames(metadata, fps=fps, max_frames=max_frames)
    ours = vllm_adapter.video_frame_indices(
        "qwen2_vl", total_frames=total, source_fps=source_fps, max_frames=max_frames, fps=fps
    )
    assert ours == [min(int(i), total - 1) for i in qwen2]  # vLLM clamps a float32 tail
    qwen3 = Qwen3VLVideoProcessor(max_frames=max_frames).sample_frames(metadata, fps=fps)
    ours = vllm_adapter.video_frame_indices(
        "qwen3_vl", total_frames=total, source_fps=source_fps, max_frames=max_frames, fps=fps
    )
    assert ours == [int(i) for i in qwen3]


def test_a_clip_sampled_like_qwen2vl_processor(video):
    """The 2-fps, temporal-patch-2 sampling of the Qwen2-VL processor, end to end."""
    processor = Qwen2VLVideoProcessor()
    assert processor.temporal_patch_size == 2
    prepared = prepare_video(video, field=FIELD, limits=limits("qwen2_vl", fps=2.0))
    expected = processor.sample_frames(VideoMetadata(total_num_frames=20, fps=10.0), fps=2)
    assert prepared.metadata["frames_indices"] == [int(i) for i in expected]
    assert len(prepared.frames) % processor.temporal_patch_size == 0


def test_video_loader_for_follows_vllm_serve():
    from vllm import envs

    assert vllm_adapter.video_loader_for(Qwen2VLVideoProcessor()) == "qwen2_vl"
    assert vllm_adapter.video_loader_for(Qwen3VLVideoProcessor()) == "qwen3_vl"
    assert vllm_adapter.video_loader_for(None) == envs.VLLM_VIDEO_LOADER_BACKEND
    assert vllm_adapter.video_loader_for(object()) == envs.VLLM_VIDEO_LOADER_BACKEND
    assert {"qwen2_vl", "qwen3_vl", "opencv"} <= set(vllm_adapter.video_loader_names())


@pytest.mark.parametrize(
    "encode",
    [
        lambda d: "data:video/mp4;base64," + base64.b64encode(d).decode(),
        lambda d: "data:;base64," + base64.b64encode(d).decode(),
        lambda d: base64.b64encode(d).decode(),
        lambda d: base64.encodebytes(d).decode(),
    ],
    ids=["data-uri", "data-uri-no-mime", "raw", "raw-lines"],
)
def test_inline_sources(video, encode: Callable[[bytes], str]):
    from_bytes = prepare_video(video, field=FIELD, limits=limits())
    inline = prepare_video(encode(video), field=FIELD, limits=limits())
    assert inline.sha256 == from_bytes.sha256 and inline.nbytes == len(video)
    assert inline.metadata == from_bytes.metadata
    np.testing.assert_array_equal(inline.frames, from_bytes.frames)


def test_the_value_object(video):
    video_2fps = prepare_video(video, field=FIELD, limits=limits(fps=2.0))
    again = prepare_video(video, field=FIELD, limits=limits(fps=2.0))
    video_1fps = prepare_video(video, field=FIELD, limits=limits(fps=1.0))
    qwen3 = prepare_video(video, field=FIELD, limits=limits("qwen3_vl"))
    assert video_2fps.content_id == again.content_id
    assert video_2fps.content_id.startswith(video_2fps.sha256)
    assert len({video_2fps.content_id, video_1fps.content_id, qwen3.content_id}) == 3
    assert json.loads(json.dumps(video_2fps.describe())) == {
        "original_size": [W, H],
        "frames": 4,
        "duration_s": 2.0,
        "source_fps": 10.0,
        "bytes": len(video),
    }
    assert str(len(video)) in repr(video_2fps) and "\\x" not in repr(video_2fps)
    assert len(repr(video_2fps)) < 200
    copy = pickle.loads(pickle.dumps(video_2fps))
    assert isinstance(copy, PreparedVideo) and copy.content_id == video_2fps.content_id
    assert pickle.loads(pickle.dumps(limits())) == limits()


# ---------------------------------------------------------------- refusals


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(out, "PNG")
    return out.getvalue()


def refused(source: str | bytes, error: type[WorkerError], words: str, **overrides: object):
    with quick(), pytest.raises(error) as info:
        prepare_video(source, field=FIELD, limits=limits(**overrides))  # type: ignore[arg-type]
    assert type(info.value) is error
    assert info.value.field == FIELD
    assert words in info.value.message, info.value.message
    # crosses back from a worker process intact
    assert pickle.loads(pickle.dumps(info.value)).to_dict() == info.value.to_dict()
    return info.value


@pytest.mark.parametrize(
    "data",
    [png(), os.urandom(5000), b"#EXTM3U\n#EXT-X-TARGETDURATION:1\nfile:///etc/passwd\n"],
    ids=["png", "random", "hls-playlist"],
)
def test_not_a_video(data):
    err = refused(data, VideoDecodeError, "accepted containers: MP4/MOV, WebM/Matroska, AVI")
    assert err.to_dict()["error"]["type"] == "video_decode"


def test_truncated_mp4_cannot_be_opened(video, codec):
    if codec[0] != "mp4v":
        pytest.skip("needs an MP4, whose index is at the end")
    refused(video[: len(video) // 2], VideoDecodeError, "cannot open video")


def test_truncated_avi_fails_midway():
    """vLLM would send what it could decode with a warning; the worker refuses the job.

    How many frames a truncated file yields is the loader's business (vLLM 0.26 decodes
    2 of these 4, 0.32 reads on by index and gets 4 of the 20 the header promises)."""
    try:
        avi = clip(20, 10.0, "MJPG", ".avi")
    except AssertionError:
        pytest.skip("no MJPG writer")
    refused(avi[: len(avi) // 2], VideoDecodeError, "video data is truncated or corrupt")


def test_one_frame_is_too_few_for_the_qwen2vl_sampler(codec):
    one = clip(1, 10.0, *codec)
    refused(one, VideoDecodeError, "cannot be sampled by vLLM's 'qwen2_vl' loader")
    # The Qwen3-VL loader samples it; whether it can decode it depends on the release
    # (0.32's OpenCV decoder reads no frame of a one-frame clip): the worker sends what
    # the loader decodes, and refuses a clip it decodes nothing of.
    frames, _ = vllm_adapter.load_video("qwen3_vl", one, max_frames=32, fps=2.0)
    if len(frames) == 1:
        assert len(prepare_video(one, field=FIELD, limits=limits("qwen3_vl")).frames) == 1
    else:
        with pytest.raises(VideoDecodeError, match="decoded 0 of the 1 sampled frames"):
            prepare_video(one, field=FIELD, limits=limits("qwen3_vl"))


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("data:image/png;base64," + base64.b64encode(png()).decode(), "media type 'image/png'"),
        ("data:image/png;base64," + base64.b64encode(png()).decode(), "expected video/*"),
        ("data:video/mp4,abc", "(data:video/...;base64,...)"),
        ("file:///etc/passwd", "video URL scheme 'file' is not supported"),
        ("not base64!", "video base64 is invalid"),
        ("", "video is empty"),
        (b"", "video is empty"),
    ],
)
def test_inline_errors(source, words):
    refused(source, InvalidInput, words)


def test_over_max_bytes(video):
    words = f"video is larger than {MAX_BYTES_SETTING}={len(video) - 1} bytes"
    refused(video, InvalidInput, words, max_bytes=len(video) - 1)
    b64 = base64.b64encode(video).decode()
    refused("data:video/mp4;base64," + b64, InvalidInput, words, max_bytes=len(video) - 1)
    assert prepare_video(b64, field=FIELD, limits=limits(max_bytes=len(video))).nbytes


def test_over_max_duration(video):
    words = f"2 s long (20 frames at 10 fps), above {MAX_DURATION_SETTING}=1.5"
    refused(video, InvalidInput, words, max_duration_s=1.5)
    assert prepare_video(video, field=FIELD, limits=limits(max_duration_s=2.0))


def test_over_max_pixels(video):
    """Counted from the frames that WILL be sampled: 4 at 2 fps, not the clip's 20."""
    sampled = 4 * W * H
    words = f"video samples 4 frames of {W}x{H} = {sampled} pixels, above {MAX_PIXELS_SETTING}="
    refused(video, InvalidInput, words, max_pixels=sampled - 1)
    assert len(prepare_video(video, field=FIELD, limits=limits(max_pixels=sampled)).frames) == 4


def test_over_vllm_max_image_pixels(video, monkeypatch):
    monkeypatch.setenv("VLLM_MAX_IMAGE_PIXELS", str(W * H - 1))
    refused(video, InvalidInput, f"above vLLM's VLLM_MAX_IMAGE_PIXELS={W * H - 1}")
    monkeypatch.setenv("VLLM_MAX_IMAGE_PIXELS", str(W * H))
    assert prepare_video(video, field=FIELD, limits=limits())
