"""Each GUI family's answer formats, parsed into a point or a box in the model's own space.

The formats are the ones the families' model cards and reference code document (sources
in ``docs/decisions/0009-grounding-conventions.md``): GTA1's ``(x,y)``, Qwen's JSON
``{"bbox_2d": [...]}`` / ``{"point_2d": [...]}`` (and Qwen2.5-VL's XML ``<points x1 y1>``),
UI-TARS's ``click(start_box='(x,y)')`` and ``<point>x y</point>``, OpenCUA's
``pyautogui.click(x=…, y=…)``. Each parser takes the first match, as the references do,
and falls back to the generic point forms, so an answer in a neighbouring family's format
still yields a point. Numbers stay in the space the model answered in; mapping to pixels
is ``prompt.grounding``'s job.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

Number = int | float
Point = tuple[Number, Number]
Box = tuple[Number, Number, Number, Number]

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
NUM = r"(?<![\w.])[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_PAIR = re.compile(
    rf"[(\[]\s*(?P<x>{NUM})\s*,\s*(?P<y>{NUM})\s*[)\]]"
    rf"|(?<![A-Za-z])x\s*[=:]\s*(?P<lx>{NUM})\s*[,;]?\s*(?<![A-Za-z])y\s*[=:]\s*(?P<ly>{NUM})",
    re.IGNORECASE,
)
_BARE = re.compile(rf"^\s*(?P<x>{NUM})\s*,\s*(?P<y>{NUM})\s*$")
_QUAD = rf"\s*({NUM})\s*,\s*({NUM})\s*,\s*({NUM})\s*,\s*({NUM})\s*"
_JSON_BOX = re.compile(rf'"bbox_2d"\s*:\s*\[{_QUAD}\]')
_JSON_POINT = re.compile(rf'"point_2d"\s*:\s*\[\s*({NUM})\s*,\s*({NUM})\s*\]')
_XML_POINT = re.compile(rf'<points?\b[^>]*?\bx1?\s*=\s*"({NUM})"[^>]*?\by1?\s*=\s*"({NUM})"')
_TARS_BOX = re.compile(
    rf"(?:start_box|point)\s*=\s*['\"]\s*(?:<\|box_start\|>)?\s*\({_QUAD}\)", re.IGNORECASE
)
_TARS_PAIR = re.compile(
    rf"(?:start_box|point)\s*=\s*['\"]\s*(?:<\|box_start\|>)?\s*\(\s*({NUM})\s*,\s*({NUM})\s*\)",
    re.IGNORECASE,
)
_TARS_POINT = re.compile(rf"<point>\s*({NUM})\s*[ ,]\s*({NUM})\s*</point>")
_PYAUTOGUI = re.compile(rf"pyautogui\.\w+\(\s*x\s*=\s*({NUM})\s*,\s*y\s*=\s*({NUM})", re.IGNORECASE)
_TUPLE_BOX = re.compile(rf"[(\[]{_QUAD}[)\]]")


@dataclass(frozen=True)
class Answer:
    """What the model said: a point, or a box (whose centre is the point)."""

    point: Point
    box: Box | None = None

    @classmethod
    def of_box(cls, box: Box) -> Answer:
        x1, y1, x2, y2 = box
        return cls(((x1 + x2) / 2, (y1 + y2) / 2), box)


def number(text: str) -> Number | None:
    """An int when the text is one (and exactly representable), else a float; None if
    it does not fit a float. ``int(value)``, not ``int(text)``: Python refuses to convert
    integer strings of thousands of digits."""
    value = float(text)
    if not math.isfinite(value):
        return None
    if "." not in text and abs(value) < 2**53:
        return int(value)
    return value


def _numbers(groups: tuple[str, ...]) -> tuple[Number, ...] | None:
    values = tuple(number(g) for g in groups)
    return None if any(v is None for v in values) else values  # type: ignore[return-value]


def _first(pattern: re.Pattern[str], text: str) -> tuple[Number, ...] | None:
    for match in pattern.finditer(text):
        values = _numbers(match.groups())
        if values is not None:
            return values
    return None


def parse_point(text: str) -> Point | None:
    """The first plain point in an answer; None if none.

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
        x, y = number(xs), number(ys)
        if x is not None and y is not None:
            return (x, y)
    return None


def _point_answer(values: tuple[Number, ...] | None) -> Answer | None:
    return None if values is None else Answer((values[0], values[1]))


def _box_answer(values: tuple[Number, ...] | None) -> Answer | None:
    return None if values is None else Answer.of_box(values)  # type: ignore[arg-type]


def parse_pair(text: str) -> Answer | None:
    """GTA1 and UI-TARS v1: ``(x,y)`` (and the generic point forms); v1's ``(x1,y1,x2,y2)``
    box as its centre only where no point is given."""
    point = parse_point(text)
    if point is not None:
        return Answer(point)
    return _box_answer(_first(_TUPLE_BOX, text.translate(_NORMALIZE)))


def parse_qwen_json(text: str) -> Answer | None:
    """Qwen2.5-VL / Qwen3-VL: ``"bbox_2d": [x1, y1, x2, y2]`` or ``"point_2d": [x, y]``,
    whichever comes first; Qwen2.5-VL's XML ``<points x1="…" y1="…">``; then plain points."""
    normalized = text.translate(_NORMALIZE)
    found: list[tuple[int, Answer]] = []
    for pattern, make in ((_JSON_BOX, _box_answer), (_JSON_POINT, _point_answer)):
        for match in pattern.finditer(normalized):
            answer = make(_numbers(match.groups()))
            if answer is not None:
                found.append((match.start(), answer))
                break
    if found:
        return min(found, key=lambda item: item[0])[1]
    xml = _point_answer(_first(_XML_POINT, normalized))
    return xml if xml is not None else parse_pair(normalized)


def parse_ui_tars(text: str) -> Answer | None:
    """UI-TARS-1.5: ``click(start_box='(x,y)')`` (``<|box_start|>`` kept or stripped), a
    ``(x1,y1,x2,y2)`` start box, ``<point>x y</point>``; then plain points."""
    normalized = text.translate(_NORMALIZE)
    for pattern, make in (
        (_TARS_PAIR, _point_answer),
        (_TARS_BOX, _box_answer),
        (_TARS_POINT, _point_answer),
    ):
        answer = make(_first(pattern, normalized))
        if answer is not None:
            return answer
    return parse_pair(normalized)


def parse_pyautogui(text: str) -> Answer | None:
    """OpenCUA: the first ``pyautogui.<verb>(x=…, y=…)``; then plain points."""
    normalized = text.translate(_NORMALIZE)
    answer = _point_answer(_first(_PYAUTOGUI, normalized))
    return answer if answer is not None else parse_pair(normalized)


#: The parsers by answer format name (``GroundingStyle.answer``).
PARSERS: dict[str, Callable[[str], Answer | None]] = {
    "pair": parse_pair,
    "qwen-json": parse_qwen_json,
    "ui-tars": parse_ui_tars,
    "pyautogui": parse_pyautogui,
}
