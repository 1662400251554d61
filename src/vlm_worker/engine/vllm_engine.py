"""vLLM's ``AsyncLLM`` behind the ``Engine`` protocol (``engine.protocol``).

Why a thread of its own: vLLM's ``AsyncLLM`` binds its output handler and ZMQ sockets
to the event loop it first runs in, while the runpod SDK starts a fresh loop
(``asyncio.run`` for the queue, uvicorn for ``--rp_serve_api``). Owning one loop on a
background thread lets the engine start and warm up before the SDK's loop exists, and
serve whatever loop the SDK happens to use. Deltas cross loops with
``call_soon_threadsafe`` (microseconds per chunk) and are merged when the reader lags.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from vlm_worker.adapters.vllm import (
    engine_exception_types,
    engine_input,
    is_prompt_too_long,
    log_stats_interval,
    num_unfinished_requests,
    request_error_types,
    serving_usage_context,
    validation_parameter,
)
from vlm_worker.contract.errors import (
    EngineDead,
    EngineError,
    InvalidInput,
    PromptTooLong,
    WorkerError,
)
from vlm_worker.engine.deltas import Batcher, Delta
from vlm_worker.engine.protocol import EngineRequest, ModelInfo

log = logging.getLogger("vlm_worker.engine.vllm_engine")


class VllmEngine:
    """``AsyncLLM`` running on its own event loop thread."""

    def __init__(
        self, llm: Any, info: ModelInfo, loop: asyncio.AbstractEventLoop, thread: threading.Thread
    ) -> None:
        self._llm = llm
        self.info = info
        self._loop = loop
        self._thread = thread
        self._closed = False
        self._stats: concurrent.futures.Future[None] | None = None

    # ---------------------------------------------------------------- start / stop
    @classmethod
    def start(
        cls,
        engine_kwargs: dict[str, Any],
        info_factory: Callable[[Any], ModelInfo],
        on_start: Callable[[Any, asyncio.AbstractEventLoop], None] | None = None,
    ) -> VllmEngine:
        """Create the engine on a fresh loop thread; raise if the model cannot load.

        ``on_start(llm, loop)`` sees the ``AsyncLLM`` and its loop once both are up
        (``PipelineHooks.engine_started``); nothing else gets them.
        """
        loop = asyncio.new_event_loop()
        ready: threading.Event = threading.Event()
        thread = threading.Thread(
            target=_run_loop, args=(loop, ready), name="vllm-engine-loop", daemon=True
        )
        thread.start()
        ready.wait()

        async def create() -> Any:
            from vllm import AsyncEngineArgs, AsyncLLMEngine

            # `vllm serve`'s usage context, not the library default: vLLM picks its batch
            # defaults (max_num_batched_tokens, max_num_seqs) by context, and the library
            # one gives a large GPU a quarter of the server's prefill batch.
            return AsyncLLMEngine.from_engine_args(
                AsyncEngineArgs(**engine_kwargs), usage_context=serving_usage_context()
            )

        try:
            llm = asyncio.run_coroutine_threadsafe(create(), loop).result()
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            raise
        try:
            info = info_factory(llm)
        except BaseException:
            engine = cls(llm, None, loop, thread)  # type: ignore[arg-type]
            engine.shutdown()
            raise
        engine = cls(llm, info, loop, thread)
        if getattr(llm, "log_stats", False):  # DISABLE_LOG_STATS=true turns it off
            engine.log_stats_every(log_stats_interval())
        if on_start is not None:
            on_start(llm, loop)
        return engine

    def log_stats_every(self, interval: float) -> None:
        """vLLM's periodic throughput, queue and KV-cache lines (one per data parallel
        engine), as `vllm serve` logs them: ``AsyncLLM`` records the stats, but only a
        server's loop asks it to log them."""

        async def tick() -> None:
            while not self._closed:
                await asyncio.sleep(interval)
                try:
                    await self._llm.do_log_stats()
                except Exception as exc:  # a stats line must never take the engine down
                    log.debug("vLLM stats logging raised %s", type(exc).__name__)

        self._stats = asyncio.run_coroutine_threadsafe(tick(), self._loop)

    def shutdown(self) -> None:
        """Stop the engine core process and the loop thread; safe to call twice."""
        if self._closed:
            return
        self._closed = True

        async def stop() -> None:
            if self._stats is not None:
                self._stats.cancel()
            self._llm.shutdown()

        try:
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=60)
        except Exception as exc:  # a dead engine may fail to shut down cleanly
            log.warning("engine shutdown raised %s", type(exc).__name__)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------- state
    @property
    def dead(self) -> bool:
        return bool(self._llm.errored) or self._closed

    def _decode(self, token_id: int) -> str:
        return str(self.info.tokenizer.decode([token_id]))

    async def num_unfinished(self) -> int:
        """Requests vLLM still tracks: zero once every job has ended, however it ended."""
        fut = asyncio.run_coroutine_threadsafe(self._unfinished(), self._loop)
        return await asyncio.wrap_future(fut)

    async def _unfinished(self) -> int:
        return num_unfinished_requests(self._llm)

    # --------------------------------------------------------------- generate
    async def generate(self, request: EngineRequest) -> AsyncIterator[Delta]:
        """Deltas for one request; closing or cancelling this iterator aborts it in vLLM."""
        if self.dead:
            raise EngineDead("the engine has stopped; this worker is restarting")
        params = _sampling_params(request.sampling)
        logprobs = request.sampling.get("logprobs") is not None
        prompt_logprobs = request.sampling.get("prompt_logprobs") is not None
        decode = self._decode
        with_ids = request.return_token_ids
        lora_request = _lora_request(request.lora)
        caller = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
        put = queue.put_nowait
        prompt: dict[str, Any] = {"prompt": request.prompt}
        tokenized = request.prompt_token_ids is not None
        if tokenized:
            prompt["prompt_token_ids"] = request.prompt_token_ids
        data, uuids = _multi_modal(request)
        if data:
            prompt["multi_modal_data"] = data
        if uuids:
            prompt["multi_modal_uuids"] = uuids
        if request.mm_processor_kwargs:
            prompt["mm_processor_kwargs"] = request.mm_processor_kwargs

        async def pump() -> None:
            batchers: dict[int, Batcher] = {}  # one per choice (``n``)
            try:
                finished = False
                extra = {"lora_request": lora_request} if lora_request is not None else {}
                # The model's processor off this loop, in vLLM's renderer threads (as
                # `vllm serve` runs it): on the loop it stalls every request's output.
                ready = await engine_input(self._llm, prompt) if tokenized else prompt
                stream = self._llm.generate(ready, params, request.request_id, **extra)
                prompt_ids_due = with_ids  # the prompt's ids once, not with every token
                async for out in stream:
                    deltas = _deltas(
                        out, logprobs, prompt_logprobs, decode, with_ids, prompt_ids_due
                    )
                    prompt_ids_due = prompt_ids_due and out.prompt_token_ids is None
                    for delta in deltas:
                        batcher = batchers.setdefault(delta.index, Batcher(request.batch))
                        batch = batcher.add(delta)
                        if batch is not None:
                            finished = batch.finished
                            caller.call_soon_threadsafe(put, batch)
                if not finished:
                    # vLLM ended the stream without a finished output: end ours too, so
                    # the reader never waits for a delta that will not come.
                    pending = [b.flush() for b in batchers.values()]
                    last = next((d for d in pending if d is not None), None) or Delta()
                    last.finished, last.finish_reason = True, last.finish_reason or "abort"
                    caller.call_soon_threadsafe(put, last)
            except BaseException as exc:  # delivered to the reader, which re-raises ours
                caller.call_soon_threadsafe(put, exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise

        future = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        finished = False
        held: Delta | BaseException | None = None
        try:
            while not finished:
                item = held if held is not None else await queue.get()
                held = None
                # A lagging reader takes what has queued as one delta, per choice: a
                # choice's end and the request's end stay deltas of their own.
                while not isinstance(item, BaseException) and not queue.empty():
                    nxt = queue.get_nowait()
                    if isinstance(nxt, BaseException) or nxt.index != item.index or item.done:
                        held = nxt
                        break
                    item.merge(nxt)
                if isinstance(item, BaseException):
                    raise _translate(item, request)
                finished = item.finished
                yield item
        finally:
            if not future.done():
                future.cancel()  # CancelledError inside AsyncLLM.generate aborts the request


def _run_loop(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
    asyncio.set_event_loop(loop)
    loop.call_soon(ready.set)
    loop.run_forever()


def _multi_modal(request: EngineRequest) -> tuple[dict[str, Any], dict[str, Any]]:
    """``multi_modal_data`` and ``multi_modal_uuids``: one item as itself, several as a
    list in prompt order (vLLM's forms); a video is ``(frames, metadata)`` as its loaders
    return it."""
    data: dict[str, Any] = {}
    uuids: dict[str, Any] = {}
    for modality, items, ids in (
        ("image", request.images, request.image_ids),
        ("video", request.videos, request.video_ids),
    ):
        if not items:
            continue
        single = len(items) == 1
        data[modality] = items[0] if single else list(items)
        if ids:
            uuids[modality] = ids[0] if single else list(ids)
    return data, uuids


def _lora_request(lora: tuple[str, int, str] | None) -> Any:
    if lora is None:
        return None
    from vllm.lora.request import LoRARequest

    name, number, path = lora
    return LoRARequest(name, number, path)


def _sampling_params(values: dict[str, Any]) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    values = dict(values)
    structured = values.pop("structured_outputs", None)
    try:
        if structured is not None:
            values["structured_outputs"] = StructuredOutputsParams(**structured)
        return SamplingParams(**values, output_kind=RequestOutputKind.DELTA)
    except (*request_error_types(), TypeError) as exc:
        raise InvalidInput(
            f"sampling parameters rejected by the engine: {exc}", field="sampling_params"
        ) from exc


def _deltas(
    out: Any,
    logprobs: bool,
    prompt_logprobs: bool,
    decode: Decode,
    token_ids: bool = False,
    prompt_ids: bool = False,
) -> list[Delta]:
    """One delta per choice in this output (vLLM's delta outputs carry one choice each).

    ``finished`` marks the request's end; a choice's own end is its ``finish_reason``.
    """
    completions = out.outputs or [None]
    deltas = []
    for n, completion in enumerate(completions):
        tokens = len(completion.token_ids) if completion is not None else 0
        delta = Delta(
            text=completion.text if completion is not None else "",
            tokens=tokens,
            prompt_tokens=len(out.prompt_token_ids) if out.prompt_token_ids is not None else None,
            finished=bool(out.finished) and n == len(completions) - 1,
            finish_reason=completion.finish_reason if completion is not None else None,
            stop_reason=completion.stop_reason if completion is not None else None,
            first_token_at=time.perf_counter() if tokens else None,
            index=completion.index if completion is not None else 0,
        )
        if logprobs and completion is not None:
            delta.logprobs = token_logprobs(completion.token_ids, completion.logprobs, decode)
        if token_ids and completion is not None:
            delta.token_ids = list(completion.token_ids)
        if prompt_ids and n == 0 and out.prompt_token_ids is not None:
            delta.prompt_token_ids = list(out.prompt_token_ids)
        if prompt_logprobs and n == 0 and out.prompt_logprobs is not None:
            ids = out.prompt_token_ids or []
            delta.prompt_logprobs = token_logprobs(ids, out.prompt_logprobs, decode)
        deltas.append(delta)
    return deltas


#: One token id -> its text, for a token vLLM reports no logprob for (a prompt's first).
Decode = Callable[[int], str]


def token_logprobs(
    token_ids: Sequence[int], steps: Sequence[dict[int, Any] | None] | None, decode: Decode
) -> list[dict[str, Any]]:
    """Each token's log probability, in OpenAI's per-token shape, from vLLM's per-step
    dicts: the token's own entry, and in ``top_logprobs`` every entry of the step in
    vLLM's order (the token itself first, then the most likely), floored at -9999 as
    ``vllm serve`` does. The routes cut ``top_logprobs`` to what their API returns. A
    step vLLM has no dict for (a prompt's first token) has ``None`` for both."""
    out: list[dict[str, Any]] = []
    for i, token_id in enumerate(token_ids):
        step = steps[i] if steps is not None and i < len(steps) else None
        own = step.get(token_id) if step is not None else None
        if step is None or own is None:
            text = decode(token_id)
            out.append(
                {"token": text, "logprob": None, "bytes": _bytes(text), "top_logprobs": None}
            )
            continue
        decoded = own.decoded_token
        out.append(
            {
                "token": _decoded(own, token_id, decode),
                "logprob": max(own.logprob, -9999.0),
                "bytes": None if decoded is None else _bytes(decoded),
                "top_logprobs": [
                    {
                        "token": (text := _decoded(alt, alt_id, decode)),
                        "logprob": max(alt.logprob, -9999.0),
                        "bytes": _bytes(text),
                    }
                    for alt_id, alt in step.items()
                ],
            }
        )
    return out


def _decoded(logprob: Any, token_id: int, decode: Decode) -> str:
    """vLLM's text for the token (possibly empty), or the tokenizer's when it has none."""
    return logprob.decoded_token if logprob.decoded_token is not None else decode(token_id)


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


#: Words in vLLM's messages about a structured-output request it cannot compile.
_STRUCTURED_WORDS = ("structured", "grammar", "schema", "json", "regex", "choice", "xgrammar")


def _translate(exc: BaseException, request: EngineRequest) -> BaseException:
    """vLLM's exceptions as ours, at this one boundary (cancellation passes through).

    A request vLLM refuses names the job's field where it can: vLLM's validation errors
    carry the parameter, and a structured-output request it cannot compile says so.
    """
    if isinstance(exc, (WorkerError, asyncio.CancelledError)):
        return exc
    EngineDeadError, EngineGenerateError = engine_exception_types()
    if isinstance(exc, EngineDeadError):
        err: WorkerError = EngineDead("the engine died while generating; the worker is restarting")
    elif isinstance(exc, EngineGenerateError):
        err = EngineError(f"the engine failed this request: {exc}")
    elif isinstance(exc, request_error_types()):
        parameter = validation_parameter(exc)
        structured = "structured_outputs" in request.sampling and any(
            word in str(exc).lower() for word in _STRUCTURED_WORDS
        )
        if is_prompt_too_long(exc):
            err = PromptTooLong(str(exc), field="messages")
        elif parameter is not None:
            err = InvalidInput(f"{parameter}: {exc}", field=f"sampling_params.{parameter}")
        elif structured:
            err = InvalidInput(
                f"structured_outputs: the engine cannot use this: {exc}",
                field="sampling_params.structured_outputs",
            )
        else:
            err = InvalidInput(f"the engine rejected this request: {exc}")
    else:
        err = EngineError(f"the engine failed this request ({type(exc).__name__}: {exc})")
    err.__cause__ = exc
    return err
