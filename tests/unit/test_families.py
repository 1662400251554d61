"""Per-family image handling: which models are pre-resized, and that it changes nothing.

For each family the worker pre-resizes, the processor's ``pixel_values`` (and grid) from
the pre-resized image must equal those from the original, bit for bit, with that family's
real processor settings. Every other family gets the upright RGB original at full size.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, Gemma3ImageProcessor, Qwen2VLImageProcessor

from support.jobs import encode
from vlm_worker.config.settings import load_worker_settings
from vlm_worker.contract.errors import ConfigError
from vlm_worker.engine.model_info import check_image_bounds, geometry_from
from vlm_worker.media.families import QWEN_RESIZE_ARCHITECTURES, image_handling
from vlm_worker.media.geometry import ImageGeometry
from vlm_worker.media.images import prepare_image

# The image processor settings each family's released checkpoints ship with
# (preprocessor_config.json of Qwen/Qwen2-VL-7B-Instruct, Qwen/Qwen2.5-VL-7B-Instruct and
# Qwen/Qwen3-VL-8B-Instruct).
QWEN_PROCESSORS = {
    "qwen2-vl": dict(min_pixels=3136, max_pixels=12845056, patch_size=14, merge_size=2),
    "qwen2.5-vl": dict(min_pixels=3136, max_pixels=12845056, patch_size=14, merge_size=2),
    "qwen3-vl": dict(
        size={"shortest_edge": 65536, "longest_edge": 16777216},
        patch_size=16,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    ),
}
ARCHITECTURE = {
    "qwen2-vl": "Qwen2VLForConditionalGeneration",
    "qwen2.5-vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3-vl": "Qwen3VLForConditionalGeneration",
}


def textured(width: int, height: int, seed: int = 0) -> Image.Image:
    """Random colour blocks: every resampling difference shows."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, height // 4), max(1, width // 4), 3), np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.NEAREST)


def handling_for(family: str):
    processor = Qwen2VLImageProcessor(**QWEN_PROCESSORS[family])
    return processor, image_handling(
        ARCHITECTURE[family], processor, lambda: geometry_from(processor)
    )


@pytest.mark.parametrize("family", list(QWEN_PROCESSORS))
def test_qwen_families_are_pre_resized_with_their_own_patch(family):
    _, handling = handling_for(family)
    assert handling.pre_resize
    expected = QWEN_PROCESSORS[family]
    assert handling.geometry.patch_size == expected["patch_size"]
    assert handling.geometry.factor == expected["patch_size"] * 2
    if family == "qwen3-vl":
        assert (handling.geometry.min_pixels, handling.geometry.max_pixels) == (65536, 16777216)


SIZES = [(1920, 1080), (3840, 2160), (640, 480), (57, 913), (30, 30), (1366, 768)]


@pytest.mark.parametrize("family", list(QWEN_PROCESSORS))
@pytest.mark.parametrize(("width", "height"), SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_pre_resize_leaves_the_processors_pixels_unchanged(family, width, height):
    processor, handling = handling_for(family)
    original = textured(width, height, seed=width + height)
    prepared = prepare_image(
        encode(original, "PNG", compress_level=1),
        field="image",
        geometry=handling.geometry,
        processor=processor,
        max_source_pixels=64_000_000,
    )
    want = processor(images=[original], return_tensors="pt")
    got = processor(images=[prepared.image], return_tensors="pt")
    assert got["image_grid_thw"].tolist() == want["image_grid_thw"].tolist()
    _, grid_h, grid_w = want["image_grid_thw"][0].tolist()
    patch = handling.geometry.patch_size
    assert prepared.resized_size == (grid_w * patch, grid_h * patch)
    # the token count the worker states is the one the model gets
    tokens = grid_h * grid_w // handling.geometry.merge_size**2
    assert handling.geometry.image_tokens(*prepared.resized_size[::-1]) == tokens
    assert torch.equal(got["pixel_values"], want["pixel_values"])


@pytest.mark.parametrize(
    ("architecture", "processor"),
    [
        ("LlavaForConditionalGeneration", CLIPImageProcessor()),
        ("Gemma3ForConditionalGeneration", Gemma3ImageProcessor()),
        # a Qwen2-VL processor under an architecture whose token count is its own
        ("Glm4vForConditionalGeneration", Qwen2VLImageProcessor()),
        # a Qwen architecture served with another processor (a custom checkpoint)
        ("Qwen2_5_VLForConditionalGeneration", CLIPImageProcessor()),
    ],
)
def test_other_families_go_to_the_processor_at_full_size(architecture, processor):
    def never() -> ImageGeometry:
        raise AssertionError("another family's size settings are not smart_resize bounds")

    handling = image_handling(architecture, processor, never)
    assert not handling.pre_resize and handling.geometry is None
    assert architecture in handling.reason and type(processor).__name__ in handling.reason


def test_every_listed_architecture_is_known_to_vllm():
    from vllm.model_executor.models.registry import ModelRegistry

    assert set(ModelRegistry.get_supported_archs()) >= QWEN_RESIZE_ARCHITECTURES


def test_full_size_image_is_upright_rgb_and_reports_no_resized_size():
    rgba = Image.new("RGBA", (300, 200), (10, 20, 30, 128))
    prepared = prepare_image(
        encode(rgba, "PNG"),
        field="image",
        geometry=None,
        processor=CLIPImageProcessor(),
        max_source_pixels=64_000_000,
    )
    assert prepared.image.mode == "RGB" and prepared.image.size == (300, 200)
    assert prepared.original_size == (300, 200) and prepared.resized_size is None
    assert prepared.describe()["resized_size"] is None
    assert prepared.content_id.endswith("-original")
    assert "->processor" in repr(prepared)


def test_full_size_jpeg_is_turned_upright():
    img = textured(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(img, "JPEG", exif=exif.tobytes())
    prepared = prepare_image(
        data, field="image", geometry=None, processor=None, max_source_pixels=10**8
    )
    assert prepared.original_size == (20, 40) and prepared.image.size == (20, 40)


def test_resize_bounds_are_refused_for_a_family_that_ignores_them():
    handling = image_handling("LlavaForConditionalGeneration", CLIPImageProcessor(), ImageGeometry)
    check_image_bounds(handling, load_worker_settings({}))
    with pytest.raises(ConfigError, match="IMAGE_MAX_PIXELS applies to Qwen2-VL-family"):
        check_image_bounds(handling, load_worker_settings({"IMAGE_MAX_PIXELS": "1000000"}))
    _, qwen = handling_for("qwen2.5-vl")
    check_image_bounds(qwen, load_worker_settings({"IMAGE_MAX_PIXELS": "1000000"}))
