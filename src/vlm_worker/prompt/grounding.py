"""GUI grounding (GTA1-style): the system prompt, the answer parser, the way back to pixels.

GTA1 and its relatives (Qwen2.5-VL / OpenCUA based) locate a UI element in a screenshot and
answer with one point ``(x,y)`` in the pixel space of the image *as the model saw it*, i.e.
after ``smart_resize``. Clients get this wrong in three classic ways: stating the original
size in the prompt, re-implementing ``smart_resize`` with different rounding, and mapping
the point back with width and height swapped. The worker does all three itself:

* the prompt states the size the worker actually resized to (the processor is told the
  same bounds, so it does not resize again);
* the answer is parsed tolerantly (see ``parse_point``);
* the point is mapped back to the original image and clamped into it.

Everything here is pure (no engine, no I/O) so every rule is tested directly. Sizes are
``(width, height)`` and points ``(x, y)`` throughout, as in the job's output.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

from vlm_worker.media.geometry import ImageGeometry

#: GTA1's own system prompt, with the resized height and width filled in per image.
GTA1_SYSTEM_PROMPT = (
    "You are an expert UI element locator. Given a GUI image and a user's element "
    "description, provide the coordinates of the specified element as a single (x,y) point. "
    "The image resolution is height {height} and width {width}. For elements with area, "
    "return the center point. Output the coordinate pair exactly: (x,y)"
)

#: GTA1's resize recipe (Qwen2.5-VL's processor defaults): 4 to 16384 image tokens.
GTA1_MIN_PIXELS = 3136
GTA1_MAX_PIXELS = 12_845_056

Number = int | float
Point = tuple[Number, Number]
Size = tuple[int, int]


# --------------------------------------------------------------------------- prompt
def system_prompt(resized_size: Size, template: str | None = None) -> str:
    """The system message for one image of ``resized_size`` (width, height).

    Only the literal ``{height}`` and ``{width}`` are replaced (not ``str.format``), so a
    custom prompt may contain other braces, JSON examples say, without escaping them.
    """
    width, height = resized_size
    text = GTA1_SYSTEM_PROMPT if template is None else template
    return text.replace("{height}", str(height)).replace("{width}", str(width))


def grounding_messages(system: str, instruction: str) -> list[dict[str, Any]]:
    """GTA1's conversation, in the shape HF chat templates take: image first, then text."""
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]},
    ]


# --------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class GroundingBounds:
    """The resize bounds grounding jobs use, and why they differ from the settings, if so."""

    geometry: ImageGeometry
    note: str | None = None

    def processor_kwargs(self) -> dict[str, int]:
        """Per-request ``mm_processor_kwargs``: vLLM's processor re-applies ``smart_resize``
        with its own bounds; handing it ours makes it keep the pre-resized image as is."""
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


# --------------------------------------------------------------------------- parsing
# Characters models (and tokenizers' byte fallbacks) produce for the ASCII ones we parse:
# minus signs and dashes, full-width brackets and commas, full-width digits.
_NORMALIZE = str.maketrans(
    {
        "\u2212": "-",  # minus sign
        "\u2010": "-",  # hyphen
        "\u2011": "-",  # non-breaking hyphen
        "\u2013": "-",  # en dash
        "\ufe63": "-",  # small hyphen-minus
        "\uff0d": "-",  # full-width hyphen-minus
        "\uff08": "(",
        "\uff09": ")",
        "\uff3b": "[",
        "\uff3d": "]",
        "\uff0c": ",",
        "\u3001": ",",  # ideographic comma
        **{chr(0xFF10 + d): str(d) for d in range(10)},
    }
)

# A number: optional sign, digits with an optional fraction, or a bare fraction (".5").
# The look-behind keeps "v1.2.3" or "a12" from yielding a number that starts mid-token.
_NUM = r"(?<![\w.])[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_PAIR = re.compile(
    rf"[(\[]\s*(?P<x>{_NUM})\s*,\s*(?P<y>{_NUM})\s*[)\]]"
    rf"|(?<![A-Za-z])x\s*[=:]\s*(?P<lx>{_NUM})\s*[,;]?\s*(?<![A-Za-z])y\s*[=:]\s*(?P<ly>{_NUM})",
    re.IGNORECASE,
)
_BARE = re.compile(rf"^\s*(?P<x>{_NUM})\s*,\s*(?P<y>{_NUM})\s*$")


def _number(text: str) -> Number | None:
    """An int when the text is one (and exactly representable), else a float; None if
    it does not fit a float. ``int(value)``, not ``int(text)``: Python refuses to convert
    integer strings of thousands of digits."""
    value = float(text)
    if not math.isfinite(value):
        return None
    if "." not in text and abs(value) < 2**53:
        return int(value)
    return value


def parse_point(text: str) -> Point | None:
    """The first point in a model's answer, in the resized image's pixels; None if none.

    Accepted, anywhere in the text (so "The element is at (12.5,7)." works):

    * ``(x, y)`` or ``[x, y]``, ints or floats, signed, any spacing: ``(523,118)``,
      ``[(100, 200)]``, ``( -5 , 10 )``, ``(.5, 3.)``;
    * labelled ``x=3, y=4`` / ``x: 3 y: 4`` (pyautogui-style ``click(x=3, y=4)``).

    and, only as the whole answer, a bare pair ``523, 118``. Unicode minus signs, dashes
    and full-width brackets, commas and digits count as their ASCII forms.

    Not points: boxes (``(1, 2, 3, 4)``), a lone number, non-finite values. When the text
    holds several points the **first** wins, as in GTA1's reference parser: the model is
    trained to answer with exactly one, and a later one is more often a second element
    being mentioned than a correction.
    """
    normalized = text.translate(_NORMALIZE)
    matches = [
        (m["x"], m["y"]) if m["x"] is not None else (m["lx"], m["ly"])
        for m in _PAIR.finditer(normalized)
    ]
    bare = _BARE.match(normalized)
    if bare:
        matches.append((bare["x"], bare["y"]))
    for xs, ys in matches:
        x, y = _number(xs), _number(ys)
        if x is not None and y is not None:
            return (x, y)
    return None


# --------------------------------------------------------------------------- result
def grounding_result(
    text: str,
    original_size: Size,
    resized_size: Size,
    finish_reason: str | None = None,
) -> dict[str, Any]:
    """The final chunk's ``grounding`` object for the model's whole answer ``text``.

    ``point`` is in the original image's pixels (clamped), ``point_resized`` is what the
    model said; when the answer holds no point both are null and ``reason`` says why.
    """
    out: dict[str, Any] = {
        "point": None,
        "point_resized": None,
        "clamped": False,
        "original_size": list(original_size),
        "resized_size": list(resized_size),
        "raw_text": text,
    }
    point = parse_point(text)
    if point is None:
        if not text.strip():
            reason = "the model's answer is empty"
        else:
            reason = "no (x, y) point found in the model's answer"
        if finish_reason == "length":
            reason += " (generation stopped at max_tokens)"
        out["reason"] = reason
        return out
    mapped, clamped = to_original(point, resized_size, original_size)
    out["point"] = list(mapped)
    out["point_resized"] = list(point)
    out["clamped"] = clamped
    return out
