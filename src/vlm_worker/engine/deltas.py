"""Grouping engine deltas into streamed chunks whose size grows as the stream goes on.

The first chunk goes out as soon as ``min_size`` tokens with text exist (fast first token); each
later chunk may hold ``growth`` times more, up to ``max_size``, so a long answer costs a
handful of queue posts instead of one per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Delta:
    """New output since the last delta; several merge into one when the reader lags."""

    text: str = ""
    tokens: int = 0
    prompt_tokens: int | None = None
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    first_token_at: float | None = None  # perf_counter() when this delta's first token was seen
    #: One entry per token, in OpenAI's shape, when the request asked for logprobs.
    logprobs: list[dict[str, Any]] | None = None
    #: The prompt's tokens in the same shape, once, when the request asked for them.
    prompt_logprobs: list[dict[str, Any]] | None = None
    #: Which choice this is (``n`` > 1); deltas of different choices never merge.
    index: int = 0
    #: The generated token ids, when the request asked for them.
    token_ids: list[int] | None = None
    #: The prompt's token ids as vLLM expanded them (image placeholders included), once,
    #: when the request asked for token ids: what ``vllm serve`` returns for
    #: ``return_token_ids``.
    prompt_token_ids: list[int] | None = None

    @property
    def done(self) -> bool:
        """The choice has ended (``finish_reason``), or the whole request has."""
        return self.finished or self.finish_reason is not None

    def merge(self, other: Delta) -> None:
        self.prompt_logprobs = self.prompt_logprobs or other.prompt_logprobs
        self.prompt_token_ids = self.prompt_token_ids or other.prompt_token_ids
        if other.token_ids is not None:
            if self.token_ids is None:
                self.token_ids = list(other.token_ids)
            else:
                self.token_ids.extend(other.token_ids)
        if other.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = list(other.logprobs)
            else:
                self.logprobs.extend(other.logprobs)
        self.text += other.text
        self.tokens += other.tokens
        self.prompt_tokens = self.prompt_tokens or other.prompt_tokens
        self.finished = other.finished
        self.finish_reason = other.finish_reason or self.finish_reason
        self.stop_reason = other.stop_reason if other.stop_reason is not None else self.stop_reason
        self.first_token_at = self.first_token_at or other.first_token_at


@dataclass(frozen=True)
class BatchPolicy:
    min_size: int = 1
    max_size: int = 50
    growth: float = 3.0

    def sizes(self) -> BatchSizes:
        return BatchSizes(self)


class BatchSizes:
    def __init__(self, policy: BatchPolicy) -> None:
        self._policy = policy
        self.current = policy.min_size

    def advance(self) -> None:
        if self._policy.growth <= 1:
            return
        grown = max(self.current + 1, int(self.current * self._policy.growth))
        self.current = min(self._policy.max_size, grown)


class Batcher:
    """Accumulates deltas and says when a batch is due; pure, so it runs anywhere.

    The vLLM engine runs one in its own loop, next to ``AsyncLLM.generate``: only whole
    batches cross to the handler's loop, so the per-token work of the worker is a few
    attribute updates, not a thread hop per token.
    """

    def __init__(self, policy: BatchPolicy | None) -> None:
        self._sizes = policy.sizes() if policy is not None else None
        self._pending: Delta | None = None

    def add(self, delta: Delta) -> Delta | None:
        if self._pending is None:
            self._pending = delta
        else:
            self._pending.merge(delta)
        pending = self._pending
        # Tokens that are still pieces of a character carry no text: a batch of them would
        # be dropped by the reader, and counting it would grow the next batch and delay
        # the first visible text. They wait for the token that completes them.
        if (
            self._sizes is None
            or pending.done
            or (pending.tokens >= self._sizes.current and pending.text)
        ):
            self._pending = None
            if self._sizes is not None:
                self._sizes.advance()
            return pending
        return None

    def flush(self) -> Delta | None:
        pending, self._pending = self._pending, None
        return pending


#: Non-streamed jobs: nothing goes out before the end.
FINAL_ONLY = BatchPolicy(min_size=2**62, max_size=2**62, growth=1.0)
