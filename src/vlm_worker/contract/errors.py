"""Every failure the worker reports, in one tree, each with a stable ``type`` string.

    WorkerError                      (base: one JSON shape for every failure)
    ├── InvalidInput                 invalid_input      the job's JSON is malformed
    ├── ImageError                   (image and video problems)
    │   ├── ImageFetchError          image_fetch        the URL could not be fetched
    │   ├── ImageDecodeError         image_decode       the bytes are not a usable image
    │   └── VideoDecodeError         video_decode       the bytes are not a usable video
    ├── PromptError                  prompt             the chat template output is unusable
    │   └── PromptTooLong            prompt_too_long    text + image tokens exceed the context
    ├── JobTimeout                   timeout            the job ran past its deadline
    ├── EngineError                  engine_error       the engine failed this request
    │   └── EngineDead               engine_error       the engine is gone; the worker exits
    └── ConfigError                  config             a setting is invalid (start-up only)

Clients branch on ``type``, so the strings never change once released. ``fatal`` tells
the worker whether it may keep serving other jobs afterwards: only a dead engine is fatal
(mirroring vLLM's split between ``EngineGenerateError`` and ``EngineDeadError``).
"""

from __future__ import annotations

import json
from typing import Any, ClassVar


class WorkerError(Exception):
    """Base class: a message meant for the client, plus the field it is about."""

    type: ClassVar[str] = "internal"
    fatal: ClassVar[bool] = False

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, Any]:
        """The one error shape every client sees: ``{"error": {type, message[, field]}}``."""
        body: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return {"error": body}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(type={self.type!r}, field={self.field!r}, message={self.message!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Image work can fail in a worker process; the error crosses back pickled, and
        # Exception's default pickling would drop the keyword-only ``field``.
        return (_rebuild, (type(self), self.message, self.field))


def _rebuild(cls: type[WorkerError], message: str, field: str | None) -> WorkerError:
    return cls(message, field=field)


class InvalidInput(WorkerError):
    type = "invalid_input"


class ImageError(WorkerError):
    type = "image"


class ImageFetchError(ImageError):
    type = "image_fetch"


class ImageDecodeError(ImageError):
    type = "image_decode"


class VideoDecodeError(ImageError):
    """A video the worker cannot open or decode; its caps (size, length) are ``InvalidInput``.

    Under ``ImageError`` because clients already branch on that family for media they sent;
    its own ``type`` keeps the two media apart.
    """

    type = "video_decode"


class PromptError(WorkerError):
    type = "prompt"


class PromptTooLong(PromptError):
    type = "prompt_too_long"


class JobTimeout(WorkerError):
    type = "timeout"


class EngineError(WorkerError):
    type = "engine_error"


class EngineDead(EngineError):
    """Same ``type`` as any engine failure for clients (retry elsewhere); fatal for the worker."""

    fatal = True


class ConfigError(WorkerError):
    """Raised at start-up only; the worker exits with this message instead of serving."""

    type = "config"


def internal_error(exc: BaseException) -> WorkerError:
    """Wrap an unexpected exception without leaking its internals (paths, data) to clients."""
    return WorkerError(f"internal error ({type(exc).__name__}); see the worker log")


class ErrorBody(dict):
    """The error object; ``str()`` gives JSON, because the runpod SDK reports a failed
    stream's error as ``str(output["error"])`` and clients should be able to parse it."""

    def __str__(self) -> str:
        return json.dumps(self, ensure_ascii=False)


def error_chunk(err: WorkerError) -> dict[str, Any]:
    return {"error": ErrorBody(err.to_dict()["error"])}
