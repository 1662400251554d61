"""The grounding conventions of the GUI model families: prompt, answer, space, resize.

A serving layer that gets any of these wrong costs a model points of accuracy it was
trained for: the wrong coordinate space, other resize bounds, a prompt not word for word
the one it was trained with. Each family's values are read from its own model card or
reference inference code (sources and quotes: ``docs/decisions/0009-grounding-conventions.md``);
tests render each family's reference recipe independently and compare.

The convention is chosen once at start from the served model (architecture and name),
``GROUNDING_STYLE`` overriding; an unknown model gets GTA1's, as before conventions existed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

Space = Literal["absolute", "relative-1000", "relative-1"]
SPACES: tuple[str, ...] = ("absolute", "relative-1000", "relative-1")

#: Digits of a coordinate in each space, for the constrained-decoding grammars: pixels of
#: the resized image (at most 5 digits), or 0..1000, or 0..1 with up to 4 decimals.
_COORD = {
    "absolute": r"\d{1,5}",
    "relative-1000": r"(?:1000|\d{1,3})",
    "relative-1": r"(?:0(?:\.\d{1,4})?|1(?:\.0{1,4})?)",
}


@dataclass(frozen=True)
class GroundingStyle:
    """One family's grounding convention."""

    name: str
    #: The system message; ``{width}`` and ``{height}`` become the resized size. None: the
    #: chat template's own default (no system message is sent).
    system: str | None
    #: The user's text; ``{instruction}`` becomes the element description.
    user: str
    #: Whether the image comes before the text in the user message.
    image_first: bool
    #: The answer format (``grounding_answers.PARSERS``).
    answer: str
    space: Space
    #: Resize bounds of the family's reference; None: the served processor's own.
    min_pixels: int | None
    max_pixels: int | None
    #: How the reference resizes: "processor" (the processor's own resampler, as when the
    #: processor resizes) or "pillow" (``Image.resize`` bicubic before the processor, as
    #: GTA1's inference code does).
    resample: Literal["processor", "pillow"]
    #: The answer grammar for constrained decoding, with ``{c}`` for one coordinate.
    grammar: str

    def with_space(self, space: Space) -> GroundingStyle:
        return replace(self, space=space)

    def answer_regex(self) -> str:
        """The regex vLLM's structured outputs decode under (``constrain: true``)."""
        return self.grammar.replace("{c}", _COORD[self.space])

    def longest_answer(self) -> int:
        """Characters in the longest answer the grammar allows: a constrained job needs
        at least that many tokens (plus the end) or its answer is cut off unparseable."""
        widest = {"absolute": "99999", "relative-1000": "1000", "relative-1": "0.0000"}
        return len(self.grammar.replace("\\", "").replace("{c}", widest[self.space]))

    def system_text(self, resized_size: tuple[int, int], template: str | None = None) -> str | None:
        """The system message for an image of ``resized_size``; ``template`` (the job's
        ``system_prompt``) replaces the family's. Only the literal ``{width}`` and
        ``{height}`` are replaced, so a custom prompt may hold other braces."""
        text = self.system if template is None else template
        if text is None:
            return None
        width, height = resized_size
        return text.replace("{height}", str(height)).replace("{width}", str(width))

    def messages(
        self, resized_size: tuple[int, int], instruction: str, system_prompt: str | None = None
    ) -> list[dict[str, Any]]:
        """The reference conversation, in the shape HF chat templates take."""
        text = {"type": "text", "text": self.user.replace("{instruction}", instruction)}
        image = {"type": "image"}
        user = {"role": "user", "content": [image, text] if self.image_first else [text, image]}
        system = self.system_text(resized_size, system_prompt)
        return [user] if system is None else [{"role": "system", "content": system}, user]


#: GTA1's system prompt, as its README's inference code and its training script write it.
GTA1_SYSTEM = (
    "You are an expert UI element locator. Given a GUI image and a user's element "
    "description, provide the coordinates of the specified element as a single (x,y) point. "
    "The image resolution is height {height} and width {width}. For elements with area, "
    "return the center point.\n\nOutput the coordinate pair exactly:\n(x,y)"
)

#: UI-TARS's GROUNDING prompt (bytedance/UI-TARS ``codes/prompts.py``), one user message.
UI_TARS_GROUNDING = (
    "You are a GUI agent. You are given a task and your action history, with screenshots. "
    "You need to perform the next action to complete the task. \n\n## Output Format\n\n"
    "Action: ...\n\n\n## Action Space\nclick(start_box='<|box_start|>(x1,y1)<|box_end|>')"
    "\n\n## User Instruction\n{instruction}"
)

OPENCUA_SYSTEM = (
    "You are a GUI agent. You are given a task and a screenshot of the screen. You need to "
    "perform a series of pyautogui actions to complete the task."
)

STYLES: dict[str, GroundingStyle] = {
    style.name: style
    for style in (
        GroundingStyle(
            "gta1",
            GTA1_SYSTEM,
            "{instruction}",
            True,
            "pair",
            "absolute",
            3136,
            4096 * 2160,
            "pillow",
            r"\({c},{c}\)",
        ),
        GroundingStyle(
            "qwen2.5-vl",
            None,
            "Locate the {instruction}, output its bbox coordinates using JSON format.",
            False,
            "qwen-json",
            "absolute",
            3136,
            12_845_056,
            "processor",
            r'\[\{"bbox_2d": \[{c}, {c}, {c}, {c}\]\}\]',
        ),
        GroundingStyle(
            "qwen3-vl",
            None,
            "Locate the {instruction} in this image. Output the point coordinates in JSON format.",
            True,
            "qwen-json",
            "relative-1000",
            None,
            None,
            "processor",
            r'\[\{"point_2d": \[{c}, {c}\]\}\]',
        ),
        GroundingStyle(
            "ui-tars-1.5",
            None,
            UI_TARS_GROUNDING,
            False,
            "ui-tars",
            "absolute",
            78_400,
            12_845_056,
            "processor",
            r"Action: click\(start_box='\({c},{c}\)'\)",
        ),
        GroundingStyle(
            "ui-tars",
            None,
            "Output only the coordinate of one point in your response. What element matches "
            "the following task: {instruction}",
            True,
            "pair",
            "relative-1000",
            None,
            None,
            "processor",
            r"\({c},{c}\)",
        ),
        GroundingStyle(
            "opencua",
            OPENCUA_SYSTEM,
            "{instruction}",
            True,
            "pyautogui",
            "absolute",
            3136,
            12_845_056,
            "processor",
            r"pyautogui\.click\(x={c}, y={c}\)",
        ),
    )
}

_QWEN25 = "Qwen2_5_VLForConditionalGeneration"
_QWEN2 = "Qwen2VLForConditionalGeneration"


def _name_key(name: str) -> str:
    """A model name or path, lowercased, ``_`` as ``-``: ``Qwen/Qwen2_5-VL`` → ``qwen/qwen2-5-vl``."""
    return name.lower().replace("_", "-")


def detect(architecture: str, names: tuple[str, ...]) -> tuple[str, str]:
    """``(style, why)`` for a served model: its name decides among fine-tunes of one
    architecture (GTA1, UI-TARS-1.5 and Qwen2.5-VL share theirs), else its architecture."""
    keys = [_name_key(n) for n in names if n]

    def named(*words: str) -> str | None:
        return next((k for k in keys for w in words if w in k), None)

    if (key := named("gta1")) is not None:
        return "gta1", f"the model name {key!r} is a GTA1 model"
    if (key := named("ui-tars", "uitars")) is not None:
        if architecture == _QWEN2:
            return "ui-tars", f"{key!r} is UI-TARS on Qwen2-VL (v1)"
        return "ui-tars-1.5", f"{key!r} is UI-TARS on {architecture} (1.5)"
    if architecture == "OpenCUAForConditionalGeneration" or (key := named("opencua")):
        return "opencua", f"{key or architecture!r} is an OpenCUA model"
    if architecture.startswith("Qwen3VL"):
        return "qwen3-vl", f"{architecture} answers in Qwen3-VL's 0-1000 space"
    if architecture == _QWEN25 and (key := named("qwen2.5-vl", "qwen2-5-vl")) is not None:
        return "qwen2.5-vl", f"{key!r} is Qwen2.5-VL itself"
    return "gta1", f"no family convention known for {architecture} {names[0]!r}: GTA1's"


def choose(
    architecture: str,
    names: tuple[str, ...],
    override: str | None = None,
    space: str | None = None,
) -> tuple[GroundingStyle, str]:
    """The style in force and why: ``override`` (GROUNDING_STYLE) or ``detect``'s, with
    ``space`` (GROUNDING_COORDINATES) replacing its coordinate space if given."""
    if override is not None and override != "auto":
        name, why = override, f"GROUNDING_STYLE={override}"
    else:
        name, why = detect(architecture, names)
    style = STYLES[name]
    if space is not None and space != style.space:
        style = style.with_space(space)  # type: ignore[arg-type]
        why += f"; GROUNDING_COORDINATES={space}"
    return style, why
