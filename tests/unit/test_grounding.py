"""Grounding mode without an engine: prompt, parser, coordinate mapping, schema, job path.

The job-path tests use the tiny model's real processor and template with a scripted engine
that answers what a GTA1 model would, so the mapping from the model's words back to the
original image's pixels is checked exactly (the real tiny model's text is random).
"""

from __future__ import annotations

import asyncio
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from support.fakes import ScriptedEngine, answer_script, scripted_info
from support.jobs import data_uri, screenshot
from vlm_worker.config.settings import load_worker_settings
from vlm_worker.contract.errors import InvalidInput
from vlm_worker.contract.job_schema import parse_job
from vlm_worker.engine.protocol import ModelInfo
from vlm_worker.media.geometry import ImageGeometry
from vlm_worker.pipeline.runner import JobRunner
from vlm_worker.prompt.grounding import (
    grounding_bounds,
    grounding_result,
    to_original,
    to_resized,
)
from vlm_worker.prompt.grounding_answers import parse_point
from vlm_worker.prompt.grounding_styles import GTA1_SYSTEM, STYLES

GTA1_MIN_PIXELS, GTA1_MAX_PIXELS = 3136, 4096 * 2160
GTA1 = grounding_bounds(ImageGeometry(), GTA1_MIN_PIXELS, GTA1_MAX_PIXELS).geometry


def system_prompt(size, template=None):
    return STYLES["gta1"].system_text(size, template)


# ---------------------------------------------------------------------------- prompt
def test_default_system_prompt_states_resized_height_and_width():
    text = system_prompt((1932, 1092))
    assert text == (
        "You are an expert UI element locator. Given a GUI image and a user's element "
        "description, provide the coordinates of the specified element as a single (x,y) "
        "point. The image resolution is height 1092 and width 1932. For elements with area, "
        "return the center point.\n\nOutput the coordinate pair exactly:\n(x,y)"
    )
    assert "{" not in text and GTA1_SYSTEM.count("{") == 2


def test_custom_system_prompt_keeps_other_braces():
    text = system_prompt((56, 28), 'Screen {width}x{height}. Answer {"x": 1}.')
    assert text == 'Screen 56x28. Answer {"x": 1}.'


# ---------------------------------------------------------------------------- parser
@pytest.mark.parametrize(
    ("text", "point"),
    [
        ("(523, 118)", (523, 118)),
        ("(523,118)", (523, 118)),
        ("The element is at (12.5,7).", (12.5, 7)),
        ("( 12 , 34 )", (12, 34)),
        ("(\u22125, 10)", (-5, 10)),  # Unicode minus sign
        ("(\u20135, 10)", (-5, 10)),  # en dash
        ("(-5, -10)", (-5, -10)),
        ("(+3, +4)", (3, 4)),
        ("[(100,200)]", (100, 200)),
        ("[100, 200]", (100, 200)),
        ("(.5, 3.)", (0.5, 3.0)),
        ("\uff0812\uff0c34\uff09", (12, 34)),  # full-width brackets and comma
        ("(\uff11\uff12, 3)", (12, 3)),  # full-width digits
        ("x=3,y=4", (3, 4)),
        ("x: 10 y: 20", (10, 20)),
        ("pyautogui.click(x=523, y=118)", (523, 118)),
        ("523, 118", (523, 118)),  # a bare pair, but only as the whole answer
        ("  523 ,118\n", (523, 118)),
        ("(10,20) or maybe (30,40)", (10, 20)),  # the first wins, as in GTA1's parser
        ("<|im_end|>(3,4)", (3, 4)),
        ("(1" + "9" * 400 + ", 2) then (5, 6)", (5, 6)),  # non-finite skipped
        ("(0" + "0" * 5000 + "1, 2)", (1, 2)),  # thousands of digits, still a number
    ],
)
def test_parser_finds_the_point(text, point):
    found = parse_point(text)
    assert found == point
    assert [type(v) for v in found] == [type(v) for v in point]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "I cannot find that element.",
        "(1, 2, 3, 4)",  # a box is not a point
        "(12)",
        "42",
        "the answer is 523, 118",  # a bare pair inside prose is too ambiguous
        "max=3, y=4",
        "(a12, 3)",
        "v1.2, 3",
        "(1, 2.5.6)",
        "(1" + "9" * 400 + ", 2)",
    ],
)
def test_parser_finds_no_point(text):
    assert parse_point(text) is None


@given(
    x=st.floats(-5000, 50000, allow_nan=False),
    y=st.floats(-5000, 50000, allow_nan=False),
    decimals=st.integers(0, 3),
    prefix=st.text(alphabet="abc XYZ:.\n", max_size=20),
    suffix=st.text(alphabet="abc XYZ:.\n)]", max_size=20),
    space=st.sampled_from(["", " ", "  "]),
)
def test_parser_reads_any_formatted_point(x, y, decimals, prefix, suffix, space):
    xs, ys = f"{x:.{decimals}f}", f"{y:.{decimals}f}"
    found = parse_point(f"{prefix} ({xs},{space}{ys}){suffix}")
    assert found == (_num(xs), _num(ys))


def _num(text: str) -> int | float:
    return float(text) if "." in text else int(text)


# ---------------------------------------------------------------------------- mapping
sizes = st.tuples(st.integers(1, 8000), st.integers(1, 8000)).filter(
    lambda s: max(s) / min(s) <= 200
)


@given(size=sizes, fx=st.floats(-0.2, 1.2), fy=st.floats(-0.2, 1.2))
def test_mapping_matches_smart_resize_and_stays_in_the_image(size, fx, fy):
    ow, oh = size
    rh, rw = smart_resize(oh, ow, factor=28, min_pixels=3136, max_pixels=4096 * 2160)
    assert GTA1.target_size(oh, ow) == (rh, rw)
    assert rw % 28 == 0 and rh % 28 == 0 and 3136 <= rw * rh <= 12_845_056
    point = (fx * rw, fy * rh)
    (x, y), clamped = to_original(point, (rw, rh), (ow, oh))
    assert 0 <= x <= ow - 1 and 0 <= y <= oh - 1
    direct_x = min(max(point[0] * ow / rw, 0), ow - 1)
    direct_y = min(max(point[1] * oh / rh, 0), oh - 1)
    assert abs(x - direct_x) <= 0.005 and abs(y - direct_y) <= 0.005
    inside = 0 <= point[0] * ow / rw <= ow - 1 and 0 <= point[1] * oh / rh <= oh - 1
    assert clamped is not inside
    if inside:  # back to the resized frame: where the model pointed, to rounding
        bx, by = to_resized((x, y), (ow, oh), (rw, rh))
        assert abs(bx - point[0]) <= 0.005 * rw / ow + 1e-9
        assert abs(by - point[1]) <= 0.005 * rh / oh + 1e-9


@given(size=sizes, px=st.integers(0, 8000), py=st.integers(0, 8000))
def test_original_pixels_survive_the_round_trip(size, px, py):
    """A pixel of the original, seen in the resized frame and mapped back, is that pixel."""
    ow, oh = size
    rh, rw = GTA1.target_size(oh, ow)
    px, py = px % ow, py % oh
    (x, y), clamped = to_original(to_resized((px, py), (ow, oh), (rw, rh)), (rw, rh), (ow, oh))
    assert not clamped and (x, y) == (px, py)


def test_width_and_height_are_not_swapped():
    # 1920x1080 → 1932x1092: x scales by 1920/1932, y by 1080/1092.
    assert GTA1.target_size(1080, 1920) == (1092, 1932)
    (x, y), clamped = to_original((966, 546), (1932, 1092), (1920, 1080))
    assert (x, y) == (960.0, 540.0) and not clamped


def test_points_outside_the_image_are_clamped_and_flagged():
    assert to_original((-5, 10), (56, 28), (100, 50)) == ((0.0, 17.86), True)
    assert to_original((56, 28), (56, 28), (100, 50)) == ((99.0, 49.0), True)
    assert to_original((-0.0, 0), (56, 28), (100, 50)) == ((0.0, 0.0), False)
    assert str(to_original((-0.0, 0), (56, 28), (100, 50))[0][0]) == "0.0"


# ---------------------------------------------------------------------------- result
def test_result_with_a_point():
    out = grounding_result("(966, 546)", (1920, 1080), (1932, 1092), "stop")
    assert out == {
        "point": [960.0, 540.0],
        "box": None,
        "point_resized": [966, 546],
        "clamped": False,
        "model_point": [966, 546],
        "model_box": None,
        "space": "absolute",
        "style": "gta1",
        "original_size": [1920, 1080],
        "resized_size": [1932, 1092],
        "raw_text": "(966, 546)",
    }


@pytest.mark.parametrize(
    ("text", "finish", "reason"),
    [
        ("", "stop", "the model's answer is empty"),
        ("   ", "stop", "the model's answer is empty"),
        ("I see no such button", "stop", "no point found in the model's answer (gta1 format)"),
        ("(12,", "length", "no point found in the model's answer (gta1 format) (generation"),
    ],
)
def test_result_without_a_point_has_a_reason(text, finish, reason):
    out = grounding_result(text, (100, 50), (112, 56), finish)
    assert out["point"] is None and out["point_resized"] is None
    assert out["reason"].startswith(reason) and out["raw_text"] == text


# ---------------------------------------------------------------------------- bounds
def test_bounds_follow_the_settings_when_the_engine_takes_them():
    b = grounding_bounds(ImageGeometry(), 3136, 12_845_056, max_image_tokens=16384)
    assert (b.geometry.min_pixels, b.geometry.max_pixels, b.note) == (3136, 12_845_056, None)
    assert b.processor_kwargs() == {"min_pixels": 3136, "max_pixels": 12_845_056}
    assert grounding_bounds(ImageGeometry(), 3136, 12_845_056).note is None


def test_bounds_are_capped_at_the_engines_encoder_cache():
    b = grounding_bounds(ImageGeometry(), 3136, 12_845_056, max_image_tokens=2048)
    assert b.geometry.max_pixels == 2048 * 28 * 28
    assert "GROUNDING_MAX_PIXELS=12845056" in b.note and "MAX_NUM_BATCHED_TOKENS" in b.note
    h, w = b.geometry.target_size(2160, 3840)
    assert (h // 28) * (w // 28) <= 2048
    tiny = grounding_bounds(ImageGeometry(), 5000, 6000, max_image_tokens=4)
    assert tiny.geometry.min_pixels == tiny.geometry.max_pixels == 4 * 784


def test_grounding_settings_are_validated():
    s = load_worker_settings({"GROUNDING_MIN_PIXELS": "1000", "GROUNDING_MAX_PIXELS": "2000000"})
    assert (s.grounding_min_pixels, s.grounding_max_pixels) == (1000, 2_000_000)
    defaults = load_worker_settings({})  # unset: the style's reference bounds
    assert (defaults.grounding_min_pixels, defaults.grounding_max_pixels) == (None, None)
    with pytest.raises(Exception, match="GROUNDING_MIN_PIXELS=9 is larger"):
        load_worker_settings({"GROUNDING_MIN_PIXELS": "9", "GROUNDING_MAX_PIXELS": "8"})
    with pytest.raises(Exception, match="GROUNDING_MAX_PIXELS"):
        load_worker_settings({"GROUNDING_MAX_PIXELS": "0"})


# ---------------------------------------------------------------------------- schema
IMG = "data:image/png;base64,iVBORw0KGgo="


def user(*parts):
    return {"role": "user", "content": list(parts)}


def test_shortcut_and_messages_forms_parse():
    job = parse_job({"task": "grounding", "instruction": "the OK button", "image": IMG})
    assert job.image_sources() == [("image", IMG)] and job.messages is None
    job = parse_job(
        {
            "task": "grounding",
            "messages": [user({"type": "image", "image": IMG}, {"type": "text", "text": "OK"})],
            "system_prompt": "size {width}x{height}",
        }
    )
    assert [f for f, _ in job.image_sources()] == ["messages[0].content[0].image"]


two_images = user(
    {"type": "image", "image": IMG},
    {"type": "text", "text": "OK"},
    {"type": "image_url", "image_url": IMG},
)


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        ({"task": "grounding", "image": IMG}, "instruction", "required for task 'grounding'"),
        ({"task": "grounding", "instruction": " \n", "image": IMG}, "instruction", "empty"),
        ({"task": "grounding", "instruction": "OK"}, "image", "required for task 'grounding'"),
        ({"task": "grounding", "instruction": "OK", "image": ""}, "image", "at least 1"),
        ({"task": "grounding", "instruction": "OK", "image": ["a", "b"]}, "image", "string"),
        ({"task": "grounding"}, "instruction", "required"),
        ({"task": "locate", "instruction": "OK", "image": IMG}, "task", "'grounding'"),
        (
            {"task": "grounding", "messages": [user({"type": "text", "text": "OK"})]},
            "messages",
            "exactly one image",
        ),
        (
            {"task": "grounding", "messages": [two_images]},
            "messages[0].content[2].image_url.url",
            "image 2",
        ),
        (
            {"task": "grounding", "messages": [user({"type": "image", "image": IMG})]},
            "messages",
            "element description",
        ),
        (
            {
                "task": "grounding",
                "messages": [
                    {"role": "system", "content": "hi"},
                    user({"type": "image", "image": IMG}, {"type": "text", "text": "OK"}),
                ],
            },
            "messages[0].role",
            "system_prompt",
        ),
        (
            {
                "task": "grounding",
                "instruction": "OK",
                "messages": [user({"type": "image", "image": IMG}, {"type": "text", "text": "x"})],
            },
            "instruction",
            "not both",
        ),
        (
            {"task": "grounding", "instruction": "OK", "image": IMG, "system_prompt": ""},
            "system_prompt",
            "at least 1",
        ),
        ({"instruction": "OK", "image": IMG}, "instruction", "only used with task 'grounding'"),
        (
            {"messages": [user({"type": "text", "text": "x"})], "image": IMG},
            "image",
            "only used with task 'grounding'",
        ),
        ({"task": "chat"}, "messages", "Field required"),
    ],
)
def test_jobs_that_cannot_be_grounded_name_the_field(data, field, words):
    with pytest.raises(InvalidInput) as info:
        parse_job(data)
    assert info.value.field == field, info.value
    assert words in info.value.message and info.value.message.startswith(field)


# ---------------------------------------------------------------------------- job path
@pytest.fixture
def info(processor) -> ModelInfo:
    return scripted_info(processor, max_model_len=32768)


async def run_job(info, answer, job_input, finish="stop", **env):
    env.setdefault("GROUNDING_STYLE", "gta1")
    runner = JobRunner(
        ScriptedEngine(info, answer_script(answer, finish)), load_worker_settings(env)
    )
    chunks = [c async for c in runner.run({"id": "g1", "input": job_input})]
    return runner, chunks


def grounding_job(image=None, instruction="the blue Submit button", **extra):
    return {"task": "grounding", "instruction": instruction, "image": image or data_uri(), **extra}


async def test_grounding_job_streams_text_then_the_point_in_original_pixels(info):
    runner, chunks = await run_job(
        info, "(966, 546)", grounding_job(data_uri(screenshot(1920, 1080)))
    )
    *body, final = chunks
    assert body and all(set(c) == {"text"} for c in body)
    assert "".join(c["text"] for c in chunks) == "(966, 546)"
    g = final["grounding"]
    # GTA1's bounds, not the tiny processor's 1003520: the image keeps 1932x1092.
    assert g["resized_size"] == [1932, 1092] and g["original_size"] == [1920, 1080]
    assert g["point_resized"] == [966, 546] and g["point"] == [960.0, 540.0]
    assert g["raw_text"] == "(966, 546)" and g["clamped"] is False
    assert final["images"][0]["resized_size"] == [1932, 1092]
    (req,) = runner.engine.requests
    assert req.images[0].size == (1932, 1092)
    assert req.mm_processor_kwargs == {"min_pixels": 3136, "max_pixels": 4096 * 2160}
    assert "The image resolution is height 1092 and width 1932." in req.prompt
    system, user_turn = req.prompt.split("<|im_start|>user\n")
    assert system.startswith("<|im_start|>system\nYou are an expert UI element locator.")
    assert user_turn.startswith(
        "<|vision_start|><|image_pad|><|vision_end|>the blue Submit button<|im_end|>"
    )


async def test_non_streamed_grounding_job_is_one_chunk(info):
    _, chunks = await run_job(info, "It is at (10.5, 20)", grounding_job(stream=False))
    (final,) = chunks
    assert final["text"] == "It is at (10.5, 20)"
    assert final["grounding"]["point_resized"] == [10.5, 20]


async def test_answer_without_a_point_gives_null_and_a_reason(info):
    _, chunks = await run_job(info, "no idea", grounding_job(), finish="length")
    g = chunks[-1]["grounding"]
    assert g["point"] is None and g["point_resized"] is None
    assert (
        g["reason"]
        == "no point found in the model's answer (gta1 format) (generation stopped at max_tokens)"
    )


async def test_messages_form_and_custom_system_prompt(info):
    job = {
        "task": "grounding",
        "system_prompt": "Find it. Screen: {width} wide, {height} high.",
        "messages": [
            user({"type": "text", "text": "Where is"}, {"type": "image", "image": data_uri()}),
            {"role": "assistant", "content": "("},
        ],
        "stream": False,
    }
    runner, chunks = await run_job(info, "(1, 2)", job)
    (req,) = runner.engine.requests
    assert req.prompt.startswith("<|im_start|>system\nFind it. Screen: 308 wide, 196 high.")
    assert "Where is<|vision_start|>" in req.prompt and req.prompt.endswith("assistant\n(")
    assert chunks[0]["grounding"]["resized_size"] == [308, 196]


async def test_chat_jobs_keep_the_processor_bounds(info):
    runner, _ = await run_job(
        info,
        "hello",
        {
            "messages": [
                user(
                    {"type": "image", "image": data_uri(screenshot(1920, 1080))},
                    {"type": "text", "text": "hi"},
                )
            ],
            "stream": False,
        },
    )
    (req,) = runner.engine.requests
    assert req.mm_processor_kwargs is None
    assert req.images[0].size == ImageGeometry().target_size(1080, 1920)[::-1]


async def test_grounding_settings_and_engine_cap_decide_the_size(info):
    from dataclasses import replace

    runner, chunks = await run_job(
        info,
        "(0, 0)",
        grounding_job(data_uri(screenshot(1920, 1080)), stream=False),
        GROUNDING_MAX_PIXELS="500000",
    )
    assert chunks[0]["grounding"]["resized_size"] == [924, 504]  # smart_resize at 500000
    # vLLM's own bounds keep 924x504 as it is: the job's need not reach it (a new set of
    # kwargs makes vLLM load another processor)
    assert info.geometry.is_fixed_point(504, 924)
    assert runner.engine.requests[0].mm_processor_kwargs is None
    capped = replace(info, max_image_tokens=300)
    runner, chunks = await run_job(
        capped, "(0, 0)", grounding_job(data_uri(screenshot(1920, 1080)), stream=False)
    )
    w, h = chunks[0]["grounding"]["resized_size"]
    assert (w // 28) * (h // 28) <= 300
    assert runner.engine.requests[0].mm_processor_kwargs is None
    # an engine whose own bounds would enlarge the image is told the grounding bounds
    strict = replace(info, geometry=replace(info.geometry, min_pixels=1_000_000))
    runner, chunks = await run_job(
        strict, "(0, 0)", grounding_job(data_uri(screenshot(1920, 1080)), stream=False),
        GROUNDING_MAX_PIXELS="500000",
    )  # fmt: skip
    assert runner.engine.requests[0].mm_processor_kwargs == {
        "min_pixels": 3136,
        "max_pixels": 500_000,
    }


async def test_max_images_per_job_zero_refuses_grounding(info):
    _, chunks = await run_job(info, "(1, 1)", grounding_job(), MAX_IMAGES_PER_JOB="0")
    assert chunks[0]["error"]["field"] == "image"


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    size=st.tuples(st.integers(8, 2400), st.integers(8, 1600)).filter(
        lambda s: max(s) / min(s) <= 200
    ),
    fx=st.floats(0, 1),
    fy=st.floats(0, 1),
)
def test_job_path_maps_the_models_point_like_a_direct_computation(info, size, fx, fy):
    """Through the real image path: prompt, pixels and the point all use one resized size."""
    ow, oh = size
    rh, rw = smart_resize(oh, ow, factor=28, min_pixels=3136, max_pixels=12_845_056)
    x, y = round(fx * rw), round(fy * rh)
    runner, chunks = asyncio.run(
        run_job(info, f"({x},{y})", grounding_job(data_uri(screenshot(ow, oh)), stream=False))
    )
    g = chunks[0]["grounding"]
    assert g["resized_size"] == [rw, rh] and g["original_size"] == [ow, oh]
    assert f"height {rh} and width {rw}." in runner.engine.requests[0].prompt
    assert runner.engine.requests[0].images[0].size in {(rw, rh), (ow, oh)}
    ex = min(max(x * ow / rw, 0), ow - 1)
    ey = min(max(y * oh / rh, 0), oh - 1)
    # the point is rounded to 0.01 px: off by at most half of that, plus float error
    assert math.isclose(g["point"][0], ex, abs_tol=0.005 + 1e-9)
    assert math.isclose(g["point"][1], ey, abs_tol=0.005 + 1e-9)


# ------------------------------------------------------- several targets, constraints
async def test_several_targets_share_one_image_and_answer_in_order(info):
    job = {
        "task": "grounding",
        "instructions": ["the Save button", "the search box", "the close icon"],
        "image": data_uri(screenshot(1920, 1080)),
    }
    runner, chunks = await run_job(info, "(966, 546)", job)
    (final,) = chunks  # one chunk, streamed or not
    requests = runner.engine.requests
    assert [r.request_id for r in requests] == ["g1-0", "g1-1", "g1-2"]
    # one decode and resize: the same pixels and content id in every request
    assert all(r.images[0] is requests[0].images[0] for r in requests)
    assert len({r.image_ids[0] for r in requests}) == 1
    for request, instruction in zip(requests, job["instructions"], strict=True):
        assert request.prompt.endswith(
            f"<|vision_end|>{instruction}<|im_end|>\n<|im_start|>assistant\n"
        )
    assert [g["instruction"] for g in final["groundings"]] == job["instructions"]
    assert all(g["point"] == [960.0, 540.0] for g in final["groundings"])
    assert "grounding" not in final and "text" not in final
    assert final["usage"]["completion_tokens"] == 3 * len(answer_script("(966, 546)"))
    assert final["images"][0]["resized_size"] == [1932, 1092]


@pytest.mark.parametrize(
    ("extra", "field", "words"),
    [
        ({"instructions": ["a", "  "]}, "instructions[1]", "must not be empty"),
        ({"instructions": ["a"], "instruction": "b"}, "instructions", "not both"),
        ({"instructions": []}, "instructions", "at least 1"),
        ({"instructions": ["x"] * 33}, "instructions", "at most 32"),
    ],
)
async def test_bad_target_lists_are_refused_by_name(info, extra, field, words):
    job = {"task": "grounding", "image": data_uri(), **extra}
    _, chunks = await run_job(info, "(1, 1)", job)
    error = chunks[0]["error"]
    assert error["type"] == "invalid_input" and error["field"] == field, error
    assert words in error["message"]


async def test_instructions_and_constrain_are_grounding_fields(info):
    for key, value in (("instructions", ["a"]), ("constrain", True)):
        _, chunks = await run_job(
            info, "x", {"messages": [{"role": "user", "content": "hi"}], key: value}
        )
        assert chunks[0]["error"]["field"] == key


async def test_constrained_jobs_decode_under_the_styles_grammar(info):
    from vlm_worker.prompt.grounding_styles import STYLES

    runner, _ = await run_job(info, "(3,4)", grounding_job(constrain=True, stream=False))
    (request,) = runner.engine.requests
    assert request.sampling["structured_outputs"] == {"regex": STYLES["gta1"].answer_regex()}
    # the setting is the default; a job says otherwise
    runner, _ = await run_job(info, "(3,4)", grounding_job(), GROUNDING_CONSTRAIN="true")
    assert "structured_outputs" in runner.engine.requests[0].sampling
    runner, _ = await run_job(
        info, "(3,4)", grounding_job(constrain=False), GROUNDING_CONSTRAIN="true"
    )
    assert "structured_outputs" not in runner.engine.requests[0].sampling
    _, chunks = await run_job(
        info, "(3,4)", grounding_job(constrain=True, structured_outputs={"regex": "a"})
    )
    assert chunks[0]["error"]["field"] == "constrain"
    # too few tokens for the longest answer the grammar allows: raised, and said so
    runner, chunks = await run_job(
        info, "(3,4)", grounding_job(constrain=True, max_tokens=5, stream=False)
    )
    assert runner.engine.requests[0].sampling["max_tokens"] == 14  # "(99999,99999)" + end
    assert "max_tokens 5 raised to 14" in chunks[-1]["warnings"][0]


async def test_the_style_decides_the_prompt_space_and_parser(info):
    job = grounding_job(data_uri(screenshot(1000, 500)), stream=False)
    runner, chunks = await run_job(
        info, '{"point_2d": [500, 500]}', job, GROUNDING_STYLE="qwen3-vl"
    )
    g = chunks[0]["grounding"]
    assert g["style"] == "qwen3-vl" and g["space"] == "relative-1000"
    assert g["point"] == [500.0, 250.0] and g["model_point"] == [500, 500]
    prompt = runner.engine.requests[0].prompt
    assert "Locate the the blue Submit button in this image." in prompt
    assert "<|im_start|>system" in prompt  # the template's own default system message
