"""Each GUI family's grounding convention against its own reference recipe.

Golden tests: for the same screenshot and instruction, the worker's inputs to vLLM (the
rendered prompt text, the resized size, the processor's ``pixel_values``) equal what the
family's reference inference code builds, written out here from the families' sources
(``docs/decisions/0009-grounding-conventions.md``), bit for bit. Random weights cannot
show accuracy; identical inputs are what keep a real checkpoint's.

Then each family's documented answer formats (and malformed ones), the mapping in every
coordinate space, the constrained grammars, and how a style is chosen.
"""

from __future__ import annotations

import asyncio
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from tools.tiny_model import build_tiny_model
from tools.tiny_models import build
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from support.fakes import ScriptedEngine, answer_script, scripted_info
from support.jobs import data_uri
from vlm_worker.config.settings import TINY_MODEL_DIR, load_worker_settings
from vlm_worker.engine.model_info import geometry_from, load_processor
from vlm_worker.pipeline.runner import JobRunner
from vlm_worker.prompt.chat import MEDIA_SPAN
from vlm_worker.prompt.grounding import grounding_result, to_pixels
from vlm_worker.prompt.grounding_answers import PARSERS
from vlm_worker.prompt.grounding_styles import STYLES, choose, detect

MODELS = TINY_MODEL_DIR.parent
INSTRUCTION = "the blue Submit button"

# ------------------------------------------------------------- the reference recipes
# Each: (style, model folder builder, architecture, reference messages(orig, resized),
# reference resize bounds or None for the processor's, Pillow pre-resize or not).
GTA1_PROMPT = (
    "You are an expert UI element locator. Given a GUI image and a user's element "
    "description, provide the coordinates of the specified element as a single (x,y) point. "
    "The image resolution is height {height} and width {width}. For elements with area, "
    "return the center point.\n\nOutput the coordinate pair exactly:\n(x,y)"
)  # Yan98/GTA1 README inference: SYSTEM_PROMPT.format(height=rh, width=rw)
UI_TARS_GROUNDING = (  # bytedance/UI-TARS codes/prompts.py GROUNDING
    "You are a GUI agent. You are given a task and your action history, with screenshots. "
    "You need to perform the next action to complete the task. \n\n## Output Format\n\n"
    "Action: ...\n\n\n## Action Space\nclick(start_box='<|box_start|>(x1,y1)<|box_end|>')"
    "\n\n## User Instruction\n{instruction}"
)
OPENCUA_SYSTEM = (  # xlang-ai/OpenCUA model/inference/huggingface_inference.py
    "You are a GUI agent. You are given a task and a screenshot of the screen. "
    "You need to perform a series of pyautogui actions to complete the task."
)


def image_part() -> dict:
    return {"type": "image"}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


REFERENCES = {
    "gta1": dict(
        model="qwen2.5-vl",
        arch="Qwen2_5_VLForConditionalGeneration",
        messages=lambda rw, rh: [
            {"role": "system", "content": GTA1_PROMPT.format(height=rh, width=rw)},
            {"role": "user", "content": [image_part(), text_part(INSTRUCTION)]},
        ],
        bounds=(3136, 4096 * 2160),
        pillow=True,
    ),
    "qwen2.5-vl": dict(  # QwenLM cookbook spatial_understanding: text, then the image
        model="qwen2.5-vl",
        arch="Qwen2_5_VLForConditionalGeneration",
        messages=lambda rw, rh: [
            {
                "role": "user",
                "content": [
                    text_part(
                        f"Locate the {INSTRUCTION}, output its bbox coordinates using JSON format."
                    ),
                    image_part(),
                ],
            }
        ],
        bounds=(3136, 12_845_056),
        pillow=False,
    ),
    "qwen3-vl": dict(  # QwenLM/Qwen3-VL cookbook spatial_understanding, point form
        model="qwen3-vl",
        arch="Qwen3VLForConditionalGeneration",
        messages=lambda rw, rh: [
            {
                "role": "user",
                "content": [
                    image_part(),
                    text_part(
                        f"Locate the {INSTRUCTION} in this image. Output the point coordinates "
                        "in JSON format."
                    ),
                ],
            }
        ],
        bounds=None,
        pillow=False,
    ),
    "ui-tars-1.5": dict(
        model="qwen2.5-vl",
        arch="Qwen2_5_VLForConditionalGeneration",
        messages=lambda rw, rh: [
            {
                "role": "user",
                "content": [
                    text_part(UI_TARS_GROUNDING.format(instruction=INSTRUCTION)),
                    image_part(),
                ],
            }
        ],
        bounds=(78_400, 12_845_056),  # codes/ui_tars/action_parser.py MIN_PIXELS/MAX_PIXELS
        pillow=False,
    ),
    "ui-tars": dict(  # README_v1 single-step grounding: image, then prefix + instruction
        model="qwen2-vl",
        arch="Qwen2VLForConditionalGeneration",
        messages=lambda rw, rh: [
            {
                "role": "user",
                "content": [
                    image_part(),
                    text_part(
                        "Output only the coordinate of one point in your response. What "
                        f"element matches the following task: {INSTRUCTION}"
                    ),
                ],
            }
        ],
        bounds=None,
        pillow=False,
    ),
    "opencua": dict(
        model="opencua",
        arch="Qwen2_5_VLForConditionalGeneration",  # the tiny OpenCUA: Qwen2.5-VL inside
        messages=lambda rw, rh: [
            {"role": "system", "content": OPENCUA_SYSTEM},
            {"role": "user", "content": [image_part(), text_part(INSTRUCTION)]},
        ],
        bounds=(3136, 12_845_056),
        pillow=False,
    ),
}


def model_dir(name: str) -> Path:
    if name == "qwen2.5-vl":
        return build_tiny_model(TINY_MODEL_DIR)
    if name == "opencua":
        return build_tiny_model(MODELS / "tiny-opencua", template="opencua")
    return build(name, MODELS / f"tiny-{name}")


_PROCESSORS: dict[str, object] = {}


def processor_for(name: str):
    if name not in _PROCESSORS:
        _PROCESSORS[name] = load_processor(str(model_dir(name)), None, False)
    return _PROCESSORS[name]


def screenshot(width: int, height: int, seed: int) -> Image.Image:
    """Random blocks: every resampling difference shows in the pixels."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, height // 6), max(1, width // 6), 3), np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.NEAREST)


async def worker_inputs(style: str, processor, arch: str, image: Image.Image):
    info = scripted_info(
        processor,
        max_model_len=65536,
        geometry=geometry_from(processor.image_processor),
        architecture=arch,
    )
    runner = JobRunner(
        ScriptedEngine(info, answer_script("(1,1)")),
        load_worker_settings({"GROUNDING_STYLE": style}),
    )
    job = {
        "task": "grounding",
        "instruction": INSTRUCTION,
        "image": data_uri(image),
        "stream": False,
    }
    chunks = [c async for c in runner.run({"id": "golden", "input": job})]
    assert "error" not in chunks[-1], chunks[-1]
    (request,) = runner.engine.requests
    return request, chunks[-1]


SIZES = [(1920, 1080), (1366, 768), (5120, 2880)]


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
@pytest.mark.parametrize("style", list(REFERENCES))
def test_the_workers_inputs_are_the_familys_reference_recipe(style, size):
    ref = REFERENCES[style]
    processor = processor_for(ref["model"])
    original = screenshot(*size, seed=size[0])
    request, final = asyncio.run(worker_inputs(style, processor, ref["arch"], original))

    # the resized size: smart_resize with the family's bounds (or the processor's own)
    ip = processor.image_processor
    factor = ip.patch_size * ip.merge_size
    low, high = ref["bounds"] or (ip.size["shortest_edge"], ip.size["longest_edge"])
    rh, rw = smart_resize(size[1], size[0], factor=factor, min_pixels=low, max_pixels=high)
    assert final["grounding"]["resized_size"] == [rw, rh]

    # the prompt text, as the family's code renders it through the model's template
    text = processor.apply_chat_template(
        ref["messages"](rw, rh), tokenize=False, add_generation_prompt=True
    )
    placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    assert request.prompt == MEDIA_SPAN.sub(placeholder, text)

    # the pixels: the reference's image through the processor with the reference's bounds,
    # against what the worker hands vLLM with the bounds it hands vLLM
    reference_image = original.resize((rw, rh)) if ref["pillow"] else original
    ref_kwargs = {} if ref["bounds"] is None else {"min_pixels": low, "max_pixels": high}
    want = ip(images=[reference_image], return_tensors="pt", **ref_kwargs)
    got = ip(images=[request.images[0]], return_tensors="pt", **(request.mm_processor_kwargs or {}))
    assert got["image_grid_thw"].tolist() == want["image_grid_thw"].tolist()
    assert torch.equal(got["pixel_values"], want["pixel_values"])


# ------------------------------------------------------------------ answer formats
DOCUMENTED = [
    # (style, the model's answer, the point in the model's space, the box or None)
    ("gta1", "(1021,544)", (1021, 544), None),
    ("gta1", "The element is at (12.5, 7).", (12.5, 7), None),
    ("qwen2.5-vl", '```json\n[\n\t{"bbox_2d": [10, 20, 30, 60], "label": "Submit"}\n]\n```', (20, 40), (10, 20, 30, 60)),
    ("qwen2.5-vl", '<points x1="123" y1="456" alt="pin">pin</points>', (123, 456), None),
    ("qwen2.5-vl", '{"point_2d": [5, 6]}', (5, 6), None),
    ("qwen3-vl", '```json\n[\n\t{"point_2d": [925, 618], "label": "point_1"}\n]\n```', (925, 618), None),
    ("qwen3-vl", '[{"bbox_2d": [100, 200, 300, 400]}, {"point_2d": [1, 2]}]', (200, 300), (100, 200, 300, 400)),
    ("ui-tars-1.5", "Action: click(start_box='(197,525)')", (197, 525), None),
    ("ui-tars-1.5", "Action: click(start_box='<|box_start|>(197,525)<|box_end|>')", (197, 525), None),
    ("ui-tars-1.5", "click(start_box='(10,20,30,40)')", (20, 30), (10, 20, 30, 40)),
    ("ui-tars-1.5", "click(point='<point>200 300</point>')", (200, 300), None),
    ("ui-tars", "(235,512)", (235, 512), None),
    ("ui-tars", "(100,200,300,400)", (200, 300), (100, 200, 300, 400)),
    ("opencua", "pyautogui.click(x=960, y=324)", (960, 324), None),
    ("opencua", "Thought: the button.\nAction: pyautogui.doubleClick(x=1.5, y=2)", (1.5, 2), None),
]  # fmt: skip


@pytest.mark.parametrize(("style", "text", "point", "box"), DOCUMENTED)
def test_documented_answers_parse(style, text, point, box):
    answer = PARSERS[STYLES[style].answer](text)
    assert answer is not None
    assert answer.point == point and answer.box == box


MALFORMED = [
    ("gta1", "(12,"),
    ("gta1", "no idea"),
    ("qwen2.5-vl", '{"bbox_2d": [1, 2, 3]}'),
    ("qwen3-vl", '{"point_2d": [inf, 2]}'),
    ("ui-tars-1.5", "click(start_box='')"),
    ("opencua", "pyautogui.press('enter')"),
]


@pytest.mark.parametrize(("style", "text"), MALFORMED)
def test_malformed_answers_give_no_point(style, text):
    assert PARSERS[STYLES[style].answer](text) is None
    out = grounding_result(text, (100, 50), (112, 56), "stop", STYLES[style])
    assert out["point"] is None and out["reason"].startswith("no point found")


def test_a_box_maps_corner_by_corner_and_its_centre_is_the_point():
    out = grounding_result(
        '{"bbox_2d": [100, 200, 300, 400]}', (2000, 1000), (1000, 500), None, STYLES["qwen2.5-vl"]
    )
    assert out["box"] == [200.0, 400.0, 600.0, 800.0] and out["point"] == [400.0, 600.0]
    assert out["model_box"] == [100, 200, 300, 400] and out["space"] == "absolute"
    rel = grounding_result(
        '{"point_2d": [500, 250]}', (1920, 1080), (1920, 1088), None, STYLES["qwen3-vl"]
    )
    assert rel["point"] == [960.0, 270.0] and rel["space"] == "relative-1000"
    assert rel["point_resized"] == [960.0, 272.0]


# ------------------------------------------------------------------ mapping property
@settings(max_examples=200, deadline=None)
@given(
    original=st.tuples(st.integers(16, 5000), st.integers(16, 5000)),
    fx=st.floats(0, 1),
    fy=st.floats(0, 1),
    space=st.sampled_from(["absolute", "relative-1000", "relative-1"]),
)
def test_every_space_maps_the_same_place_to_the_same_pixel(original, fx, fy, space):
    """The same relative place, said in any space, lands on the same original pixel."""
    ow, oh = original
    if max(ow, oh) / min(ow, oh) > 200:
        return
    rh, rw = smart_resize(oh, ow, factor=28, min_pixels=3136, max_pixels=12_845_056)
    said = {
        "absolute": (fx * rw, fy * rh),
        "relative-1000": (fx * 1000, fy * 1000),
        "relative-1": (fx, fy),
    }[space]
    (x, y), clamped = to_pixels(said, space, (rw, rh), (ow, oh))
    assert 0 <= x <= ow - 1 and 0 <= y <= oh - 1
    assert math.isclose(x, min(fx * ow, ow - 1), abs_tol=0.006)
    assert math.isclose(y, min(fy * oh, oh - 1), abs_tol=0.006)
    assert clamped == (fx * ow > ow - 1 or fy * oh > oh - 1)


# ------------------------------------------------------------- constrained grammars
@pytest.mark.parametrize("style", list(STYLES))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_whatever_the_grammar_allows_parses_to_a_point(style, data):
    s = STYLES[style]
    text = data.draw(st.from_regex(re.compile(s.answer_regex()), fullmatch=True))
    answer = PARSERS[s.answer](text)
    assert answer is not None, text
    assert len(text) <= s.longest_answer()  # a constrained job's max_tokens floor


@pytest.mark.parametrize("style", list(STYLES))
def test_grammars_take_their_coordinate_space(style):
    s = STYLES[style]
    for space, good, bad in (
        ("absolute", "1932", "123456"),
        ("relative-1000", "1000", "1001"),
        ("relative-1", "0.25", "1.5"),
    ):
        pattern = re.compile(s.with_space(space).answer_regex())
        sample = {"gta1": "({v},{v})", "ui-tars": "({v},{v})"}.get(style)
        if sample is not None:
            assert pattern.fullmatch(sample.format(v=good))
            assert not pattern.fullmatch(sample.format(v=bad))


# ------------------------------------------------------------------------- detection
@pytest.mark.parametrize(
    ("arch", "name", "style"),
    [
        ("Qwen2_5_VLForConditionalGeneration", "Salesforce/GTA1-7B-2507", "gta1"),
        ("Qwen2_5_VLForConditionalGeneration", "HelloKKMe/GTA1-32B", "gta1"),
        ("Qwen2_5_VLForConditionalGeneration", "ByteDance-Seed/UI-TARS-1.5-7B", "ui-tars-1.5"),
        ("Qwen2VLForConditionalGeneration", "bytedance-research/UI-TARS-7B-DPO", "ui-tars"),
        ("OpenCUAForConditionalGeneration", "xlangai/OpenCUA-7B", "opencua"),
        ("Qwen2_5_VLForConditionalGeneration", "/models/xlangai--OpenCUA-32B", "opencua"),
        ("Qwen3VLForConditionalGeneration", "Qwen/Qwen3-VL-8B-Instruct", "qwen3-vl"),
        ("Qwen3VLMoeForConditionalGeneration", "Qwen/Qwen3-VL-30B-A3B-Instruct", "qwen3-vl"),
        ("Qwen2_5_VLForConditionalGeneration", "Qwen/Qwen2.5-VL-7B-Instruct", "qwen2.5-vl"),
        ("Qwen2_5_VLForConditionalGeneration", "my-org/my-finetune", "gta1"),
        ("Gemma3ForConditionalGeneration", "google/gemma-3-4b-it", "gta1"),
    ],
)
def test_the_style_follows_the_model(arch, name, style):
    got, why = detect(arch, (name,))
    assert got == style and why


def test_settings_override_the_style_and_its_space():
    style, why = choose("Qwen3VLForConditionalGeneration", ("x",), "opencua", "relative-1")
    assert style.name == "opencua" and style.space == "relative-1"
    assert "GROUNDING_STYLE=opencua" in why and "GROUNDING_COORDINATES=relative-1" in why
