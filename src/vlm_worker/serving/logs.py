"""Structured logs: ``key=value`` text for people, one JSON object per line for machines.

Call sites pass facts through ``extra=`` (job id, sizes, timings), never image bytes or
prompts. As a last line of defence every formatted line has the values of secret-looking
environment variables (``*TOKEN*``, ``*KEY*``, ``*SECRET*``, ``*PASSWORD*``) masked.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Mapping

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|CREDENTIAL", re.I)


def secret_values(env: Mapping[str, str]) -> list[str]:
    return sorted(
        (v for k, v in env.items() if _SECRET_NAME.search(k) and len(v) >= 8),
        key=len,
        reverse=True,
    )


class _Base(logging.Formatter):
    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self._secrets = secrets

    def mask(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    @staticmethod
    def fields(record: logging.LogRecord) -> dict[str, object]:
        return {k: v for k, v in vars(record).items() if k not in _RESERVED}


class TextFormatter(_Base):
    def format(self, record: logging.LogRecord) -> str:
        parts = [
            self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            record.levelname,
            record.name,
            record.getMessage(),
        ]
        parts += [f"{k}={v}" for k, v in self.fields(record).items()]
        line = " ".join(str(p) for p in parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return self.mask(line)


class JsonFormatter(_Base):
    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **self.fields(record),
        }
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return self.mask(json.dumps(body, default=str, ensure_ascii=False))


def setup(level: str = "INFO", fmt: str = "text", env: Mapping[str, str] | None = None) -> None:
    """Configure the ``vlm_worker`` loggers (vLLM and runpod keep their own handlers)."""
    env = os.environ if env is None else env
    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonFormatter if fmt == "json" else TextFormatter
    handler.setFormatter(formatter(secret_values(env)))
    logger = logging.getLogger("vlm_worker")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
