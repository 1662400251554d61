"""Chat messages to the prompt text the engine gets, with one placeholder per image.

The model's own chat template does the rendering (through the processor or tokenizer's
``apply_chat_template``); this module only adapts the input and checks the output, so
templates with quirks fail here with a clear message instead of deep inside vLLM.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, Protocol

from vlm_worker.contract.errors import InvalidInput, PromptError, PromptTooLong
from vlm_worker.contract.job_schema import (
    ImagePart,
    ImageURLPart,
    Message,
    TextPart,
    ToolCallIn,
    VideoURLPart,
)

#: OpenCUA / GTA1-family templates wrap each image in these markers instead of the
#: placeholder the vLLM model class expects.
MEDIA_SPAN = re.compile(r"<\|media_begin\|>.*?<\|media_end\|>", re.S)


class ChatTemplater(Protocol):
    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


def template_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Messages in the shape HF chat templates expect: images become ``{"type": "image"}``."""
    out: list[dict[str, Any]] = []
    for message in messages:
        entry: dict[str, Any] = {"role": message.role}
        if message.content is None or isinstance(message.content, str):
            entry["content"] = message.content
        elif message.role == "tool":  # templates render a tool's result as text
            entry["content"] = "".join(p.text for p in message.content if isinstance(p, TextPart))
        else:
            parts: list[dict[str, Any]] = []
            for part in message.content:
                if isinstance(part, TextPart):
                    parts.append({"type": "text", "text": part.text})
                elif isinstance(part, (ImageURLPart, ImagePart)):
                    parts.append({"type": "image"})
                elif isinstance(part, VideoURLPart):
                    parts.append({"type": "video"})
            entry["content"] = parts
        if message.tool_calls is not None:
            entry["tool_calls"] = [_tool_call(call) for call in message.tool_calls]
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        out.append(entry)
    return out


def _tool_call(call: ToolCallIn) -> dict[str, Any]:
    """A past tool call as templates expect it: arguments as an object, not JSON text
    (transformers' convention, which vLLM follows)."""
    arguments = call.function.arguments
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments else {}
        except json.JSONDecodeError as exc:
            raise PromptError(
                f"tool_calls: arguments of {call.function.name!r} are not JSON: {exc}"
            ) from exc
    entry: dict[str, Any] = {
        "type": "function",
        "function": {"name": call.function.name, "arguments": arguments or {}},
    }
    if call.id is not None:
        entry["id"] = call.id
    return entry


def render(
    templater: ChatTemplater,
    messages: list[dict[str, Any]],
    chat_template: str | None = None,
    template_kwargs: dict[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """Render with the model's template; a final assistant message is continued, not closed.

    ``template_kwargs`` become variables of the template (the job's ``chat_template_kwargs``).
    """
    continue_final = (
        bool(messages)
        and messages[-1]["role"] == "assistant"
        and not messages[-1].get("tool_calls")
    )
    try:
        text = templater.apply_chat_template(
            messages,
            chat_template=chat_template,
            tokenize=False,
            add_generation_prompt=not continue_final,
            continue_final_message=continue_final,
            **({"tools": tools} if tools else {}),
            **(template_kwargs or {}),
        )
    except Exception as exc:  # jinja2 errors, templates raising on role order, ...
        raise PromptError(f"the chat template could not render these messages: {exc}") from exc
    if not isinstance(text, str):
        raise PromptError(f"the chat template returned {type(text).__name__}, not text")
    return text


#: Roles whose text comes from the client, not from the model: a special token typed there
#: would become a real control token in the prompt (a forged turn, a fake image slot).
CLIENT_ROLES = frozenset({"system", "user", "tool"})


def special_token_pattern(tokens: Sequence[str]) -> re.Pattern[str] | None:
    """One pattern for all of a tokenizer's special tokens, longest first."""
    literal = sorted({t for t in tokens if t}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, literal))) if literal else None


def refuse_special_tokens(
    messages: Sequence[Message], pattern: re.Pattern[str] | None, extra: dict[str, str]
) -> None:
    """The documented rule: system, user and tool text, and ``extra`` fields (a grounding
    job's instruction), may not contain the tokenizer's special tokens; the error names
    the field and the token. Assistant turns are the model's own words (``<think>``, a
    ``<tool_call>``) and pass as they are, as a raw ``prompt`` does."""
    if pattern is None:
        return
    for field, text in extra.items():
        _refuse(pattern, text, field)
    for i, message in enumerate(messages):
        if message.role not in CLIENT_ROLES or message.content is None:
            continue
        if isinstance(message.content, str):
            _refuse(pattern, message.content, f"messages[{i}].content")
            continue
        for j, part in enumerate(message.content):
            if isinstance(part, TextPart):
                _refuse(pattern, part.text, f"messages[{i}].content[{j}].text")


def _refuse(pattern: re.Pattern[str], text: str, field: str) -> None:
    found = pattern.search(text)
    if found is not None:
        raise InvalidInput(
            f"{field}: contains the special token {found.group()!r}, which text may not "
            "carry (it would act as a control token); send images as image parts",
            field=field,
        )


def normalize_placeholders(
    text: str,
    n_images: int,
    placeholder: str,
    image_token: str,
    n_videos: int = 0,
    video_token: str | None = None,
) -> str:
    """Rewrite media-marker spans to the model's placeholder, then insist on one per image.

    A template that drops an image part, or a text part that smuggles in the image token,
    would otherwise become an opaque vLLM error (or a silently wrong prompt).
    """
    text = MEDIA_SPAN.sub(lambda _: placeholder, text)
    found = text.count(image_token)
    if found != n_images:
        raise PromptError(
            f"the rendered prompt holds {found} image placeholder(s) ({image_token}) for "
            f"{n_images} image(s); the chat template or a text part does not match the images",
            field="messages",
        )
    if video_token is not None and (found := text.count(video_token)) != n_videos:
        raise PromptError(
            f"the rendered prompt holds {found} video placeholder(s) ({video_token}) for "
            f"{n_videos} video(s); the chat template or a text part does not match the videos",
            field="messages",
        )
    return text


def check_length(prompt_tokens: int, max_model_len: int) -> None:
    """Refuse a prompt that leaves no room to generate, with the numbers that decide it."""
    if prompt_tokens >= max_model_len:
        raise PromptTooLong(
            f"the prompt is {prompt_tokens} tokens (text and image) but the model's context "
            f"is {max_model_len} (MAX_MODEL_LEN); shorten the text or lower IMAGE_MAX_PIXELS",
            field="messages",
        )
