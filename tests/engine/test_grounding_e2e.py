"""Grounding jobs end to end through the real vLLM engine (CPU) and the tiny Qwen2.5-VL model.

The tiny model's text is random, so these assert on structure, on the prompt the model was
given, and on the prompt token count vLLM reports: it proves vLLM's processor kept the
worker's grounding-resized image (text tokens - 1 placeholder + (H/28)(W/28) image tokens).
"""

from __future__ import annotations

import re

import openai
import pytest
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from support.jobs import collect, data_uri, image_job, screenshot
from support.openai_shim import OpenAIShim

pytestmark = pytest.mark.engine

GROUNDING_FIELDS = {
    "point",
    "box",
    "point_resized",
    "clamped",
    "model_point",
    "model_box",
    "space",
    "style",
    "original_size",
    "resized_size",
    "raw_text",
}


def grounding_job(image: str | None = None, **extra):
    return {
        "task": "grounding",
        "instruction": "the blue bar at the top",
        "image": image or data_uri(),
        "max_tokens": 16,
        **extra,
    }


async def expected_prompt_tokens(worker, job) -> tuple[int, object]:
    prepared = await worker.runner.prepare(job, "probe")
    (img,) = prepared.images
    rw, rh = img.resized_size
    text_tokens = worker.engine.info.count_text_tokens(prepared.prompt)
    return text_tokens - 1 + (rh // 28) * (rw // 28), prepared


def check_grounding(g: dict, text: str) -> None:
    assert set(g) >= GROUNDING_FIELDS
    assert g["raw_text"] == text
    ow, oh = g["original_size"]
    if g["point"] is None:
        assert g["point_resized"] is None and g["reason"]
    else:
        x, y = g["point"]
        assert 0 <= x <= ow - 1 and 0 <= y <= oh - 1
        assert "reason" not in g


async def test_streamed_grounding_job(worker):
    job = grounding_job()
    chunks = await collect(worker, job)
    *body, final = chunks
    assert all(set(c) == {"text"} for c in body)
    assert "error" not in final, final
    g = final["grounding"]
    check_grounding(g, "".join(c["text"] for c in chunks))
    assert g["original_size"] == [320, 200] and g["resized_size"] == [308, 196]
    assert final["images"][0]["resized_size"] == [308, 196]
    expected, prepared = await expected_prompt_tokens(worker, job)
    assert final["usage"]["prompt_tokens"] == expected == prepared.prompt_tokens
    assert "The image resolution is height 196 and width 308." in prepared.prompt
    assert "<|vision_start|><|image_pad|><|vision_end|>the blue bar at the top" in prepared.prompt


async def test_non_streamed_grounding_job(worker):
    (final,) = await collect(worker, grounding_job(stream=False, ignore_eos=True))
    assert final["usage"]["completion_tokens"] == 16
    check_grounding(final["grounding"], final["text"])


async def test_image_above_the_processor_max_keeps_the_grounding_size(worker):
    """1920x1080 is above the tiny processor's max (1003520 px: 1316x728, 1222 tokens). The grounding bounds are GTA1's, capped at the engine's encoder cache (2048
    tokens here), and vLLM must resize with those too, else the prompt would state a size
    the model never saw. The token count vLLM reports shows which size it used."""
    info = worker.engine.info
    assert info.max_image_tokens == 2048
    cap = 2048 * 28 * 28
    assert worker.runner.grounding_bounds.geometry.max_pixels == cap
    rh, rw = smart_resize(1080, 1920, factor=28, min_pixels=3136, max_pixels=cap)
    assert (rw, rh) == (1680, 924) and rw * rh > info.geometry.max_pixels
    # No seed here: vLLM's CPU engine dies on a seeded request whose prefill is chunked
    # (this prompt is above max_num_batched_tokens=2048): "CPU Generator does not use offset".
    job = grounding_job(data_uri(screenshot(1920, 1080)), stream=False)
    (final,) = await collect(worker, job)
    assert "error" not in final, final
    assert final["grounding"]["resized_size"] == [rw, rh]
    expected, prepared = await expected_prompt_tokens(worker, job)
    assert prepared.mm_processor_kwargs == {"min_pixels": 3136, "max_pixels": cap}
    assert f"The image resolution is height {rh} and width {rw}." in prepared.prompt
    assert final["usage"]["prompt_tokens"] == expected
    assert expected - info.count_text_tokens(prepared.prompt) + 1 == (rh // 28) * (rw // 28) == 1980

    # The same picture as a chat job still gets the processor's own bounds.
    chat = image_job(data_uri(screenshot(1920, 1080)), max_tokens=1, stream=False)
    (chat_final,) = await collect(worker, chat)
    cw, ch = chat_final["images"][0]["resized_size"]
    assert (ch, cw) == info.geometry.target_size(1080, 1920) == (728, 1316)
    chat_prepared = await worker.runner.prepare(chat, "probe-chat")
    assert chat_prepared.mm_processor_kwargs is None
    assert chat_final["usage"]["prompt_tokens"] == chat_prepared.prompt_tokens


async def test_messages_form_grounding_job(worker):
    job = {
        "task": "grounding",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_uri(screenshot(640, 400))}},
                    {"type": "text", "text": "the second green box"},
                ],
            }
        ],
        "system_prompt": "Locate it. The screenshot is {width}x{height}; answer (x,y).",
        "max_tokens": 8,
        "stream": False,
    }
    (final,) = await collect(worker, job)
    assert "error" not in final, final
    check_grounding(final["grounding"], final["text"])
    rw, rh = final["grounding"]["resized_size"]
    expected, prepared = await expected_prompt_tokens(worker, job)
    assert prepared.prompt.startswith(
        f"<|im_start|>system\nLocate it. The screenshot is {rw}x{rh}; answer (x,y).<|im_end|>"
    )
    assert final["usage"]["prompt_tokens"] == expected


@pytest.mark.parametrize(
    ("job_input", "field"),
    [
        ({"task": "grounding", "instruction": "the OK button"}, "image"),
        ({"task": "grounding", "image": "iVBORw0KGgo="}, "instruction"),
        ({"task": "grounding", "instruction": "", "image": "iVBORw0KGgo="}, "instruction"),
        (
            {
                "task": "grounding",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": "iVBORw0KGgo="},
                            {"type": "image", "image": "iVBORw0KGgo="},
                            {"type": "text", "text": "OK"},
                        ],
                    }
                ],
            },
            "messages[0].content[1].image",
        ),
        (
            {"task": "grounding", "messages": [{"role": "user", "content": "the OK button"}]},
            "messages",
        ),
    ],
)
async def test_jobs_that_cannot_be_grounded(worker, job_input, field):
    (chunk,) = await collect(worker, job_input)
    err = chunk["error"]
    assert (err["type"], err.get("field")) == ("invalid_input", field), err
    assert err["message"].startswith(field)


# ------------------------------------------- several targets, constraints, OpenAI route
async def test_several_targets_in_one_job(worker):
    instructions = ["the blue bar at the top", "the second green box", "the red square"]
    job = {
        "task": "grounding",
        "instructions": instructions,
        "image": data_uri(screenshot(640, 400)),
        "max_tokens": 12,
    }
    (final,) = await collect(worker, job)
    assert "error" not in final, final
    assert [g["instruction"] for g in final["groundings"]] == instructions
    for g in final["groundings"]:
        check_grounding(g, g["raw_text"])
        assert g["resized_size"] == [644, 392] and g["style"] == "gta1"
    assert len(final["images"]) == 1
    singles = [
        (
            await expected_prompt_tokens(
                worker, grounding_job(data_uri(screenshot(640, 400)), instruction=i)
            )
        )[0]
        for i in instructions
    ]
    assert final["usage"]["prompt_tokens"] == sum(singles)


async def test_constrained_answers_always_hold_a_point(worker):
    """Random weights: unconstrained answers rarely hold a point; constrained ones always."""
    image = data_uri(screenshot(320, 200))
    jobs = [
        grounding_job(image, constrain=True, max_tokens=24, stream=False, temperature=1.0)
        for _ in range(8)
    ]
    finals = [f for job in jobs for f in await collect(worker, job)]
    assert all(f["grounding"]["point"] is not None for f in finals), [f["text"] for f in finals]
    assert all(re.fullmatch(r"\(\d{1,5},\d{1,5}\)", f["text"]) for f in finals)


def test_grounding_through_the_openai_client(worker):
    with OpenAIShim(worker.handler) as shim:
        client = openai.OpenAI(base_url=shim.base_url, api_key="unused", max_retries=0)
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_uri(screenshot(640, 400))}},
                    {"type": "text", "text": "the second green box"},
                ],
            }
        ]
        model = worker.runner.settings.openai_model_id
        res = client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=24,
            extra_body={"grounding": {"constrain": True}},
        )
        g = res.model_extra["grounding"]
        assert g["point"] is not None and g["raw_text"] == res.choices[0].message.content
        assert g["original_size"] == [640, 400] and g["style"] == "gta1"
        stream = client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=24,
            stream=True,
            extra_body={"grounding": {"constrain": True}},
        )
        parts = list(stream)
        ends = [p for p in parts if p.choices and p.choices[0].finish_reason]
        (end,) = ends
        assert end.model_extra["grounding"]["point"] is not None
        text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
        assert end.model_extra["grounding"]["raw_text"] == text
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(
                model=model,
                messages=messages,
                max_tokens=4,
                extra_body={"grounding": {"constrain": "yes"}},
            )
        assert "grounding" in str(bad.value)
