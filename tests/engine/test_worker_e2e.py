"""End to end through the real vLLM engine (CPU) and the tiny Qwen2.5-VL model."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from support.jobs import collect, data_uri, image_job, screenshot

pytestmark = pytest.mark.engine


async def test_streamed_job(worker):
    chunks = await collect(
        worker, image_job(max_tokens=40, temperature=0.8, seed=1, ignore_eos=True)
    )
    *body, final = chunks
    assert len(body) >= 2, "tokens should arrive in several chunks"
    assert all(set(c) == {"text"} and c["text"] for c in body)
    assert final["finish_reason"] == "length"
    usage = final["usage"]
    assert usage["completion_tokens"] == 40
    assert usage["total_tokens"] == usage["prompt_tokens"] + 40
    text = "".join(c["text"] for c in chunks)
    assert len(text) > 10
    t = final["timings"]
    assert 0 < t["preprocess_ms"] < t["time_to_first_token_ms"] <= t["total_ms"]
    assert t["tokens_per_second"] > 0
    assert final["images"] == [
        {
            "original_size": [320, 200],
            "resized_size": [308, 196],
            "format": "PNG",
            "bytes": final["images"][0]["bytes"],
        }
    ]
    assert final["model"] == "tiny-qwen2.5-vl"


async def test_chunks_grow_from_min_to_max_batch_size(worker):
    """120 tokens in batches of 1, 3, 9, 27, 50, 30: a handful of chunks, not 120."""
    chunks = await collect(worker, image_job(max_tokens=120, ignore_eos=True, seed=3))
    assert 3 <= len(chunks) <= 7, [c.get("text") for c in chunks]
    assert len(chunks[0]["text"]) < len(max((c["text"] for c in chunks), key=len))


async def test_non_streamed_job_is_one_chunk_with_everything(worker):
    chunks = await collect(worker, image_job(max_tokens=16, stream=False, ignore_eos=True, seed=2))
    assert len(chunks) == 1
    (final,) = chunks
    assert final["usage"]["completion_tokens"] == 16 and final["finish_reason"] == "length"
    assert final["text"]


async def test_same_seed_same_text(worker):
    job = image_job(max_tokens=12, temperature=1.0, seed=42, stream=False)
    a, b = await asyncio.gather(collect(worker, job, "a"), collect(worker, job, "b"))
    assert a[0]["text"] == b[0]["text"]


async def test_prompt_tokens_are_text_plus_image_tokens(worker):
    """The worker's resize decides the image tokens vLLM creates: (H/28)*(W/28) per image."""
    info = worker.engine.info
    for w, h in [(320, 200), (1280, 720), (57, 913), (3000, 40)]:
        job = image_job(data_uri(screenshot(w, h)), max_tokens=1, stream=False)
        (final,) = await collect(worker, job)
        rw, rh = final["images"][0]["resized_size"]
        assert rw % 28 == 0 and rh % 28 == 0
        prepared = await worker.runner.prepare(job, "probe")
        text_tokens = info.count_text_tokens(prepared.prompt)
        expected = text_tokens - 1 + (rh // 28) * (rw // 28)
        assert final["usage"]["prompt_tokens"] == expected == prepared.prompt_tokens, (w, h)


async def test_text_only_job(worker):
    (final,) = await collect(
        worker,
        {
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 5,
            "stream": False,
            "ignore_eos": True,
        },
    )
    assert final["usage"]["completion_tokens"] == 5 and final["images"] == []


async def test_eight_concurrent_jobs(worker):
    jobs = [
        image_job(
            data_uri(screenshot(200 + 40 * i, 150, seed=i)), max_tokens=24, ignore_eos=True, seed=i
        )
        for i in range(8)
    ]
    results = await asyncio.gather(*(collect(worker, j, f"c{i}") for i, j in enumerate(jobs)))
    for chunks in results:
        assert "error" not in chunks[-1]
        assert chunks[-1]["usage"]["completion_tokens"] == 24
    assert await worker.engine.num_unfinished() == 0


async def test_cancelled_job_aborts_its_request(worker):
    started = asyncio.Event()

    async def consume():
        async for _chunk in worker.handler(
            {"id": "cancel-me", "input": image_job(max_tokens=3000, ignore_eos=True)}
        ):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 60)
    assert await worker.engine.num_unfinished() == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):
        if await worker.engine.num_unfinished() == 0:
            break
        await asyncio.sleep(0.05)
    assert await worker.engine.num_unfinished() == 0
    assert worker.runner.in_flight == 0


async def test_closing_the_stream_aborts_its_request(worker):
    gen = worker.handler({"id": "close-me", "input": image_job(max_tokens=3000, ignore_eos=True)})
    await gen.__anext__()
    await gen.aclose()
    for _ in range(100):
        if await worker.engine.num_unfinished() == 0:
            break
        await asyncio.sleep(0.05)
    assert await worker.engine.num_unfinished() == 0


@pytest.mark.parametrize(
    ("job_input", "err_type", "field"),
    [
        ({"messages": []}, "invalid_input", "messages"),
        (
            {"messages": [{"role": "user", "content": "x"}], "top_p": 9},
            "invalid_input",
            "sampling_params.top_p",
        ),
        (
            image_job("data:image/png;base64,not-base64!!"),
            "invalid_input",
            "messages[0].content[0].image_url.url",
        ),
        (
            image_job("data:image/png;base64,aGVsbG8gd29ybGQ="),
            "image_decode",
            "messages[0].content[0].image_url.url",
        ),
        (image_job("file:///etc/passwd"), "invalid_input", "messages[0].content[0].image_url.url"),
        (
            image_job(data_uri(screenshot(4000, 10))),
            "image_decode",
            "messages[0].content[0].image_url.url",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image", "image": data_uri()}] * 5,
                    }
                ]
            },
            "invalid_input",
            "messages[0].content[4].image",  # the fifth: MAX_IMAGES_PER_JOB is 4
        ),
        (
            {"messages": [{"role": "user", "content": "<|image_pad|> sneaky"}]},
            "invalid_input",
            "messages[0].content",
        ),
        (
            {"messages": [{"role": "user", "content": "word " * 5000}]},
            "prompt_too_long",
            "messages",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "min_tokens": 50, "max_tokens": 5},
            "invalid_input",
            "sampling_params.min_tokens",
        ),
    ],
)
async def test_bad_inputs_get_one_error_chunk(worker, job_input, err_type, field):
    chunks = await collect(worker, job_input)
    assert len(chunks) == 1
    err = chunks[0]["error"]
    assert (err["type"], err.get("field")) == (err_type, field), err
    assert err["message"]


async def test_too_long_prompt_message_has_the_numbers(worker):
    (chunk,) = await collect(worker, {"messages": [{"role": "user", "content": "word " * 5000}]})
    msg = chunk["error"]["message"]
    assert "4096" in msg and "tokens" in msg


async def test_max_tokens_is_clamped_to_the_context(worker):
    (final,) = await collect(worker, image_job(max_tokens=100000, stream=False, stop=["\n"]))
    assert "warnings" in final and "lowered to" in final["warnings"][0]


async def test_a_good_job_succeeds_beside_bad_ones(worker):
    bad = [collect(worker, {"messages": "nope"}, f"bad{i}") for i in range(5)]
    good = collect(worker, image_job(max_tokens=8, stream=False, ignore_eos=True), "good")
    *bads, ok = await asyncio.gather(*bad, good)
    assert all("error" in b[0] for b in bads)
    assert ok[0]["usage"]["completion_tokens"] == 8


async def test_image_processes_give_the_same_answer_as_threads(worker):
    """The same greedy tokens, prompt size and image report whether the image was
    prepared in a worker process or a thread: the pixels and content ids are the same."""
    from vlm_worker.pipeline.image_pool import ImagePool
    from vlm_worker.pipeline.runner import JobRunner

    info = worker.engine.info
    images = ImagePool(processes=1, threads=None, threads_when_alone=False)
    await asyncio.to_thread(images.start, info.geometry, info.image_processor)
    runner = JobRunner(
        worker.engine, worker.settings, executor=worker.runner.executor, images=images
    )
    job = image_job(
        data_uri(screenshot(1280, 720, 7)),
        max_tokens=24,
        stream=False,
        ignore_eos=True,
        temperature=0.0,
    )
    try:
        (in_process,) = [c async for c in runner.run({"id": "proc", "input": job})]
    finally:
        images.shutdown()
    assert worker.runner.images.mode == "threads"  # the session worker on this machine
    (in_thread,) = await collect(worker, job, "thread")
    assert in_process["text"] == in_thread["text"]
    assert in_process["usage"] == in_thread["usage"]
    assert in_process["images"] == in_thread["images"]
    assert in_process["images"][0]["resized_size"] == [1288, 728]


async def test_the_models_processor_runs_off_the_engine_loop(worker, engine_handle, monkeypatch):
    """transformers' resize, normalise and patching of each image run in vLLM's renderer
    threads, as `vllm serve` runs them: on the engine's loop they would stall every other
    request's output while they work."""
    import threading

    processor = engine_handle.llm.renderer.get_mm_processor()
    threads: list[str] = []
    original = processor.apply

    def spy(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(processor, "apply", spy)
    job = image_job(data_uri(screenshot(500, 300, 11)), max_tokens=3, stream=False)
    (final,) = await collect(worker, job)
    assert final["usage"]["completion_tokens"] == 3
    assert len(threads) == 1, threads
    assert threads[0] != "vllm-engine-loop"
    assert threads[0] != threading.main_thread().name


async def test_vllm_uses_our_content_ids_instead_of_hashing_pixels(
    worker, engine_handle, monkeypatch
):
    """vLLM would copy and hash every image on its event loop; the worker hands it the
    image's content id (via a token prompt: vLLM 0.26 drops a text prompt's ids)."""
    from PIL import Image
    from vllm.multimodal.hasher import MultiModalHasher

    hashed: list[Any] = []
    original = MultiModalHasher.serialize_item.__func__

    def spy(cls: Any, obj: object) -> Any:
        if isinstance(obj, Image.Image):
            hashed.append(obj.size)
        return original(cls, obj)

    monkeypatch.setattr(MultiModalHasher, "serialize_item", classmethod(spy))
    job = image_job(data_uri(screenshot(640, 400, 9)), max_tokens=4, stream=False)
    (final,) = await collect(worker, job)
    assert final["usage"]["completion_tokens"] == 4
    assert hashed == []
    # the spy does see images when no id is given (the bare engine's way)
    prompt = worker.engine.info.templater.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    from vllm import SamplingParams

    async def bare() -> None:
        img = screenshot(300, 200, 10)
        async for _ in engine_handle.llm.generate(
            {"prompt": prompt, "multi_modal_data": {"image": img}},
            SamplingParams(max_tokens=1),
            "bare-hash-probe",
        ):
            pass

    await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(bare(), engine_handle.loop))
    assert hashed == [(300, 200)]


def test_prompts_are_tokenized_without_vllms_tokenizer_pool(worker):
    """The served tokenizer is vLLM's pooled one; the job path encodes beside it with the
    same result (``model_info.text_encoder`` says why)."""
    info = worker.engine.info
    assert type(info.tokenizer).__name__.startswith("TokenizerPool")
    assert info.encoder is not None
    text = info.templater.apply_chat_template(
        [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "Go \u2192 OK"}],
            }
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert info.text_token_ids(text) == list(info.tokenizer.encode(text, add_special_tokens=False))


def test_start_up_heap_is_frozen(worker):
    """``worker.freeze_startup_heap``: start-up's objects are out of the collector's way."""
    import gc

    assert gc.get_freeze_count() > 100_000


async def test_a_jobs_own_bounds_reach_vllm_only_where_its_processor_would_resize(
    worker, monkeypatch
):
    """vLLM loads another HF processor (tokenizer copies and all) for every new set of
    request kwargs: on the H200, seconds of its single processing thread for the first
    jobs with a new ``max_pixels``. Where the engine's own bounds keep the worker's
    resized image as it is, the job's bounds stay with the worker and nothing loads; the
    token count vLLM reports shows the size the model saw."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    from transformers.processing_utils import ProcessorMixin

    loads: list[str] = []
    original = ProcessorMixin.get_processor_dict.__func__

    def spy(cls: Any, *args: Any, **kwargs: Any) -> Any:
        loads.append(cls.__name__)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(ProcessorMixin, "get_processor_dict", classmethod(spy))
    base = worker.engine.info.geometry
    for i, cap in enumerate((200_000, 300_000, 400_000)):
        job = image_job(data_uri(screenshot(1280, 720, 20 + i)), max_tokens=1, stream=False)
        job["mm_processor_kwargs"] = {"max_pixels": cap}
        (final,) = await collect(worker, job)
        w, h = final["images"][0]["resized_size"]
        assert (h, w) == smart_resize(720, 1280, 28, base.min_pixels, cap)
        prepared = await worker.runner.prepare(job, f"probe-{i}")
        assert prepared.mm_processor_kwargs is None
        assert final["usage"]["prompt_tokens"] == prepared.prompt_tokens
    assert loads == []

    # Below the engine's own minimum, its processor would enlarge the image: the job's
    # bounds go to vLLM, and it keeps the smaller size.
    tiny = image_job(data_uri(screenshot(40, 30, 23)), max_tokens=1, stream=False)
    tiny["mm_processor_kwargs"] = {"min_pixels": 784}
    (final,) = await collect(worker, tiny)
    w, h = final["images"][0]["resized_size"]
    assert w * h < base.min_pixels
    prepared = await worker.runner.prepare(tiny, "probe-tiny")
    assert prepared.mm_processor_kwargs == {"min_pixels": 784, "max_pixels": base.max_pixels}
    assert final["usage"]["prompt_tokens"] == prepared.prompt_tokens
