"""Image decoding and the pre-resize: same geometry and same pixels as the model's processor.

The worker resizes images itself (before they travel to vLLM's engine process), so every
test here checks against transformers' own code: ``smart_resize`` for the size, and the
model's image processor for the pixels. Nothing here starts an engine.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, ImageOps
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from support.jobs import encode, mm_kwargs, screenshot
from vlm_worker.contract.errors import ImageDecodeError, InvalidInput
from vlm_worker.engine.model_info import geometry_from
from vlm_worker.media.geometry import ImageGeometry
from vlm_worker.media.images import (
    ALLOWED_FORMATS,
    PreparedImage,
    as_pil,
    decode_inline,
    decode_pixels,
    open_image,
    pixel_size,
    prepare_image,
)

FIELD = "messages[0].content[1].image_url.url"
MAX_SOURCE = 64_000_000
QWEN_MIN, QWEN_MAX = 56 * 56, 28 * 28 * 1280

# (min_pixels, max_pixels) pairs: Qwen2.5-VL's defaults, common deployment overrides, and a
# few narrow ones where smart_resize itself cannot keep the area inside the bounds.
BOUNDS = [
    (QWEN_MIN, QWEN_MAX),
    (QWEN_MIN, 28 * 28 * 256),
    (28 * 28 * 256, QWEN_MAX),
    (QWEN_MIN, 28 * 28 * 16384),
    (28 * 28 * 4, 28 * 28 * 4),
    (784, QWEN_MIN),
    (28 * 28 * 64, 28 * 28 * 64),
]


def bounds_guaranteed(min_pixels: int, max_pixels: int, factor: int, ratio: float = 200) -> bool:
    """Whether smart_resize provably lands in [min, max] for every aspect ratio <= ``ratio``.

    * max branch: sides are floored from (h, w)/beta, whose product is max_pixels; no side
      is clamped up to ``factor`` when max_pixels >= factor**2 * ratio, and the floors lose
      less than ``factor`` each, so the area stays above max - f*sqrt(max)*r + f**2;
    * min branch: sides are ceiled from (h, w)*beta, whose product is min_pixels, so the
      area stays below min + f*sqrt(min)*r + f**2;
    where r = sqrt(ratio) + 1/sqrt(ratio) bounds (h + w) / sqrt(h * w).
    """
    f, r = factor, math.sqrt(ratio) + 1 / math.sqrt(ratio)
    return (
        max_pixels >= f * f * ratio
        and min_pixels + f * math.sqrt(min_pixels) * r + f * f <= max_pixels
        and max_pixels - f * math.sqrt(max_pixels) * r + f * f >= min_pixels
    )


def test_bounds_table_covers_both_cases():
    flags = [bounds_guaranteed(lo, hi, 28) for lo, hi in BOUNDS]
    assert flags[:4] == [True] * 4 and not all(flags)


@st.composite
def sizes(draw, max_side: int = 8000, ratio: int = 200):
    """(height, width) in 1..max_side with max/min <= ratio, either side the longer."""
    short = draw(st.integers(1, max_side))
    long = draw(st.integers(short, min(max_side, short * ratio)))
    return (short, long) if draw(st.booleans()) else (long, short)


# ---------------------------------------------------------------- geometry (smart_resize)


@settings(max_examples=300, deadline=None)
@given(hw=sizes(), bounds=st.sampled_from(BOUNDS), patch=st.sampled_from([14, 16]))
def test_target_size_is_smart_resize(hw, bounds, patch):
    height, width = hw
    lo, hi = bounds
    geo = ImageGeometry(patch_size=patch, merge_size=2, min_pixels=lo, max_pixels=hi)
    factor = patch * 2
    assert geo.factor == factor
    got = geo.target_size(height, width, FIELD)
    assert got == smart_resize(height, width, factor=factor, min_pixels=lo, max_pixels=hi)
    new_h, new_w = got
    assert new_h % factor == 0 and new_w % factor == 0
    assert new_h >= factor and new_w >= factor
    if bounds_guaranteed(lo, hi, factor):
        assert lo <= new_h * new_w <= hi, (height, width, got)
        if max(got) / min(got) <= 200:  # see test_nearly_200_to_1_image_survives_the_pre_resize
            # A fixed point: the processor will not resize the pre-resized image again.
            assert geo.target_size(new_h, new_w) == got
    # Token count the prompt-length check uses: one token per merged patch.
    assert geo.image_tokens(new_h, new_w) == (new_h // factor) * (new_w // factor)


@st.composite
def too_wide(draw):
    """(short, long) with long / short > 200, sides in 1..8000."""
    short = draw(st.integers(1, 39))
    return short, draw(st.integers(short * 200 + 1, 8000))


@settings(max_examples=100, deadline=None)
@given(sides=too_wide(), tall=st.booleans())
def test_aspect_ratio_above_200_is_refused(sides, tall):
    short, long = sides
    height, width = (long, short) if tall else (short, long)
    with pytest.raises(ImageDecodeError) as info:
        ImageGeometry().target_size(height, width, FIELD)
    err = info.value
    assert err.field == FIELD
    assert "200:1" in err.message
    assert f"{width}x{height}" in err.message
    assert err.to_dict()["error"]["type"] == "image_decode"


@pytest.mark.parametrize(("height", "width"), [(1, 200), (200, 1), (2, 400), (40, 8000)])
def test_aspect_ratio_of_exactly_200_is_accepted(height, width):
    assert ImageGeometry().target_size(height, width) == smart_resize(height, width)


def test_aspect_ratio_message_does_not_contradict_itself():
    with pytest.raises(ImageDecodeError) as info:
        ImageGeometry().target_size(2, 401, FIELD)
    assert "ratio 200:1 exceeds" not in info.value.message


# ---------------------------------------------------------------- same pixels as the processor


@pytest.fixture(scope="module")
def image_processor(processor):
    return processor.image_processor


@pytest.fixture(scope="module")
def geometry(image_processor):
    """The geometry the worker derives from this processor (no IMAGE_*_PIXELS overrides)."""
    geo = geometry_from(image_processor, mm_kwargs({}))
    assert geo == ImageGeometry(14, 2, QWEN_MIN, QWEN_MAX)
    return geo


def textured(width: int, height: int, seed: int = 0, block: int = 4) -> Image.Image:
    """Random colour blocks: every resampling difference shows (flat screenshots hide some)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, height // block), max(1, width // block), 3), np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.NEAREST)


def prepare(data: bytes, image_processor, geometry, **kw) -> PreparedImage:
    return prepare_image(
        data,
        field=FIELD,
        geometry=geometry,
        processor=image_processor,
        max_source_pixels=kw.pop("max_source_pixels", MAX_SOURCE),
        **kw,
    )


def processed(image_processor, img: Image.Image, **kw):
    out = image_processor(images=[img], return_tensors="pt", **kw)
    return out["pixel_values"], out["image_grid_thw"]


def assert_same_model_input(image_processor, reference: Image.Image, prepared: PreparedImage, **kw):
    """What the model gets from ``reference`` is exactly what it gets from our resized image.

    ``kw`` are per-call processor overrides (min_pixels/max_pixels, as vLLM passes them).
    """
    want_pv, want_grid = processed(image_processor, reference, **kw)
    got_pv, got_grid = processed(image_processor, prepared.image, **kw)
    assert got_grid.tolist() == want_grid.tolist()
    _, grid_h, grid_w = want_grid[0].tolist()
    patch = image_processor.patch_size
    assert prepared.resized_size == (grid_w * patch, grid_h * patch)
    assert got_pv.shape == want_pv.shape
    assert got_pv.dtype == want_pv.dtype
    diff = (got_pv - want_pv).abs().max().item()
    assert torch.equal(got_pv, want_pv), f"pixel_values differ by up to {diff}"


SIZES = [
    (320, 200),  # downscale a little
    (1280, 720),  # upscale a little (rounding to 28)
    (1920, 1080),  # downscale: above max_pixels
    (57, 913),  # tall and thin
    (30, 30),  # upscale to min_pixels
    (1, 1),
    (3, 600),  # 200:1
    (308, 196),  # already a resized size: passes through untouched
    (3840, 2160),  # 4K, far above max_pixels
]


@pytest.mark.parametrize(("width", "height"), SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_pre_resize_gives_the_processors_pixels(image_processor, geometry, width, height):
    original = textured(width, height, seed=width * 7 + height)
    data = encode(original, "PNG", compress_level=1)
    prepared = prepare(data, image_processor, geometry)
    assert prepared.image.mode == "RGB"
    assert prepared.original_size == (width, height)
    assert prepared.image.size == prepared.resized_size
    new_h, new_w = smart_resize(height, width, 28, QWEN_MIN, QWEN_MAX)
    assert prepared.resized_size == (new_w, new_h)
    assert_same_model_input(image_processor, Image.open(io.BytesIO(data)), prepared)
    # The token count the worker computes matches the processor's grid.
    _, grid = processed(image_processor, prepared.image)
    assert geometry.image_tokens(new_h, new_w) == int(grid.prod()) // 4


def test_already_resized_image_is_not_resampled(image_processor, geometry):
    original = textured(308, 196, seed=3)
    prepared = prepare(encode(original), image_processor, geometry)
    assert np.array_equal(np.asarray(prepared.image), np.asarray(original))


def test_screenshot_pixels_match_too(image_processor, geometry):
    original = screenshot(1366, 768, seed=5)
    data = encode(original)
    assert_same_model_input(image_processor, original, prepare(data, image_processor, geometry))


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(hw=sizes(max_side=1200), seed=st.integers(0, 2**16))
def test_pre_resize_pixels_property(image_processor, geometry, hw, seed):
    height, width = hw
    original = textured(width, height, seed=seed, block=1 + seed % 5)
    data = encode(original, "PNG", compress_level=1)
    assert_same_model_input(
        image_processor, Image.open(io.BytesIO(data)), prepare(data, image_processor, geometry)
    )


def test_pixel_overrides_match_the_processor_called_with_them(image_processor):
    """IMAGE_MIN/MAX_PIXELS reach vLLM's processor as min_pixels/max_pixels: same pixels."""
    for lo, hi in [(QWEN_MIN, 28 * 28 * 256), (28 * 28 * 512, QWEN_MAX * 2)]:
        geo = ImageGeometry(min_pixels=lo, max_pixels=hi)
        for width, height in [(1920, 1080), (300, 170)]:
            original = textured(width, height, seed=lo + width)
            prepared = prepare(encode(original), image_processor, geo)
            assert_same_model_input(
                image_processor, original, prepared, min_pixels=lo, max_pixels=hi
            )


def test_nearly_200_to_1_image_survives_the_pre_resize(image_processor, geometry):
    original = textured(5615, 29, seed=2)
    prepared = prepare(encode(original), image_processor, geometry)
    assert prepared.resized_size == (5628, 28)  # 201:1
    processed(image_processor, original)  # the processor alone is fine with the original
    assert_same_model_input(image_processor, original, prepared)


def test_pre_resize_with_low_max_pixels_gives_the_processors_pixels(image_processor):
    lo, hi = QWEN_MIN, 100_000
    geo = ImageGeometry(min_pixels=lo, max_pixels=hi)
    original = textured(3576, 22, seed=4)
    prepared = prepare(encode(original), image_processor, geo)
    assert prepared.resized_size == (4004, 28)
    assert_same_model_input(image_processor, original, prepared, min_pixels=lo, max_pixels=hi)


def test_comparison_is_sensitive_to_the_resampler(image_processor, geometry):
    """Negative control: Pillow's bicubic (not the processor's) would NOT pass the check above."""
    original = textured(1920, 1080, seed=11)
    prepared = prepare(encode(original), image_processor, geometry)
    wrong = original.resize(prepared.resized_size, Image.Resampling.BICUBIC)
    want, _ = processed(image_processor, original)
    got, _ = processed(image_processor, wrong)
    assert not torch.equal(want, got)
    assert np.asarray(wrong).shape == np.asarray(prepared.image).shape
    assert not np.array_equal(np.asarray(wrong), np.asarray(prepared.image))


def test_pil_backend_processor_gets_its_own_pixels(tiny_model, geometry):
    """A processor on Pillow's backend is matched with Pillow's resize."""
    from transformers import AutoImageProcessor

    pil_processor = AutoImageProcessor.from_pretrained(tiny_model, backend="pil")
    for width, height in [(320, 200), (1920, 1080), (30, 30)]:
        original = textured(width, height, seed=width)
        prepared = prepare(encode(original), pil_processor, geometry)
        assert_same_model_input(pil_processor, original, prepared)


# ---------------------------------------------------------------- modes and formats


def noise(width: int, height: int, channels: int, seed: int = 0) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, np.uint8)


def palette_image() -> Image.Image:
    return Image.fromarray(noise(300, 170, 3, seed=1)).quantize(64)


MODE_CASES = {
    "RGBA-PNG": lambda: encode(Image.fromarray(noise(300, 170, 4), "RGBA"), "PNG"),
    "RGBA-WEBP": lambda: encode(Image.fromarray(noise(300, 170, 4), "RGBA"), "WEBP", lossless=True),
    "RGBA-TIFF": lambda: encode(Image.fromarray(noise(300, 170, 4), "RGBA"), "TIFF"),
    "P-PNG": lambda: encode(palette_image(), "PNG"),
    "P-PNG-transparency": lambda: encode(palette_image(), "PNG", transparency=3),
    "P-GIF": lambda: encode(palette_image(), "GIF"),
    "P-BMP": lambda: encode(palette_image(), "BMP"),
    "LA-PNG": lambda: encode(Image.fromarray(noise(300, 170, 2), "LA"), "PNG"),
    "L-JPEG": lambda: encode(Image.fromarray(noise(300, 170, 1), "L"), "JPEG"),
    "L-PNG": lambda: encode(Image.fromarray(noise(300, 170, 1), "L"), "PNG"),
    "1-PNG": lambda: encode(Image.fromarray(noise(300, 170, 1) > 127), "PNG"),
    "CMYK-JPEG": lambda: encode(Image.fromarray(noise(300, 170, 4), "CMYK"), "JPEG"),
    "CMYK-TIFF": lambda: encode(Image.fromarray(noise(300, 170, 4), "CMYK"), "TIFF"),
    "RGB-JPEG": lambda: encode(Image.fromarray(noise(300, 170, 3)), "JPEG", quality=90),
    "RGB-WEBP": lambda: encode(Image.fromarray(noise(300, 170, 3)), "WEBP", lossless=True),
    "RGB-BMP": lambda: encode(Image.fromarray(noise(300, 170, 3)), "BMP"),
    "RGB-TIFF": lambda: encode(Image.fromarray(noise(300, 170, 3)), "TIFF"),
}


@pytest.mark.parametrize("case", sorted(MODE_CASES))
def test_modes_become_rgb_with_the_processors_pixels(image_processor, geometry, case):
    data = MODE_CASES[case]()
    expected_format = case.split("-")[1]
    prepared = prepare(data, image_processor, geometry)
    assert prepared.format == expected_format
    assert prepared.image.mode == "RGB"
    assert prepared.original_size == (300, 170)
    assert prepared.resized_size == (308, 168)
    # The processor does its own convert("RGB") on the file as PIL opens it.
    assert_same_model_input(image_processor, Image.open(io.BytesIO(data)), prepared)


def gray16() -> np.ndarray:
    rng = np.random.default_rng(16)
    return rng.integers(0, 65536, (170, 300), dtype=np.uint16)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_grayscale_is_scaled_not_clipped(image_processor, geometry, fmt):
    """I;16: the processor's convert("RGB") clips to 255 (a white image); we scale by 1/256.

    So the reference is the processor fed the properly scaled 8-bit image.
    """
    values = gray16()
    data = encode(Image.fromarray(values), fmt)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    img, _ = open_image(data, FIELD, MAX_SOURCE)
    assert img.mode == "RGB" and img.size == (300, 170)
    rgb = np.asarray(img)
    expected = (values >> 8).astype(np.uint8)
    for channel in range(3):
        assert np.array_equal(rgb[..., channel], expected)
    prepared = prepare(data, image_processor, geometry)
    assert prepared.image.mode == "RGB" and prepared.resized_size == (308, 168)
    reference = Image.fromarray(expected, "L").convert("RGB")
    assert_same_model_input(image_processor, reference, prepared)


def test_16bit_big_endian_grayscale_tiff():
    values = gray16()
    img = Image.frombytes("I;16B", (300, 170), values.astype(">u2").tobytes())
    data = encode(img, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I;16B"
    rgb, _ = open_image(data, FIELD, MAX_SOURCE)
    assert np.array_equal(np.asarray(rgb)[..., 0], (values >> 8).astype(np.uint8))


def exif_jpeg(width: int, height: int, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    return encode(screenshot(width, height), "JPEG", quality=95, exif=exif.tobytes())


def test_exif_orientation_is_applied(image_processor, geometry):
    data = exif_jpeg(320, 200, orientation=6)
    assert Image.open(io.BytesIO(data)).size == (320, 200)
    prepared = prepare(data, image_processor, geometry)
    assert prepared.original_size == (200, 320)  # rotated 90 degrees: sides swapped
    new_h, new_w = smart_resize(320, 200, 28, QWEN_MIN, QWEN_MAX)
    assert prepared.resized_size == (new_w, new_h)
    # Orientation 6 = rotate 90 degrees clockwise to display: the top bar ends up on the right.
    rgb = np.asarray(prepared.image).astype(int)
    right, left = rgb[new_h // 2, -2], rgb[new_h // 2, 1]
    assert right[2] > right[0] + 60  # blue bar (40, 90, 160)
    assert left[0] > 200 and left[2] > 200  # light background
    # Same pixels as the processor on the file rotated by Pillow.
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert_same_model_input(image_processor, upright, prepared)


def test_exif_orientation_1_changes_nothing(image_processor, geometry):
    data = exif_jpeg(320, 200, orientation=1)
    assert prepare(data, image_processor, geometry).original_size == (320, 200)


# ---------------------------------------------------------------- decode_inline


# A PNG whose length is not a multiple of 3, so its base64 ends in padding.
PNG_BYTES = next(b for w in range(64, 96) if len(b := encode(screenshot(w, 48))) % 3)


@pytest.mark.parametrize(
    "source",
    [
        "data:image/png;base64," + base64.b64encode(PNG_BYTES).decode(),
        "DATA:IMAGE/PNG;BASE64," + base64.b64encode(PNG_BYTES).decode(),
        "data:image/png;charset=utf-8;name=a.png;base64," + base64.b64encode(PNG_BYTES).decode(),
        "data:;base64," + base64.b64encode(PNG_BYTES).decode(),
        base64.b64encode(PNG_BYTES).decode(),
        base64.b64encode(PNG_BYTES).decode().rstrip("="),
        base64.encodebytes(PNG_BYTES).decode(),  # newline every 76 characters
        base64.encodebytes(PNG_BYTES).decode().replace("\n", "\r\n"),
        "  \n" + base64.b64encode(PNG_BYTES).decode() + "\n  ",
        base64.urlsafe_b64encode(PNG_BYTES).decode(),
        base64.urlsafe_b64encode(PNG_BYTES).decode().rstrip("="),
    ],
    ids=[
        "data-uri",
        "data-uri-upper",
        "data-uri-params",
        "data-uri-no-mime",
        "raw",
        "raw-unpadded",
        "raw-mime-lines",
        "raw-crlf-lines",
        "raw-surrounding-space",
        "urlsafe",
        "urlsafe-unpadded",
    ],
)
def test_decode_inline_forms(source):
    assert decode_inline(source, FIELD, 1 << 20) == PNG_BYTES


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 30, 31, 32])
def test_decode_inline_urlsafe_alphabet(n):
    data = (b"\xfb\xff\xbf" * 11)[:n]
    std, url = base64.b64encode(data).decode(), base64.urlsafe_b64encode(data).decode()
    assert n < 3 or ("+" in std or "/" in std)
    for source in (std, url, std.rstrip("="), url.rstrip("=")):
        assert decode_inline(source, FIELD, 1000) == data


B64 = base64.b64encode(PNG_BYTES).decode()


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("this is not base64!", "neither an http(s) URL, a data: URI nor valid base64"),
        ("ab=cd", "nor valid base64"),
        ("héllo", "nor valid base64"),
        ("abcde", "base64 is invalid"),
        ("file:///etc/passwd", "'file' is not supported"),
        ("ftp://x", "'ftp' is not supported"),
        ("FTP://example.com/a.png", "'ftp' is not supported"),
        ("s3://bucket/key.png", "'s3' is not supported"),
        ("data:text/plain;base64,aGVsbG8=", "media type 'text/plain'"),
        ("data:application/pdf;base64," + B64, "expected image/*"),
        ("data:image/png," + B64, "must be base64-encoded"),
        ("data:image/png;utf8,abc", "must be base64-encoded"),
        ("data:image/png;base64,", "image is empty"),
        ("data:image/png;base64,   ", "image is empty"),
        ("", "image is empty"),
        ("   ", "image is empty"),
    ],
)
def test_decode_inline_errors(source, words):
    with pytest.raises(InvalidInput) as info:
        decode_inline(source, FIELD, 1 << 20)
    assert info.value.field == FIELD
    assert words in info.value.message
    assert info.value.to_dict()["error"]["type"] == "invalid_input"


@pytest.mark.parametrize("size", [11, 12, 100, 10_000])
def test_decode_inline_size_limit(size):
    """Both the pre-decode (encoded length) and post-decode checks name MAX_IMAGE_BYTES."""
    payload = base64.b64encode(b"x" * size).decode()
    with pytest.raises(InvalidInput) as info:
        decode_inline("data:image/png;base64," + payload, FIELD, 10)
    assert info.value.field == FIELD
    assert "MAX_IMAGE_BYTES=10" in info.value.message
    assert decode_inline(base64.b64encode(b"x" * 10).decode(), FIELD, 10) == b"x" * 10


def test_decode_inline_limit_ignores_line_breaks():
    data = bytes(range(256)) * 12  # 3072 bytes
    wrapped = base64.encodebytes(data).decode()
    assert decode_inline(wrapped, FIELD, len(data)) == data


# ---------------------------------------------------------------- open_image / prepare_image errors


def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims this size, with a few bytes of pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def decode_error(data: bytes, image_processor, geometry, **kw) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as info:
        prepare(data, image_processor, geometry, **kw)
    assert info.value.field == FIELD
    assert info.value.to_dict()["error"]["type"] == "image_decode"
    return info.value


def test_random_bytes(image_processor, geometry):
    err = decode_error(np.random.default_rng(1).bytes(4096), image_processor, geometry)
    assert "not a supported image" in err.message
    assert all(fmt in err.message for fmt in ALLOWED_FORMATS)


def test_truncated_png(image_processor, geometry):
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    data = encode(Image.fromarray(noise(200, 200, 3)), "PNG")
    err = decode_error(data[: len(data) // 2], image_processor, geometry)
    assert "truncated or corrupt" in err.message


def test_truncated_jpeg(image_processor, geometry):
    data = encode(Image.fromarray(noise(200, 200, 3)), "JPEG")
    err = decode_error(data[: len(data) // 2], image_processor, geometry)
    assert "truncated or corrupt" in err.message


@pytest.mark.parametrize(
    ("width", "height", "limit"),
    [
        (100_000, 100_000, MAX_SOURCE),  # Pillow's own bomb check fires in Image.open
        (9_000, 8_000, MAX_SOURCE),  # under Pillow's threshold, over ours: our own check
        (8_001, 8_000, MAX_SOURCE),  # just over
    ],
)
def test_pixel_bomb_refused_before_decoding(image_processor, geometry, width, height, limit):
    data = png_header(width, height)
    start = time.perf_counter()
    err = decode_error(data, image_processor, geometry, max_source_pixels=limit)
    assert time.perf_counter() - start < 0.5
    assert f"MAX_IMAGE_SOURCE_PIXELS={limit}" in err.message


def test_pixel_limit_is_exact(image_processor, geometry):
    data = encode(screenshot(100, 50))
    assert prepare(data, image_processor, geometry, max_source_pixels=5000).original_size == (
        100,
        50,
    )
    err = decode_error(data, image_processor, geometry, max_source_pixels=4999)
    assert "100x50 = 5000 pixels" in err.message and "MAX_IMAGE_SOURCE_PIXELS=4999" in err.message


def test_source_pixel_setting_above_pillows_threshold_is_honoured():
    data = png_header(10_000, 9_500)  # 95M pixels
    try:
        open_image(data, FIELD, 200_000_000)
    except ImageDecodeError as exc:
        assert "MAX_IMAGE_SOURCE_PIXELS=200000000" not in exc.message
        assert "truncated or corrupt" in exc.message  # the real problem: no pixel data


def eps_bytes() -> bytes:
    return encode(Image.new("RGB", (10, 10), "red"), "EPS")


def pdf_bytes() -> bytes:
    return encode(Image.new("RGB", (10, 10), "red"), "PDF")


def ico_bytes() -> bytes:
    return encode(Image.new("RGB", (16, 16), "red"), "ICO")


SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'


@pytest.mark.parametrize(
    "make",
    [eps_bytes, pdf_bytes, ico_bytes, lambda: SVG, lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n"],
    ids=["eps", "pdf", "ico", "svg", "ps-header"],
)
def test_formats_outside_the_allowlist_are_refused(image_processor, geometry, make):
    err = decode_error(make(), image_processor, geometry)
    assert "not a supported image" in err.message


def test_pillow_could_read_the_refused_ones():
    """The allowlist is what refuses EPS and ICO, not Pillow's inability to read them."""
    assert Image.open(io.BytesIO(eps_bytes())).format == "EPS"
    assert Image.open(io.BytesIO(ico_bytes())).format == "ICO"


def test_one_pixel_image_is_resized_to_min_pixels(image_processor, geometry):
    data = encode(Image.new("RGB", (1, 1), (200, 10, 30)))
    prepared = prepare(data, image_processor, geometry)
    assert prepared.original_size == (1, 1)
    assert prepared.resized_size == (56, 56)
    assert set(map(tuple, np.asarray(prepared.image).reshape(-1, 3).tolist())) == {(200, 10, 30)}


def test_animated_gif_uses_the_first_frame(image_processor, geometry):
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    data = buf.getvalue()
    src = Image.open(io.BytesIO(data))
    assert getattr(src, "n_frames", 1) == 3
    prepared = prepare(data, image_processor, geometry)
    assert prepared.format == "GIF" and prepared.resized_size == (56, 56)
    assert set(map(tuple, np.asarray(prepared.image).reshape(-1, 3).tolist())) == {(255, 0, 0)}


# ---------------------------------------------------------------- PreparedImage


def test_prepared_image_repr_is_log_safe(image_processor, geometry):
    data = encode(textured(320, 200, seed=9))
    prepared = prepare(data, image_processor, geometry)
    text = repr(prepared)
    digest = hashlib.sha256(data).hexdigest()
    assert prepared.digest == digest[:16]
    assert f"sha256:{digest[:16]}" in text
    assert "320x200" in text and "308x196" in text and "PNG" in text
    assert str(len(data)) in text
    assert len(text) < 120
    b64 = base64.b64encode(data).decode()
    for probe in (b64[:12], b64[40:52], "iVBOR", "\\x89PNG", "<PIL"):
        assert probe not in text
    assert str(prepared) == text
    assert prepared.describe() == {
        "original_size": [320, 200],
        "resized_size": [308, 196],
        "format": "PNG",
        "bytes": len(data),
    }


# ---------------------------------------------------------------- the libpng fast path


def png_chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


_PNG_RGB = 2  # IHDR colour type


def raw_png(
    rows: np.ndarray, color_type: int, bit_depth: int = 8, before_idat=(), after_idat=()
) -> bytes:
    """A PNG written by hand (filter 0 on every row), for what Pillow cannot save."""
    height, width = rows.shape[:2]
    data = rows.astype(">u2").tobytes() if bit_depth == 16 else rows.astype(np.uint8).tobytes()
    stride = len(data) // height
    scan = b"".join(b"\x00" + data[y * stride : (y + 1) * stride] for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + b"".join(png_chunk(k, v) for k, v in before_idat)
        + png_chunk(b"IDAT", zlib.compress(scan))
        + b"".join(png_chunk(k, v) for k, v in after_idat)
        + png_chunk(b"IEND", b"")
    )


def pillow_rgb(data: bytes) -> np.ndarray:
    """What vLLM's own loader makes of the file: Pillow, then the processor's RGB rule."""
    from transformers.image_transforms import convert_to_rgb

    return np.asarray(convert_to_rgb(Image.open(io.BytesIO(data))))


def fast_pixels(data: bytes):
    from vlm_worker.media.images import png_pixels, read_header

    return png_pixels(read_header(data, FIELD, MAX_SOURCE), data)


FAST_PNGS = {
    "RGB": lambda: encode(textured(333, 211, seed=8)),
    "RGB-level9": lambda: encode(textured(640, 360, seed=9), "PNG", compress_level=9),
    "RGBA": lambda: encode(Image.fromarray(noise(300, 170, 4, seed=3)), "PNG"),
    "RGB-gAMA-sRGB-iCCP": lambda: raw_png(
        noise(120, 90, 3, seed=4),
        _PNG_RGB,
        before_idat=[
            (b"gAMA", struct.pack(">I", 45455)),
            (b"sRGB", b"\x00"),
            (b"iCCP", b"p\x00\x00" + zlib.compress(b"not really a profile")),
        ],
    ),
    "RGB-hand-written": lambda: raw_png(noise(64, 48, 3, seed=5), _PNG_RGB),
}


@pytest.mark.parametrize("case", sorted(FAST_PNGS))
def test_plain_pngs_are_decoded_by_libpng_with_pillows_pixels(image_processor, geometry, case):
    data = FAST_PNGS[case]()
    fast = fast_pixels(data)
    assert fast is not None, "this PNG should take the libpng path"
    assert fast.dtype == torch.uint8 and fast.shape[0] in (3, 4)
    from vlm_worker.media.images import decode_pixels

    pixels, fmt = decode_pixels(data, FIELD, MAX_SOURCE)
    assert fmt == "PNG"
    got = (
        pixels.permute(1, 2, 0).numpy() if isinstance(pixels, torch.Tensor) else np.asarray(pixels)
    )
    assert np.array_equal(got, pillow_rgb(data))
    assert_same_model_input(
        image_processor, Image.open(io.BytesIO(data)), prepare(data, image_processor, geometry)
    )


def exif_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def test_png_chunks_are_read_from_their_headers():
    from vlm_worker.media.images import _png_chunks

    data = raw_png(
        noise(64, 48, 3, seed=6), _PNG_RGB, before_idat=[(b"tEXt", b"k\x00eXIf in text")]
    )
    assert _png_chunks(data) == {b"IHDR", b"tEXt", b"IDAT", b"IEND"}
    assert _png_chunks(data[:40]) == {b"IHDR"}  # truncated: what is there
    assert fast_pixels(data) is not None  # the name inside a chunk's data is no chunk


def exif_png(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(screenshot(320, 200), "PNG", exif=exif.tobytes())


XMP_ORIENTATION_6 = (
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/'
    '22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
    'tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
)


def text_chunk_png(kind: str, keyword: str, orientation: int = 6) -> bytes:
    """A plain RGB PNG whose orientation sits in a text chunk, where Pillow reads it."""
    from PIL import PngImagePlugin

    exif = exif_orientation(orientation)
    value = (
        XMP_ORIENTATION_6
        if keyword == "XML:com.adobe.xmp"
        else f"\nexif\n{len(exif):8d}\n{exif.hex()}\n"  # ImageMagick's raw profile
    )
    info = PngImagePlugin.PngInfo()
    if kind == "iTXt":
        info.add_itxt(keyword, value)
    else:
        info.add_text(keyword, value, zip=kind == "zTXt")
    return encode(Image.fromarray(noise(64, 48, 3, seed=9)), "PNG", pnginfo=info)


def bad_idat_crc() -> bytes:
    data = bytearray(encode(textured(200, 120, seed=6)))
    at = data.index(b"IDAT")
    length = struct.unpack(">I", data[at - 4 : at])[0]
    data[at + 4 + length] ^= 0xFF  # first byte of the IDAT chunk's CRC
    return bytes(data)


def apng() -> bytes:
    frames = [screenshot(200, 120, seed=s) for s in (0, 20)]
    return encode(frames[0], "PNG", save_all=True, append_images=frames[1:])


PILLOW_PNGS = {
    "palette": lambda: encode(palette_image(), "PNG"),
    "RGB-tRNS": lambda: encode(
        Image.fromarray(noise(120, 90, 3, seed=2)), "PNG", transparency=(1, 2, 3)
    ),
    "RGB-16bit": lambda: raw_png(
        np.random.default_rng(7).integers(0, 65536, (40, 50, 3)), _PNG_RGB, bit_depth=16
    ),
    "grey": lambda: encode(Image.fromarray(noise(120, 90, 1)), "PNG"),
    "grey-alpha": lambda: encode(Image.fromarray(noise(120, 90, 2), "LA"), "PNG"),
    "eXIf": lambda: exif_png(6),
    "eXIf-after-IDAT": lambda: raw_png(
        noise(64, 48, 3, seed=6), _PNG_RGB, after_idat=[(b"eXIf", exif_orientation(1))]
    ),
    "animated": apng,
    "bad-IDAT-CRC": bad_idat_crc,
    "XMP-in-iTXt": lambda: text_chunk_png("iTXt", "XML:com.adobe.xmp"),
    "XMP-in-tEXt": lambda: text_chunk_png("tEXt", "XML:com.adobe.xmp"),
    "raw-EXIF-in-tEXt": lambda: text_chunk_png("tEXt", "Raw profile type exif"),
    "raw-EXIF-in-zTXt": lambda: text_chunk_png("zTXt", "Raw profile type exif"),
    "raw-EXIF-in-iTXt": lambda: text_chunk_png("iTXt", "Raw profile type exif"),
}


@pytest.mark.parametrize("case", sorted(PILLOW_PNGS))
def test_other_pngs_stay_with_pillow(image_processor, geometry, case):
    """Kinds where the two decoders could disagree, or where Pillow applies something
    (an orientation, a first frame) that libpng would not: Pillow decodes them, as before."""
    data = PILLOW_PNGS[case]()
    assert Image.open(io.BytesIO(data)).format == "PNG"
    assert fast_pixels(data) is None
    prepared = prepare(data, image_processor, geometry)
    reference = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert_same_model_input(image_processor, reference, prepared)


def test_png_orientation_is_still_applied(image_processor, geometry):
    prepared = prepare(exif_png(6), image_processor, geometry)
    assert prepared.original_size == (200, 320)


@pytest.mark.parametrize("case", [c for c in sorted(PILLOW_PNGS) if "-in-" in c])
def test_an_orientation_in_any_chunk_pillow_reads_is_applied(case):
    """Either decoder gives the same upright picture: such PNGs go to Pillow, which turns
    them; libpng's pixels turned the same way are what Pillow gives."""
    from torchvision.io import ImageReadMode, decode_png

    data = PILLOW_PNGS[case]()
    pixels, _ = decode_pixels(data, FIELD, MAX_SOURCE)
    assert pixel_size(pixels) == (48, 64)  # turned: 64x48 stored, orientation 6
    raw = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB)
    # libpng's pixels, turned as orientation 6 says (90 degrees clockwise)
    libpng_turned = Image.fromarray(raw.permute(1, 2, 0).numpy()).transpose(
        Image.Transpose.ROTATE_270
    )
    assert np.array_equal(np.asarray(as_pil(pixels)), np.asarray(libpng_turned))


def test_other_text_chunks_keep_the_fast_path():
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "gnome-screenshot")
    info.add_itxt("Comment", 'tiff:Orientation="6" mentioned, not an XMP packet')
    data = encode(Image.fromarray(noise(64, 48, 3, seed=9)), "PNG", pnginfo=info)
    assert fast_pixels(data) is not None


def test_truncated_plain_png_is_refused_by_name(image_processor, geometry):
    """libpng refuses it, then Pillow does too, with the worker's own message."""
    data = encode(textured(300, 200, seed=1))
    assert fast_pixels(data) is not None
    err = decode_error(data[: len(data) - 40], image_processor, geometry)
    assert "truncated or corrupt" in err.message


def test_4k_screenshot_takes_the_fast_path_and_keeps_the_processors_pixels(
    image_processor, geometry
):
    from benchmarks.bench import screenshot_png

    data = screenshot_png(3840, 2160, seed=200)
    assert fast_pixels(data) is not None
    prepared = prepare(data, image_processor, geometry)
    assert prepared.resized_size == (1316, 728)
    assert_same_model_input(image_processor, Image.open(io.BytesIO(data)), prepared)


# ----------------------------------------------- declared work beyond the file's size
def tiled_tiff(width: int, height: int, tile_w: int, tile_h: int, data: int = 16) -> bytes:
    """A minimal little-endian grey TIFF with one tile of the given size and ``data``
    bytes of tile data (a bomb's header promises far more than it carries)."""
    entries = [
        (256, 3, width), (257, 3, height), (258, 3, 8), (259, 3, 1), (262, 3, 1),
        (277, 3, 1), (322, 4, tile_w), (323, 4, tile_h), (324, 4, 0), (325, 4, data),
    ]  # fmt: skip
    data_at = 8 + 2 + len(entries) * 12 + 4
    out = b"II*\x00" + struct.pack("<IH", 8, len(entries))
    for tag, kind, value in entries:
        value = data_at if tag == 324 else value
        out += (
            struct.pack("<HHIHH", tag, kind, 1, value, 0)
            if kind == 3
            else struct.pack("<HHII", tag, kind, 1, value)
        )
    return out + struct.pack("<I", 0) + bytes(data)


def test_a_tiff_whose_tile_dwarfs_the_image_is_refused_before_decoding():
    import psutil

    rss = psutil.Process().memory_info().rss
    started = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="TIFF tiles are 32768x32768 for a 16x16 image"):
        decode_pixels(tiled_tiff(16, 16, 32768, 32768), FIELD, MAX_SOURCE)
    assert time.perf_counter() - started < 0.1
    # the decoder would have allocated the 1 GB tile; nothing like it was
    assert psutil.Process().memory_info().rss - rss < 64 << 20
    # an ordinary tiled TIFF (256x256 tiles over a small image) is read as before
    pixels, fmt = decode_pixels(tiled_tiff(16, 16, 256, 256, 256 * 256), FIELD, MAX_SOURCE)
    assert fmt == "TIFF" and pixel_size(pixels) == (16, 16)


def test_a_jpeg_with_thousands_of_scans_is_refused_before_decoding():
    progressive = encode(textured(64, 64, seed=3), "JPEG", progressive=True)
    assert 1 < progressive.count(b"\xff\xda") <= 64
    decode_pixels(progressive, FIELD, MAX_SOURCE)  # a real progressive JPEG decodes
    empty_scan = b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00"
    bomb = progressive[:-2] + empty_scan * 2000 + b"\xff\xd9"
    started = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="JPEG has 2010 scans, above the 64"):
        decode_pixels(bomb, FIELD, MAX_SOURCE)
    assert time.perf_counter() - started < 0.05
