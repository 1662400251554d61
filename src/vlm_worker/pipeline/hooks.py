"""Observation points on the job path, for an observer that is not the worker itself.

The benchmark needs to see inside a job (how long its image took, how long its prompt
took to render, where the image process spent its time) and to drive the bare engine
beside the worker. It used to do that by replacing private attributes of the runner and
the image pool; now it passes a ``PipelineHooks`` subclass to ``start_worker`` and the job
path calls it at fixed points. The base class does nothing: a served job pays one method
call per point.

Hooks run on the thread that did the work (the event loop for ``image_prepared``, a
prompt thread for ``prompt_rendered``) and must return quickly; an exception in one
fails the job it observed, as any bug in the job path would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from vlm_worker.media.images import PreparedImage

#: The function an image worker runs for one image (``media.images.prepare_source``'s
#: signature). It crosses to image processes, so it must be picklable.
PrepareFn = Callable[..., PreparedImage]


class PipelineHooks:
    """Override what you want to observe; every method of the base class does nothing."""

    def engine_started(self, llm: Any, loop: asyncio.AbstractEventLoop) -> None:
        """Once, when vLLM is up: its ``AsyncLLM`` and the event loop it runs on.

        The benchmark's baseline (``AsyncLLM.generate`` with no worker around it) has to run
        on that loop, because the engine's output handler is bound to it.
        """

    def image_prepared(
        self, started: float, ended: float, image: PreparedImage, alone: bool
    ) -> None:
        """An image is ready (``perf_counter`` times around the image pool's work,
        queueing included); ``alone``: no other job was preparing, so it ran in a thread."""

    def prompt_rendered(self, seconds: float) -> None:
        """A job's chat template was rendered and tokenized, taking ``seconds``."""

    def image_function(self) -> PrepareFn | None:
        """The function image workers should run instead of the worker's own, or None.

        Asked for every image, so an observer can switch tracing on and off between rounds.
        """
        return None


#: What the worker runs with when nobody observes it.
NO_HOOKS = PipelineHooks()
