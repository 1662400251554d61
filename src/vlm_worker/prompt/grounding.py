"""GUI grounding: resize bounds, the way back to the original image's pixels, the result.

GUI models locate a UI element in a screenshot and answer in a space of their own: pixels
of the image *as the model saw it* (after ``smart_resize``), or 0-1000 / 0-1 relative to
the image. Clients get this wrong in classic ways: stating the original size in the
prompt, re-implementing ``smart_resize`` with different rounding, reading a relative
answer as pixels, swapping width and height. The worker does all of it itself, per the
family's convention (``grounding_styles``): the prompt states the size the worker really
resized to (the processor is told the same bounds, so it does not resize again), the
answer is parsed in the family's format (``grounding_answers``), and the point (and box)
mapped back to the original image and clamped into it.

Everything here is pure (no engine, no I/O) so every rule is tested directly. Sizes are
``(width, height)`` and points ``(x, y)`` throughout, as in the job's output.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from vlm_worker.media.geometry import ImageGeometry
from vlm_worker.prompt.grounding_answers import PARSERS, Answer, Point
from vlm_worker.prompt.grounding_styles import STYLES, GroundingStyle

Size = tuple[int, int]


# --------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class GroundingBounds:
    """The resize bounds grounding jobs use, and why they differ from the settings, if so."""

    geometry: ImageGeometry
    note: str | None = None

    def processor_kwargs(self) -> dict[str, int]:
        """Per-request ``mm_processor_kwargs``: vLLM's processor re-applies ``smart_resize``
        with its own bounds; handing it ours makes it keep the pre-resized image as is.
        The runner sends them only where the engine's own bounds would not."""
        return {"min_pixels": self.geometry.min_pixels, "max_pixels": self.geometry.max_pixels}


def grounding_bounds(
    base: ImageGeometry,
    min_pixels: int,
    max_pixels: int,
    max_image_tokens: int | None = None,
) -> GroundingBounds:
    """The processor's patch geometry with GTA1's area bounds, capped to what the engine takes.

    vLLM refuses an image with more tokens than its encoder cache holds (sized at start from
    the largest image its *default* processor bounds allow, or MAX_NUM_BATCHED_TOKENS if
    larger). Capping ``max_pixels`` at ``max_image_tokens * factor**2`` keeps grounding jobs
    working on such an engine: the prompt still states the size the model really sees, so
    the point maps back correctly; only the resolution is lower than GTA1's recipe.
    """
    note = None
    if max_image_tokens is not None and max_image_tokens > 0:
        cap = max_image_tokens * base.factor * base.factor
        if max_pixels > cap:
            note = (
                f"GROUNDING_MAX_PIXELS={max_pixels} is above what the engine's encoder cache "
                f"takes ({max_image_tokens} image tokens = {cap} pixels); grounding images are "
                f"resized to at most {cap} pixels. Raise MAX_NUM_BATCHED_TOKENS (or unset "
                f"IMAGE_MAX_PIXELS) to use the full size."
            )
            max_pixels = cap
    min_pixels = min(min_pixels, max_pixels)
    return GroundingBounds(replace(base, min_pixels=min_pixels, max_pixels=max_pixels), note)


def to_original(point: Point, resized_size: Size, original_size: Size) -> tuple[Point, bool]:
    """A point in the resized image's pixels → the original's, clamped; and whether clamped.

    x scales by W_orig / W_resized and y by H_orig / H_resized (the two differ slightly,
    since each side is rounded to a multiple of 28 on its own). The result is clamped to
    ``0 ≤ x ≤ W_orig - 1``, ``0 ≤ y ≤ H_orig - 1`` (a pixel of the image) and rounded to
    hundredths of a pixel: finer digits mean nothing and only make JSON noisy.
    """
    (rw, rh), (ow, oh) = resized_size, original_size
    x = point[0] * ow / rw
    y = point[1] * oh / rh
    cx = min(max(x, 0.0), ow - 1)
    cy = min(max(y, 0.0), oh - 1)
    # + 0.0 turns -0.0 (from "(-0, 5)") into 0.0.
    return (round(cx, 2) + 0.0, round(cy, 2) + 0.0), (cx != x or cy != y)


def to_resized(point: Point, original_size: Size, resized_size: Size) -> tuple[float, float]:
    """The inverse of ``to_original`` (without clamping): original pixels → resized pixels."""
    (ow, oh), (rw, rh) = original_size, resized_size
    return point[0] * rw / ow, point[1] * rh / oh


# --------------------------------------------------------------------------- result
def to_pixels(
    point: Point, space: str, resized_size: Size, original_size: Size
) -> tuple[Point, bool]:
    """A point in the model's ``space`` → the original image's pixels, clamped; and
    whether clamping moved it. Relative answers are fractions of the image itself, so
    they scale by the original size directly (Qwen3-VL's maintainers: "normalize by the
    original width and height"); absolute ones through the resized size."""
    if space == "absolute":
        return to_original(point, resized_size, original_size)
    scale = 1000.0 if space == "relative-1000" else 1.0
    ow, oh = original_size
    absolute = (point[0] * ow / scale, point[1] * oh / scale)
    return to_original(absolute, original_size, original_size)


def to_model_pixels(point: Point, space: str, resized_size: Size) -> tuple[float, float]:
    """A point in the model's ``space`` → pixels of the resized image (``point_resized``)."""
    if space == "absolute":
        return point
    scale = 1000.0 if space == "relative-1000" else 1.0
    rw, rh = resized_size
    return (point[0] * rw / scale, point[1] * rh / scale)


def grounding_result(
    text: str,
    original_size: Size,
    resized_size: Size,
    finish_reason: str | None = None,
    style: GroundingStyle | None = None,
) -> dict[str, Any]:
    """The final chunk's ``grounding`` object for the model's whole answer ``text``.

    ``point`` (and ``box``, where the model answered with one; its centre is the point)
    are in the original image's pixels, clamped; ``model_point`` / ``model_box`` are what
    the model said, in ``space``; ``point_resized`` is the point in the resized image's
    pixels. When the answer holds no point they are null and ``reason`` says why.
    """
    style = style or STYLES["gta1"]
    out: dict[str, Any] = {
        "point": None,
        "box": None,
        "point_resized": None,
        "clamped": False,
        "model_point": None,
        "model_box": None,
        "space": style.space,
        "style": style.name,
        "original_size": list(original_size),
        "resized_size": list(resized_size),
        "raw_text": text,
    }
    answer: Answer | None = PARSERS[style.answer](text)
    if answer is None:
        if not text.strip():
            reason = "the model's answer is empty"
        else:
            reason = f"no point found in the model's answer ({style.name} format)"
        if finish_reason == "length":
            reason += " (generation stopped at max_tokens)"
        out["reason"] = reason
        return out
    point, clamped = to_pixels(answer.point, style.space, resized_size, original_size)
    out["point"] = list(point)
    out["point_resized"] = [
        round(v, 2) + 0.0 for v in to_model_pixels(answer.point, style.space, resized_size)
    ]
    out["model_point"] = list(answer.point)
    out["clamped"] = clamped
    if answer.box is not None:
        x1, y1, x2, y2 = answer.box
        (a, b), c1 = to_pixels((x1, y1), style.space, resized_size, original_size)
        (c, d), c2 = to_pixels((x2, y2), style.space, resized_size, original_size)
        out["box"] = [a, b, c, d]
        out["model_box"] = list(answer.box)
        out["clamped"] = clamped or c1 or c2
    return out
