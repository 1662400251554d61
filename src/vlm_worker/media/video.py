"""Video loading: refused from its header when too big, then sampled by vLLM's own loader.

Why vLLM's loader and not our own sampler: the frames, their indices and the metadata
dict that goes with them (the Qwen processors compute timestamps from it) must be the
ones ``vllm serve`` would produce for the same file, and each loader has its own rule
(the Qwen2-VL one follows transformers' fps sampling, ignores ``num_frames`` and rounds
to the temporal patch). The worker only adds what vLLM does not check before decoding:
the container type, the length, and the pixels of the frames that will be sampled,
counted with the loader's own index rule from the header alone
(``adapters.vllm.video_frame_indices``).

Like ``media.images``, everything here is synchronous, CPU-bound and free of shared
state, so the job runner can call ``prepare_video`` in a worker process.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlm_worker.adapters import vllm as vllm_adapter
from vlm_worker.contract.errors import InvalidInput, VideoDecodeError
from vlm_worker.media.images import decode_inline

#: Containers FFmpeg may demux. Anything else is refused before FFmpeg probes it: its
#: demuxers also read images (a PNG opens as a one-"frame" video) and playlists that
#: name other files and URLs (HLS, concat), which a job's bytes must never reach.
ALLOWED_CONTAINERS = ("MP4/MOV", "WebM/Matroska", "AVI")

#: ISO BMFF brands of still images (HEIF, AVIF): an ``ftyp`` box, yet not a video.
_IMAGE_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"mif1", b"msf1", b"avif"})
_BMFF_BOXES = frozenset({b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot"})

#: The settings each refusal names (the client can only change its input, the operator
#: the setting, so both are in the message).
MAX_BYTES_SETTING = "MAX_VIDEO_BYTES"
MAX_DURATION_SETTING = "MAX_VIDEO_SECONDS"
MAX_PIXELS_SETTING = "MAX_VIDEO_DECODED_PIXELS"


@dataclass(frozen=True)
class VideoLimits:
    """The per-video caps and sampling, from the settings (picklable, for worker processes)."""

    max_bytes: int
    #: Most frames sampled and sent to the model (``num_frames`` and ``max_frames`` of
    #: vLLM's loaders; the fps rule may sample fewer).
    max_frames: int
    #: Sampling rate, frames per second of video.
    fps: float
    #: Longest video accepted, in seconds, from the header (frame count / fps).
    max_duration_s: float
    #: Cap on sampled frames * width * height, checked before any frame is decoded.
    max_pixels: int
    #: vLLM's video loader backend (``adapters.vllm.video_loader_for``).
    loader: str

    @property
    def sampling(self) -> str:
        """What, besides the bytes, decides the frames: loader, rate and frame cap."""
        return f"{self.loader}-{self.fps:g}fps-{self.max_frames}f"


@dataclass(frozen=True, repr=False, eq=False)
class PreparedVideo:
    """Sampled RGB frames and vLLM's metadata for them, and what the client should know."""

    frames: np.ndarray  # uint8, TxHxWx3, RGB
    #: The dict vLLM's loader returned (total_num_frames, fps, duration, frames_indices,
    #: do_sample_frames, video_backend), passed on to vLLM untouched as ``vllm serve`` does.
    metadata: dict[str, Any]
    original_size: tuple[int, int]  # (width, height)
    duration_s: float
    source_fps: float
    nbytes: int
    sha256: str  # of the encoded bytes
    sampling: str  # ``VideoLimits.sampling``

    @property
    def digest(self) -> str:
        """A short, log-safe identity of the video."""
        return self.sha256[:16]

    @property
    def content_id(self) -> str:
        """Names the frames handed to vLLM: the bytes and the sampling that picked them.

        Given to vLLM as the item's ``multi_modal_uuids`` entry, so it does not hash the
        frames itself; two jobs with the same file and sampling share its cache entries,
        the same file sampled differently does not.
        """
        return f"{self.sha256}-{self.sampling}"

    @property
    def vllm_item(self) -> tuple[np.ndarray, dict[str, Any]]:
        """The ``(frames, metadata)`` pair vLLM takes as one video."""
        return self.frames, self.metadata

    def __repr__(self) -> str:
        w, h = self.original_size
        return (
            f"PreparedVideo({w}x{h} {self.duration_s:g}s@{self.source_fps:g}fps"
            f"->{len(self.frames)} frames ({self.sampling}), {self.nbytes} bytes, "
            f"sha256:{self.digest})"
        )

    def describe(self) -> dict[str, Any]:
        return {
            "original_size": list(self.original_size),
            "frames": len(self.frames),
            "duration_s": round(self.duration_s, 3),
            "source_fps": round(self.source_fps, 3),
            "bytes": self.nbytes,
        }


@dataclass(frozen=True)
class _Header:
    frames: int
    fps: float
    width: int
    height: int


def container_of(data: bytes) -> str | None:
    """The allowed container the bytes start like, or None."""
    if len(data) >= 12 and data[4:8] in _BMFF_BOXES:
        if data[4:8] == b"ftyp" and data[8:12] in _IMAGE_BRANDS:
            return None
        return "MP4/MOV"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "WebM/Matroska"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "AVI"
    return None


def read_header(data: bytes, field: str) -> _Header:
    """Frame count, fps and frame size from the container, as vLLM's loader reads them."""
    import cv2

    if container_of(data) is None:
        raise VideoDecodeError(
            f"not a supported video; accepted containers: {', '.join(ALLOWED_CONTAINERS)}",
            field=field,
        )
    api = vllm_adapter.cv2_stream_api()
    if api is None:
        raise VideoDecodeError("this OpenCV build cannot read videos from memory", field=field)
    # ``stream`` must outlive ``release()``: OpenCV 5 does not keep the stream alive itself,
    # and releasing a capture whose only reference it held crashes the process.
    stream = io.BytesIO(data)
    cap = cv2.VideoCapture(stream, api, [])
    try:
        if not cap.isOpened():
            raise VideoDecodeError(
                "cannot open video: the file is truncated or corrupt", field=field
            )
        frames = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        fps = cap.get(cv2.CAP_PROP_FPS)
        width = cap.get(cv2.CAP_PROP_FRAME_WIDTH)
        height = cap.get(cv2.CAP_PROP_FRAME_HEIGHT)
    finally:
        cap.release()
        del stream
    # int() as vLLM's ``get_video_metadata`` does (after a finiteness check it skips).
    frames = int(frames) if math.isfinite(frames) else 0
    if frames < 1:
        raise VideoDecodeError("video has no frames (or its header does not say)", field=field)
    if not (math.isfinite(fps) and fps > 0):
        raise VideoDecodeError("video has no known frame rate in its header", field=field)
    width = int(width) if math.isfinite(width) else 0
    height = int(height) if math.isfinite(height) else 0
    if width < 1 or height < 1:
        raise VideoDecodeError(f"video frames have no pixels ({width}x{height})", field=field)
    return _Header(frames=frames, fps=float(fps), width=width, height=height)


def sampled_indices(header: _Header, limits: VideoLimits, field: str) -> list[int]:
    """The frames the loader will decode, refused when one cannot be sampled at all."""
    try:
        indices = vllm_adapter.video_frame_indices(
            limits.loader,
            total_frames=header.frames,
            source_fps=header.fps,
            max_frames=limits.max_frames,
            fps=limits.fps,
        )
    except (ValueError, ZeroDivisionError, RuntimeError) as exc:
        # The Qwen2-VL sampler divides by zero below two frames (its temporal patch).
        raise VideoDecodeError(
            f"video of {header.frames} frame(s) at {header.fps:g} fps cannot be sampled by "
            f"vLLM's {limits.loader!r} loader ({type(exc).__name__}: {exc})",
            field=field,
        ) from None
    unique = sorted(set(indices))
    if not unique or unique[0] < 0 or unique[-1] >= header.frames:
        raise VideoDecodeError(
            f"vLLM's {limits.loader!r} loader sampled no usable frame of {header.frames}",
            field=field,
        )
    return unique


def check_limits(header: _Header, n_sampled: int, limits: VideoLimits, field: str) -> float:
    """The duration, after refusing a video over any cap (all read from the header)."""
    duration = header.frames / header.fps  # as vLLM computes it
    if duration > limits.max_duration_s:
        raise InvalidInput(
            f"video is {duration:.3g} s long ({header.frames} frames at {header.fps:g} fps), "
            f"above {MAX_DURATION_SETTING}={limits.max_duration_s:g}",
            field=field,
        )
    frame_pixels = header.width * header.height
    vllm_max = vllm_adapter.max_video_frame_pixels()
    if 0 < vllm_max < frame_pixels:
        raise InvalidInput(
            f"video frames are {header.width}x{header.height} = {frame_pixels} pixels, "
            f"above vLLM's VLLM_MAX_IMAGE_PIXELS={vllm_max}",
            field=field,
        )
    if n_sampled * frame_pixels > limits.max_pixels:
        raise InvalidInput(
            f"video samples {n_sampled} frames of {header.width}x{header.height} = "
            f"{n_sampled * frame_pixels} pixels, above {MAX_PIXELS_SETTING}={limits.max_pixels}",
            field=field,
        )
    return duration


def prepare_video(source: str | bytes, *, field: str, limits: VideoLimits) -> PreparedVideo:
    """A fetched or inline (data URI, raw base64) video, checked and sampled as vLLM would.

    The whole CPU-bound path in one call, so a job's video makes one trip to a worker.
    Every cap is checked from the header; the only decoding is vLLM's loader, which reads
    the file up to the last sampled frame.
    """
    if isinstance(source, bytes):
        data = source
        if len(data) > limits.max_bytes:
            raise InvalidInput(
                f"video is larger than {MAX_BYTES_SETTING}={limits.max_bytes} bytes", field=field
            )
        if not data:
            raise InvalidInput("video is empty", field=field)
    else:
        data = decode_inline(
            source, field, limits.max_bytes, media="video", limit_name=MAX_BYTES_SETTING
        )
    header = read_header(data, field)
    indices = sampled_indices(header, limits, field)
    duration = check_limits(header, len(indices), limits, field)
    try:
        frames, metadata = vllm_adapter.load_video(
            limits.loader, data, max_frames=limits.max_frames, fps=limits.fps
        )
    except Exception as exc:  # cv2 and vLLM raise many types for broken streams
        if "VLLM_MAX_IMAGE_PIXELS" in str(exc):  # the limit changed since the check above
            raise InvalidInput(f"video frames are too large: {exc}", field=field) from None
        raise VideoDecodeError(
            f"video data is truncated or corrupt ({type(exc).__name__}: {exc})", field=field
        ) from None
    got = list(metadata.get("frames_indices") or [])
    if got != indices or len(frames) != len(indices):
        # vLLM only logs a warning and sends fewer frames; a job should not silently get
        # a different video from the one its header (and our caps) described.
        raise VideoDecodeError(
            f"video data is truncated or corrupt: decoded {len(frames)} of the "
            f"{len(indices)} sampled frames (the header promises {header.frames})",
            field=field,
        )
    return PreparedVideo(
        frames=frames,
        metadata=metadata,
        original_size=(header.width, header.height),
        duration_s=duration,
        source_fps=header.fps,
        nbytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        sampling=limits.sampling,
    )
