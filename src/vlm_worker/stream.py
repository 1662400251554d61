"""Grouping engine deltas into streamed chunks whose size grows as the stream goes on.

The first chunk goes out as soon as ``min_size`` tokens exist (fast first token); each
later chunk may hold ``growth`` times more, up to ``max_size``, so a long answer costs a
handful of queue posts instead of one per token.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from .engine import Delta


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


async def batched(deltas: AsyncIterator[Delta], policy: BatchPolicy) -> AsyncIterator[Delta]:
    """Merge deltas until the current batch size is reached; the last batch always flushes."""
    sizes = policy.sizes()
    pending: Delta | None = None
    async for delta in deltas:
        if pending is None:
            pending = delta
        else:
            pending.merge(delta)
        if pending.finished or pending.tokens >= sizes.current:
            yield pending
            pending = None
            sizes.advance()
    if pending is not None:
        yield pending
