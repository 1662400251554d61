"""One job, from raw input to streamed chunks: validate, load images, render, generate.

Every failure becomes one ``{"error": {...}}`` chunk (the stream's last), raised as a
``WorkerError`` somewhere below and turned into the client shape here only. Cancellation
is not a failure: it propagates, and the engine iterator's ``finally`` aborts the request.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import Any

from vlm_worker.config.cpu_defaults import available_memory
from vlm_worker.config.lora_modules import LoraAdapter
from vlm_worker.config.settings import WorkerSettings
from vlm_worker.contract.errors import (
    InvalidInput,
    JobTimeout,
    WorkerError,
    error_chunk,
    internal_error,
)
from vlm_worker.contract.job_schema import Job, parse_job
from vlm_worker.engine.deltas import FINAL_ONLY, BatchPolicy, Delta
from vlm_worker.engine.protocol import Engine, EngineRequest
from vlm_worker.media.fetch import FetchLimits, ImageFetcher, video_kind
from vlm_worker.media.geometry import ImageGeometry
from vlm_worker.media.images import ImageLimits, PreparedImage, is_url
from vlm_worker.media.video import PreparedVideo
from vlm_worker.pipeline.hooks import NO_HOOKS, PipelineHooks
from vlm_worker.pipeline.image_pool import ImagePool
from vlm_worker.pipeline.pixel_budget import PixelBudget, default_budget, header_pixels
from vlm_worker.prompt import grounding, grounding_styles
from vlm_worker.prompt.chat import (
    check_length,
    normalize_placeholders,
    refuse_special_tokens,
    render,
    template_messages,
)

log = logging.getLogger("vlm_worker.pipeline.runner")


class Deadline:
    """JOB_TIMEOUT for a whole job: preparation and every wait for the next chunk.

    Cancelling the pending step (what ``wait_for`` does on expiry) closes the engine
    iterator, which aborts the request in vLLM; the client gets a ``timeout`` error.
    """

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.end = None if seconds is None else time.monotonic() + seconds

    def _left(self) -> float | None:
        return None if self.end is None else max(0.0, self.end - time.monotonic())

    def _expired(self) -> JobTimeout:
        return JobTimeout(f"the job ran longer than JOB_TIMEOUT={self.seconds:g}s and was aborted")

    async def run(self, awaitable: Any) -> Any:
        try:
            return await asyncio.wait_for(awaitable, self._left())
        except asyncio.TimeoutError:
            raise self._expired() from None

    async def iterate(self, source: AsyncIterator[Any]) -> AsyncIterator[Any]:
        if self.end is None:
            async for item in source:
                yield item
            return
        iterator = source.__aiter__()
        try:
            while True:
                try:
                    item = await asyncio.wait_for(iterator.__anext__(), self._left())
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    raise self._expired() from None
                yield item
        finally:
            await iterator.aclose()  # type: ignore[attr-defined]


@dataclass
class Prepared:
    """A validated job, ready for the engine."""

    job: Job
    prompt: str
    images: list[PreparedImage]
    prompt_tokens: int
    sampling: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    mm_processor_kwargs: dict[str, Any] | None = None
    #: The prompt text's token ids (one per image placeholder), tokenized in our thread
    #: pool so that vLLM's event loop need not.
    prompt_token_ids: list[int] | None = None
    #: The LoRA adapter the job's ``model`` names, or None for the base model.
    adapter: LoraAdapter | None = None
    #: The job's videos, sampled and decoded, in prompt order.
    videos: list[PreparedVideo] = field(default_factory=list)
    #: A grounding job's targets beyond one prompt (``instructions``): each its own
    #: prompt over the same image.
    targets: list[Target] | None = None


@dataclass(frozen=True)
class Target:
    """One element to locate: its description and its own prompt over the shared image."""

    instruction: str
    prompt: str
    prompt_token_ids: list[int]
    prompt_tokens: int


@dataclass
class Clock:
    start: float = field(default_factory=time.perf_counter)
    ready: float | None = None
    first_token: float | None = None
    end: float | None = None

    def timings(self, completion_tokens: int) -> dict[str, float | None]:
        end = self.end or time.perf_counter()
        ready = self.ready or end
        gen_s = end - ready

        def ms(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else round((b - a) * 1000, 2)

        return {
            "preprocess_ms": ms(self.start, self.ready),
            "time_to_first_token_ms": ms(self.start, self.first_token),
            "generation_ms": ms(ready, end),
            "total_ms": ms(self.start, end),
            "tokens_per_second": round(completion_tokens / gen_s, 2) if gen_s > 0 else None,
        }


class JobRunner:
    """Runs jobs against one engine; shared by every concurrent job of the worker."""

    def __init__(
        self,
        engine: Engine,
        settings: WorkerSettings,
        *,
        executor: Executor | None = None,
        images: ImagePool | None = None,
        fetcher: ImageFetcher | None = None,
        on_fatal: Callable[[WorkerError], None] | None = None,
        hooks: PipelineHooks = NO_HOOKS,
        adapters: Mapping[str, LoraAdapter] | None = None,
    ) -> None:
        self.engine = engine
        self.hooks = hooks
        #: LoRA adapters by the name a job's ``model`` gives (``LORA_MODULES``).
        self.adapters = dict(adapters or {})
        self.settings = settings
        self.executor = executor
        self.images = images or ImagePool(processes=0, threads=executor, hooks=hooks)
        self.limits = ImageLimits(settings.max_image_bytes, settings.max_image_source_pixels)
        #: Decoded pixels in flight across jobs (MAX_PIXELS_IN_FLIGHT).
        self.pixel_budget = PixelBudget(
            settings.max_pixels_in_flight or default_budget(available_memory())
        )
        self.fetcher = fetcher or ImageFetcher(FetchLimits.from_settings(settings))
        self.on_fatal = on_fatal
        self.policy = BatchPolicy(
            settings.default_min_batch_size,
            settings.default_batch_size,
            settings.default_batch_size_growth_factor,
        )
        self.in_flight = 0  # jobs in ``run``
        self.preparing = 0  # calls in ``prepare`` (a job's first stage, or a direct call)
        self._chat_template = settings.chat_template_text()
        info = engine.info
        #: The served model's grounding convention (``grounding_styles``).
        self.grounding_style, why = grounding_styles.choose(
            info.architecture,
            (settings.model_label, info.name),
            settings.grounding_style,
            settings.grounding_coordinates,
        )
        #: None for a model whose resize the worker does not reproduce: a grounding
        #: prompt must state the size the model sees.
        self.grounding_bounds = None
        if info.geometry is not None:
            style = self.grounding_style
            self.grounding_bounds = grounding.grounding_bounds(
                replace(info.geometry, resample=style.resample),
                settings.grounding_min_pixels or style.min_pixels or info.geometry.min_pixels,
                settings.grounding_max_pixels or style.max_pixels or info.geometry.max_pixels,
                info.max_image_tokens,
            )
            log.info(
                "grounding convention",
                extra={
                    "style": style.name,
                    "space": style.space,
                    "why": why,
                    "min_pixels": self.grounding_bounds.geometry.min_pixels,
                    "max_pixels": self.grounding_bounds.geometry.max_pixels,
                    "resample": style.resample,
                },
            )
            if self.grounding_bounds.note:
                log.warning(self.grounding_bounds.note)

    async def run(self, job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The runpod handler body: an async generator of chunks for one job."""
        job_id = str(job.get("id") or f"job-{uuid.uuid4().hex[:12]}")
        clock = Clock()
        self.in_flight += 1
        deadline = Deadline(self.settings.job_timeout)
        try:
            prepared = await deadline.run(self.prepare(job.get("input"), job_id))
            clock.ready = time.perf_counter()
            log.info("job accepted", extra={"job_id": job_id, **_summary(prepared, clock)})
            async for chunk in deadline.iterate(self.generate(job_id, prepared, clock)):
                yield chunk
        except WorkerError as err:
            log.warning(
                "job failed",
                extra={
                    "job_id": job_id,
                    "error_type": err.type,
                    "field": err.field,
                    "error": err.message,
                },
            )
            yield error_chunk(err)
            if err.fatal and self.on_fatal is not None:
                self.on_fatal(err)
        except (asyncio.CancelledError, GeneratorExit):
            log.info("job cancelled", extra={"job_id": job_id})
            raise
        except Exception as exc:
            log.exception("job crashed", extra={"job_id": job_id})
            yield error_chunk(internal_error(exc))
        finally:
            self.in_flight -= 1

    # ----------------------------------------------------------------- stages
    async def prepare(self, raw: Any, job_id: str) -> Prepared:
        self.preparing += 1
        try:
            return await self._prepare(raw, job_id)
        finally:
            self.preparing -= 1

    async def _prepare(self, raw: Any, job_id: str) -> Prepared:
        loop = asyncio.get_running_loop()
        # Validating a job walks all of it, a 4K image's 7 MB of base64 included: jobs that
        # arrive together would each hold the loop, and every stream's next chunk behind it,
        # for as long; in a thread, the loop runs between them.
        settings = self.settings
        job = await loop.run_in_executor(
            self.executor,
            parse_job,
            raw,
            settings.max_job_text_chars,
            settings.max_content_parts,
        )
        sources = job.image_sources()
        limit = self.settings.max_images_per_job
        if len(sources) > limit:
            raise InvalidInput(
                f"the job has {len(sources)} images; MAX_IMAGES_PER_JOB is {limit}",
                field=sources[limit][0],
            )
        # A grounding job's image is resized with its style's bounds, and vLLM's processor
        # is told the same ones, so the size its prompt states is the size the model sees.
        bounds = self._grounding_bounds() if job.task == "grounding" else None
        geometry = bounds.geometry if bounds else self._job_geometry(job)
        video_sources = self._check_videos(job)
        image_work = [self._image(f, s, geometry) for f, s in sources]
        videos: list[PreparedVideo] = []
        targets = None
        if job.task == "grounding":  # its prompt states the resized size: images first
            images = list(await asyncio.gather(*image_work))
            instructions = job.targets() or [None]
            renders = await asyncio.gather(
                *(
                    loop.run_in_executor(self.executor, self._render, job, images, instruction)
                    for instruction in instructions
                )
            )
            text, ids = renders[0]
            if job.instructions is not None:
                targets = [
                    Target(instruction, t, i, self._prompt_tokens(len(i), images))
                    for instruction, (t, i) in zip(instructions, renders, strict=True)
                ]
        else:  # the template does not need the pixels: render while they are decoded
            video_work = [self._video(f, s) for f, s in video_sources]
            rendering = loop.run_in_executor(self.executor, self._render, job, [])
            results = await asyncio.gather(
                *image_work, *video_work, rendering, return_exceptions=True
            )
            for result in results:  # an image's error first, as when they ran in turn
                if isinstance(result, BaseException):
                    raise result
            text, ids = results[-1]
            images = list(results[: len(sources)])
            videos = list(results[len(sources) : -1])
        tokens = self._prompt_tokens(len(ids), images)
        if targets is not None:
            tokens = max(target.prompt_tokens for target in targets)
        sampling, warnings = self._sampling(job, tokens)
        # The job's (or grounding's) bounds go to vLLM only where its default processor
        # would resize the worker's images: vLLM loads one more HF processor (tokenizer
        # copies included) for every new set of request kwargs, on the thread all images
        # wait for; seconds for a new max_pixels.
        mm_kwargs = None
        if geometry is not None and (videos or not self._engine_keeps_sizes(images)):
            mm_kwargs = bounds.processor_kwargs() if bounds else {
                "min_pixels": geometry.min_pixels, "max_pixels": geometry.max_pixels
            }  # fmt: skip
        ids_for_engine = None if job.raw_prompt else ids
        adapter = self._adapter(job)  # an unknown model fails here, before the engine
        return Prepared(
            job,
            text,
            images,
            tokens,
            sampling,
            warnings,
            mm_kwargs,
            ids_for_engine,
            adapter,
            videos,
            targets,
        )

    def _check_videos(self, job: Job) -> list[tuple[str, str]]:
        """The job's video sources, if this worker takes that many videos."""
        sources = job.video_sources()
        if not sources:
            return sources
        info = self.engine.info
        limit = self.settings.max_videos_per_job
        if info.video_limits is None:
            raise InvalidInput(
                f"{info.architecture} takes no video; send images instead",
                field=sources[0][0],
            )
        if len(sources) > limit:
            reason = "video is off" if limit == 0 else f"the job has {len(sources)} videos"
            raise InvalidInput(f"{reason}: MAX_VIDEOS_PER_JOB is {limit}", field=sources[limit][0])
        return sources

    def base_names(self) -> tuple[str, ...]:
        """The names the base model answers to (MODEL_NAME, the served name)."""
        return (self.engine.info.name, self.settings.model_label, self.settings.openai_model_id)

    def _adapter(self, job: Job) -> LoraAdapter | None:
        """The LoRA adapter the job's ``model`` names, or None for the base model."""
        name = job.model
        if name is None or name in self.base_names():
            return None
        adapter = self.adapters.get(name)
        if adapter is None:
            served = ", ".join([self.settings.openai_model_id, *self.adapters])
            raise InvalidInput(
                f"model: {name!r} is not served here; served: {served}", field="model"
            )
        return adapter

    def _grounding_bounds(self) -> grounding.GroundingBounds:
        if self.grounding_bounds is None:
            info = self.engine.info
            raise InvalidInput(
                f"task: grounding needs a model whose image resize the worker reproduces "
                f"(Qwen2-VL, Qwen2.5-VL, Qwen3-VL and their fine-tunes); {info.architecture} "
                "resizes in its own processor",
                field="task",
            )
        return self.grounding_bounds

    def _engine_keeps_sizes(self, images: list[PreparedImage]) -> bool:
        """Whether vLLM's processor, with the engine's own bounds, keeps every image at the
        size the worker resized it to (then a job's bounds need not reach it)."""
        base = self.engine.info.geometry
        return base is not None and all(
            image.resized_size is not None and base.is_fixed_point(*image.resized_size[::-1])
            for image in images
        )

    def _job_geometry(self, job: Job) -> ImageGeometry | None:
        """The job's own resize bounds (``mm_processor_kwargs``), or None for the worker's.

        They may narrow the worker's bounds, never widen them: vLLM sized its encoder
        cache for the worker's largest image, and the settings cap each job's cost.
        """
        own = job.mm_processor_kwargs
        if own is None or (own.min_pixels is None and own.max_pixels is None):
            return None
        base = self.engine.info.geometry
        if base is None:
            name = "min_pixels" if own.min_pixels is not None else "max_pixels"
            raise InvalidInput(
                f"mm_processor_kwargs.{name}: resize bounds apply to Qwen2-VL-family models "
                f"only; {self.engine.info.architecture} resizes with its processor's own rule",
                field=f"mm_processor_kwargs.{name}",
            )
        floor = base.factor * base.factor
        high = own.max_pixels if own.max_pixels is not None else base.max_pixels
        low = own.min_pixels if own.min_pixels is not None else min(base.min_pixels, high)
        if high > base.max_pixels:
            raise InvalidInput(
                f"mm_processor_kwargs.max_pixels: {high} is above this worker's limit of "
                f"{base.max_pixels} pixels (IMAGE_MAX_PIXELS, or the model's processor)",
                field="mm_processor_kwargs.max_pixels",
            )
        if low < floor:
            raise InvalidInput(
                f"mm_processor_kwargs.min_pixels: {low} is below one image token ({floor} pixels)",
                field="mm_processor_kwargs.min_pixels",
            )
        if low > high:
            raise InvalidInput(
                f"mm_processor_kwargs.min_pixels: {low} is above max_pixels {high}",
                field="mm_processor_kwargs.min_pixels",
            )
        return replace(base, min_pixels=low, max_pixels=high)

    async def _image(
        self, field: str, source: str, geometry: ImageGeometry | None = None
    ) -> PreparedImage:
        info = self.engine.info
        source = source.strip()  # the same str, uncopied, when there is nothing to strip
        fetched = await self.fetcher.fetch(source, field) if is_url(source) else None
        alone = self.in_flight <= 1 and self.preparing <= 1
        data = fetched if fetched is not None else source
        pixels = header_pixels(data, self.limits.max_source_pixels)
        async with self.pixel_budget.hold(pixels):
            started = time.perf_counter()
            image = await self.images.prepare(
                data,
                field=field,
                geometry=geometry or info.geometry,
                processor=info.image_processor,
                limits=self.limits,
                alone=alone,
            )
        self.hooks.image_prepared(started, time.perf_counter(), image, alone)
        return image

    async def _video(self, field: str, source: str) -> PreparedVideo:
        limits = self.engine.info.video_limits
        source = source.strip()
        if is_url(source):
            kind = video_kind(limits.max_bytes)
            fetched: str | bytes = await self.fetcher.fetch(source, field, kind)
        else:
            fetched = source
        alone = self.in_flight <= 1 and self.preparing <= 1
        return await self.images.prepare_video(fetched, field=field, limits=limits, alone=alone)

    def _render(
        self, job: Job, images: list[PreparedImage], instruction: str | None = None
    ) -> tuple[str, list[int]]:
        """The prompt text and its token ids, one per image placeholder.

        A raw prompt is the text as it is; its ids here only count it, since vLLM
        tokenizes it itself, as ``vllm serve`` does (special tokens such as a BOS added).
        """
        started = time.perf_counter()
        info = self.engine.info
        if job.raw_prompt:
            text = job.prompt or ""
        else:
            refuse_special_tokens(job.chat_messages(), info.special_tokens, _client_fields(job))
            messages = self._messages(job, images, instruction)
            text = render(
                info.templater, messages, self._chat_template, job.chat_template_kwargs, job.tools
            )
            n_images = len(job.image_sources())
            text = normalize_placeholders(
                text,
                n_images,
                info.placeholder,
                info.image_token,
                len(job.video_sources()),
                info.video_token,
            )
        ids = info.text_token_ids(text)
        self.hooks.prompt_rendered(time.perf_counter() - started)
        return text, ids

    def _prompt_tokens(self, text_tokens: int, images: list[PreparedImage]) -> int:
        """What vLLM will count: each placeholder expands to the resized image's tokens.

        For a family whose resize (and so token count) only vLLM's processor knows, the
        text's tokens: a lower bound, enough to refuse a text that cannot fit; vLLM
        refuses the rest (``prompt_too_long``) and reports the exact count.
        """
        info = self.engine.info
        if info.geometry is None:
            check_length(text_tokens, info.max_model_len)
            return text_tokens
        geometry = info.geometry
        image_tokens = sum(
            geometry.image_tokens(size[1], size[0])
            for size in (img.resized_size for img in images)
            if size is not None
        )
        tokens = text_tokens - len(images) + image_tokens
        check_length(tokens, info.max_model_len)
        return tokens

    def _messages(
        self, job: Job, images: list[PreparedImage], instruction: str | None = None
    ) -> list[dict[str, Any]]:
        """Template messages; a grounding job's are its style's (``grounding_styles``),
        whose system prompt may state the image's resized size."""
        if job.task != "grounding":
            return template_messages(job.chat_messages())
        style = self.grounding_style
        resized = images[0].resized_size
        assert resized is not None  # grounding images are always resized by the worker
        if job.messages is None:
            return style.messages(resized, instruction or job.instruction or "", job.system_prompt)
        system = style.system_text(resized, job.system_prompt)
        head = [] if system is None else [{"role": "system", "content": system}]
        return [*head, *template_messages(job.messages)]

    def _sampling(self, job: Job, prompt_tokens: int) -> tuple[dict[str, Any], list[str]]:
        info = self.engine.info
        values: dict[str, Any] = {**info.default_sampling, **job.sampling_params.set_values()}
        values.setdefault("max_tokens", self.settings.default_max_tokens)
        warnings: list[str] = []
        room = info.max_model_len - prompt_tokens
        if values["max_tokens"] > room:
            warnings.append(
                f"max_tokens {values['max_tokens']} lowered to {room}: the prompt uses "
                f"{prompt_tokens} of MAX_MODEL_LEN={info.max_model_len} tokens"
            )
            values["max_tokens"] = room
        if values.get("min_tokens", 0) > values["max_tokens"]:
            raise InvalidInput(
                f"min_tokens {values['min_tokens']} is above max_tokens {values['max_tokens']}",
                field="sampling_params.min_tokens",
            )
        n = values.get("n", 1)
        if n > self.settings.max_n:
            raise InvalidInput(
                f"n {n} is above MAX_N={self.settings.max_n}", field="sampling_params.n"
            )
        if n > 1 and job.task == "grounding":
            raise InvalidInput("n: a grounding job has one answer", field="sampling_params.n")
        constrain = (
            job.constrain if job.constrain is not None else self.settings.grounding_constrain
        )
        if job.task == "grounding" and constrain:
            if "structured_outputs" in values:
                raise InvalidInput(
                    "constrain: the answer grammar is the grounding style's; give constrain "
                    "or structured_outputs, not both",
                    field="constrain",
                )
            values["structured_outputs"] = {"regex": self.grounding_style.answer_regex()}
            needed = self.grounding_style.longest_answer() + 1  # and the end of the answer
            if values["max_tokens"] < needed <= room:
                warnings.append(
                    f"max_tokens {values['max_tokens']} raised to {needed}: a constrained "
                    f"{self.grounding_style.name} answer can be that long"
                )
                values["max_tokens"] = needed
        return values, warnings

    async def generate(
        self, job_id: str, prepared: Prepared, clock: Clock
    ) -> AsyncIterator[dict[str, Any]]:
        if prepared.targets is not None:
            yield await self._locate_all(job_id, prepared, clock)
            return
        request = EngineRequest(
            request_id=job_id,
            prompt=prepared.prompt,
            images=[img.image for img in prepared.images],
            image_ids=[img.content_id for img in prepared.images],
            prompt_token_ids=prepared.prompt_token_ids,
            sampling=prepared.sampling,
            mm_processor_kwargs=prepared.mm_processor_kwargs,
            batch=self._batch_policy(prepared.job),
            return_token_ids=prepared.job.return_token_ids,
            lora=_lora(prepared.adapter),
            videos=[video.vllm_item for video in prepared.videos],
            video_ids=[video.content_id for video in prepared.videos] or None,
        )
        total = Delta()  # the whole job: tokens of every choice, the prompt's logprobs
        choices: dict[int, Delta] = {}  # each choice's own, when n > 1
        several = prepared.sampling.get("n", 1) > 1
        stream = prepared.job.stream
        async for delta in self.engine.generate(request):
            if clock.first_token is None and delta.first_token_at is not None:
                clock.first_token = delta.first_token_at
            total.merge(delta)
            if several:
                choices.setdefault(delta.index, Delta(index=delta.index)).merge(delta)
                if stream and (delta.text or delta.done):
                    yield _choice_chunk(delta, with_end=delta.done)
            elif stream and not delta.finished and delta.text:
                yield _stream_chunk(delta)
            if delta.finished:
                clock.end = time.perf_counter()
                if several:
                    ordered = [choices[i] for i in sorted(choices)]
                    yield self._final(job_id, None, total, prepared, clock, ordered, stream)
                else:
                    last = delta if stream else total
                    yield self._final(job_id, last, total, prepared, clock)

    async def _locate_all(self, job_id: str, prepared: Prepared, clock: Clock) -> dict[str, Any]:
        """Every target of a grounding job at once, over the one prepared image: the same
        pixels and content id in every request, so vLLM's processor, encoder and prefix
        caches serve the image once. One final chunk, one result per target, in order."""
        assert prepared.targets is not None
        images = [img.image for img in prepared.images]
        image_ids = [img.content_id for img in prepared.images]

        async def one(i: int, target: Target) -> Delta:
            request = EngineRequest(
                request_id=f"{job_id}-{i}",
                prompt=target.prompt,
                images=images,
                image_ids=image_ids,
                prompt_token_ids=target.prompt_token_ids,
                sampling=prepared.sampling,
                mm_processor_kwargs=prepared.mm_processor_kwargs,
                batch=FINAL_ONLY,
                lora=_lora(prepared.adapter),
            )
            total = Delta()
            async for delta in self.engine.generate(request):
                if clock.first_token is None and delta.first_token_at is not None:
                    clock.first_token = delta.first_token_at
                total.merge(delta)
            return total

        totals = await asyncio.gather(*(one(i, t) for i, t in enumerate(prepared.targets)))
        clock.end = time.perf_counter()
        image = prepared.images[0]
        results = []
        for target, total in zip(prepared.targets, totals, strict=True):
            result = grounding.grounding_result(
                total.text,
                image.original_size,
                image.resized_size or image.original_size,
                total.finish_reason,
                self.grounding_style,
            )
            results.append(
                {"instruction": target.instruction, **result, "finish_reason": total.finish_reason}
            )
        prompt_tokens = sum(
            t.prompt_tokens if t.prompt_tokens is not None else target.prompt_tokens
            for t, target in zip(totals, prepared.targets, strict=True)
        )
        completion = sum(t.tokens for t in totals)
        chunk: dict[str, Any] = {
            "groundings": results,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion,
            },
            "timings": clock.timings(completion),
            "images": [img.describe() for img in prepared.images],
            "model": self.engine.info.name,
        }
        if prepared.warnings:
            chunk["warnings"] = prepared.warnings
        log.info("job done", extra={"job_id": job_id, **chunk["usage"], **chunk["timings"]})
        return chunk

    def _batch_policy(self, job: Job) -> BatchPolicy:
        """The settings' batching, or the job's own (worker-vllm's per-job fields)."""
        if not job.stream:
            return FINAL_ONLY
        own = (job.min_batch_size, job.max_batch_size, job.batch_size_growth_factor)
        if own == (None, None, None):
            return self.policy
        policy = self.policy
        max_size = job.max_batch_size or policy.max_size
        return BatchPolicy(
            min(job.min_batch_size or policy.min_size, max_size),
            max_size,
            job.batch_size_growth_factor or policy.growth,
        )

    def _final(
        self,
        job_id: str,
        last: Delta | None,
        total: Delta,
        prepared: Prepared,
        clock: Clock,
        choices: list[Delta] | None = None,
        streamed: bool = False,
    ) -> dict[str, Any]:
        """The job's last chunk: ``last`` is what it adds to the stream (all of it when
        not streamed), ``total`` the whole job's counts. With several ``choices`` it holds
        no text of its own: streamed, each choice has ended in its own chunk; otherwise
        they are listed whole, in ``choices``."""
        prompt_tokens = (
            total.prompt_tokens if total.prompt_tokens is not None else prepared.prompt_tokens
        )
        chunk: dict[str, Any] = {}
        if last is not None:
            chunk = {"text": last.text, "finish_reason": total.finish_reason}
        elif choices is not None and not streamed:
            chunk = {"choices": [_choice_chunk(c, with_end=True) for c in choices]}
        chunk |= {
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": total.tokens,
                "total_tokens": prompt_tokens + total.tokens,
            },
            "timings": clock.timings(total.tokens),
            "images": [img.describe() for img in prepared.images],
            "model": self.engine.info.name,
        }
        if prepared.videos:
            chunk["videos"] = [video.describe() for video in prepared.videos]
        if prepared.job.task == "grounding":
            image = prepared.images[0]
            chunk["grounding"] = grounding.grounding_result(
                total.text,
                image.original_size,
                image.resized_size or image.original_size,
                total.finish_reason,
                self.grounding_style,
            )
        if last is not None and total.stop_reason is not None:
            chunk["stop_reason"] = total.stop_reason
        if last is not None and last.logprobs is not None:
            chunk["logprobs"] = last.logprobs
        if last is not None and last.token_ids is not None:
            chunk["token_ids"] = last.token_ids
        if total.prompt_token_ids is not None:
            chunk["prompt_token_ids"] = total.prompt_token_ids
        prompt_logprobs = last.prompt_logprobs if last is not None else total.prompt_logprobs
        if prompt_logprobs is not None:
            chunk["prompt_logprobs"] = prompt_logprobs
        if prepared.warnings:
            chunk["warnings"] = prepared.warnings
        log.info("job done", extra={"job_id": job_id, **chunk["usage"], **chunk["timings"]})
        return chunk


def _client_fields(job: Job) -> dict[str, str]:
    """A job's text fields outside its messages that reach the prompt."""
    fields = {f"instructions[{i}]": t for i, t in enumerate(job.instructions or ())}
    for name in ("instruction", "system_prompt"):
        if (value := getattr(job, name)) is not None:
            fields[name] = value
    return fields


def _lora(adapter: LoraAdapter | None) -> tuple[str, int, str] | None:
    return None if adapter is None else (adapter.name, adapter.id, adapter.path)


def _stream_chunk(delta: Delta) -> dict[str, Any]:
    chunk: dict[str, Any] = {"text": delta.text}
    if delta.logprobs is not None:
        chunk["logprobs"] = delta.logprobs
    if delta.token_ids is not None:
        chunk["token_ids"] = delta.token_ids
    if delta.prompt_logprobs is not None:
        chunk["prompt_logprobs"] = delta.prompt_logprobs
    return chunk


def _choice_chunk(delta: Delta, with_end: bool) -> dict[str, Any]:
    """One choice's text (n > 1), tagged with its index; at its end, why it ended."""
    chunk: dict[str, Any] = {"index": delta.index, "text": delta.text}
    if delta.logprobs is not None:
        chunk["logprobs"] = delta.logprobs
    if delta.token_ids is not None:
        chunk["token_ids"] = delta.token_ids
    if with_end:
        chunk["finish_reason"] = delta.finish_reason
        if delta.stop_reason is not None:
            chunk["stop_reason"] = delta.stop_reason
    return chunk


def _summary(prepared: Prepared, clock: Clock) -> dict[str, Any]:
    return {
        "images": [repr(img) for img in prepared.images],
        "prompt_tokens": prepared.prompt_tokens,
        "max_tokens": prepared.sampling.get("max_tokens"),
        "preprocess_ms": round(((clock.ready or clock.start) - clock.start) * 1000, 2),
    }
