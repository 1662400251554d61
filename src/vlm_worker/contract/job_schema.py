"""The job schema: what a client may send, parsed by pydantic with unknown keys refused.

``parse_job`` is pure (a dict in, a ``Job`` out, or ``InvalidInput`` naming the field), so
every rule here is tested without an engine. Image sources are only checked for shape
here; fetching and decoding happen in ``images``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from vlm_worker.contract.errors import InvalidInput

#: Unknown keys are errors, and so are wrong types: a string is neither a boolean nor a
#: number (``"stream": "yes"`` is refused, not taken as true).
_STRICT = ConfigDict(extra="forbid", frozen=True, strict=True)

MAX_STOP_SEQUENCES = 16
MAX_MESSAGES = 256
#: Most elements one grounding job may locate on its screenshot (``instructions``).
MAX_TARGETS = 32


def _not_empty(value: str) -> str:
    if not value:
        raise ValueError("String should have at least 1 character")
    return value


def _valid_unicode(value: str) -> str:
    """Text must be encodable as UTF-8: JSON may carry a lone surrogate (``"\\ud800"``),
    which no tokenizer takes."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"not valid Unicode (a lone surrogate at character {exc.start})"
            ) from None
    return value


#: Prompt text: valid Unicode.
Text = Annotated[str, AfterValidator(_valid_unicode)]


#: A non-empty string, checked in O(1). ``Field(min_length=1)`` counts the characters,
#: holding the GIL throughout a data URI of megabytes, once per job, which stalls every
#: stream on the worker for as long (``docs/decisions/0007-gil-sparing-decoding.md``).
NonEmptyStr = Annotated[str, AfterValidator(_not_empty)]


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: Text


class ImageURL(BaseModel):
    model_config = _STRICT
    url: NonEmptyStr
    detail: Literal["auto", "low", "high"] | None = None


class ImageURLPart(BaseModel):
    model_config = _STRICT
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _accept_bare_string(cls, value: Any) -> Any:
        # Several clients send {"image_url": "https://..."}; accept it as the url.
        return {"url": value} if isinstance(value, str) else value

    @property
    def source(self) -> str:
        return self.image_url.url


class ImagePart(BaseModel):
    model_config = _STRICT
    type: Literal["image"]
    image: NonEmptyStr

    @property
    def source(self) -> str:
        return self.image


class VideoURL(BaseModel):
    model_config = _STRICT
    url: NonEmptyStr


class VideoURLPart(BaseModel):
    """A video, as vLLM's OpenAI server takes it: an http(s) URL or a ``data:`` URI."""

    model_config = _STRICT
    type: Literal["video_url"]
    video_url: VideoURL

    @field_validator("video_url", mode="before")
    @classmethod
    def _accept_bare_string(cls, value: Any) -> Any:
        return {"url": value} if isinstance(value, str) else value

    @property
    def source(self) -> str:
        return self.video_url.url


ContentPart = Annotated[
    TextPart | ImageURLPart | ImagePart | VideoURLPart, Field(discriminator="type")
]


class FunctionCallIn(BaseModel):
    model_config = _STRICT
    name: NonEmptyStr
    #: JSON text, as OpenAI sends it (or an object); templates get it parsed.
    arguments: Text | dict[str, Any] | None = None


class ToolCallIn(BaseModel):
    """A tool call the assistant made earlier in the conversation."""

    model_config = _STRICT
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class Message(BaseModel):
    model_config = _STRICT
    role: Literal["system", "user", "assistant", "tool"]
    #: An assistant turn that called tools (its content may then be null).
    tool_calls: list[ToolCallIn] | None = Field(None, min_length=1, max_length=128)
    #: A ``tool`` turn: which call this result answers.
    tool_call_id: str | None = None
    # after tool_calls, so that its check can see them
    content: Text | list[ContentPart] | None

    @field_validator("content")
    @classmethod
    def _content_or_calls(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and not info.data.get("tool_calls"):
            raise ValueError("null only in an assistant message with tool_calls")
        return value

    @model_validator(mode="after")
    def _check_role_fields(self) -> Message:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls: only an assistant message carries tool calls")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("tool_call_id: only a tool message answers a tool call")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("tool_call_id: required in a tool message (the call it answers)")
        return self


STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


class StructuredOutputs(BaseModel):
    """Constrained decoding through vLLM's structured-output backends, as vLLM names it:
    exactly one of a JSON schema, a regex, a list of choices, a grammar (EBNF/Lark), or
    any JSON object."""

    model_config = _STRICT

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: NonEmptyStr | None = None
    choice: list[NonEmptyStr] | None = Field(None, min_length=1)
    grammar: NonEmptyStr | None = None
    json_object: Literal[True] | None = None
    #: xgrammar's structural tag (JSON text): what vLLM's tool parsers constrain calls with.
    structural_tag: NonEmptyStr | None = None
    disable_any_whitespace: bool | None = None
    disable_additional_properties: bool | None = None
    whitespace_pattern: NonEmptyStr | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [k for k in STRUCTURED_KINDS if self.kind_value(k) is not None]
        if len(given) != 1:
            found = f"got {', '.join(given)}" if given else "got none"
            raise ValueError(f"set exactly one of {', '.join(STRUCTURED_KINDS)} ({found})")
        return self

    def kind_value(self, kind: str) -> Any:
        return self.json_ if kind == "json" else getattr(self, kind)

    def engine_values(self) -> dict[str, Any]:
        """The keyword arguments of vLLM's ``StructuredOutputsParams``."""
        return self.model_dump(by_alias=True, exclude_none=True)


class ProcessorOptions(BaseModel):
    """Per-job resize bounds for the model's processor (vLLM's ``mm_processor_kwargs``):
    the worker resizes with them and tells vLLM the same, so both agree."""

    model_config = _STRICT

    min_pixels: int | None = Field(None, ge=1)
    max_pixels: int | None = Field(None, ge=1)


class SamplingOptions(BaseModel):
    """The sampling knobs a job may set; names follow OpenAI and vLLM."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, strict=True)

    max_tokens: int | None = Field(
        None, ge=1, validation_alias=AliasChoices("max_tokens", "max_new_tokens")
    )
    temperature: float | None = Field(None, ge=0.0, le=100.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    min_tokens: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    ignore_eos: bool | None = None
    # JSON object keys are strings: token ids arrive as "5"
    logit_bias: (
        dict[Annotated[int, Field(strict=False)], Annotated[float, Field(ge=-100.0, le=100.0)]]
        | None
    ) = None
    #: Keep special tokens in the text (tool-call tags are special tokens in some models).
    skip_special_tokens: bool | None = None
    #: Choices to generate for the prompt (``MAX_N`` caps it).
    n: int | None = Field(None, ge=1)
    #: Log probabilities of each generated token and of this many top alternatives (0:
    #: the generated token's only), in OpenAI's per-token shape.
    #: capped by the engine's MAX_LOGPROBS (20 by default), as vllm serve caps it
    logprobs: int | None = Field(None, ge=0)
    #: The same for the prompt's tokens (the first has none), in the final chunk.
    prompt_logprobs: int | None = Field(None, ge=0)
    structured_outputs: StructuredOutputs | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are accepted")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    def set_values(self) -> dict[str, Any]:
        values = self.model_dump(exclude_none=True, exclude={"structured_outputs"})
        if self.structured_outputs is not None:
            values["structured_outputs"] = self.structured_outputs.engine_values()
        return values


_SAMPLING_KEYS = set(SamplingOptions.model_fields) | {"max_new_tokens"}

#: Arguments of ``apply_chat_template`` that the worker sets itself.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "messages",
        "conversation",
        "chat_template",
        "tokenize",
        "add_generation_prompt",
        "continue_final_message",
        "tools",
        "documents",
        "return_dict",
    }
)


class Job(BaseModel):
    """A native job's ``input``.

    ``task`` "chat" (the default) takes ``messages``, or a raw ``prompt`` that reaches the
    engine as it is, without the chat template (``apply_chat_template: true`` makes it one
    user message instead). ``task`` "grounding" takes either the
    shortcut ``instruction`` + ``image`` or ``messages`` holding exactly one image; the
    worker adds the system prompt (``system_prompt`` overrides its text). The rules that
    span fields are in ``check_task``, which names the field at fault.
    """

    model_config = _STRICT

    task: Literal["chat", "grounding"] = "chat"
    messages: list[Message] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    prompt: Annotated[Text, AfterValidator(_not_empty)] | None = None
    apply_chat_template: bool | None = None
    instruction: Text | None = None
    #: Several elements to locate on one screenshot: one result per instruction, in order.
    instructions: list[Text] | None = Field(None, min_length=1, max_length=MAX_TARGETS)
    #: Decode under the grounding style's answer grammar (unset: GROUNDING_CONSTRAIN).
    constrain: bool | None = None
    image: NonEmptyStr | None = None
    system_prompt: Annotated[Text, AfterValidator(_not_empty)] | None = None
    sampling_params: SamplingOptions = Field(default_factory=SamplingOptions)
    stream: bool = True
    #: A LoRA adapter's name (``LORA_MODULES``) to run this job on; unset: the base model.
    model: NonEmptyStr | None = None
    #: Function definitions the chat template shows the model (OpenAI's ``tools``).
    tools: list[dict[str, Any]] | None = Field(None, min_length=1, max_length=128)
    #: Each chunk carries its ``token_ids`` (and each choice in a whole answer), and the
    #: last one the ``prompt_token_ids`` vLLM expanded the prompt to.
    return_token_ids: bool = False
    #: This job's image resize bounds, within the worker's (``IMAGE_MIN/MAX_PIXELS``).
    mm_processor_kwargs: ProcessorOptions | None = None
    #: Extra variables for the chat template (``{"add_vision_id": true}``,
    #: ``{"enable_thinking": false}``), as vLLM's ``chat_template_kwargs``.
    chat_template_kwargs: dict[str, Any] | None = None
    # This job's stream batching (RunPod's worker-vllm names): unset, the worker's settings
    min_batch_size: int | None = Field(None, ge=1, le=4096)
    max_batch_size: int | None = Field(None, ge=1, le=4096)
    batch_size_growth_factor: float | None = Field(None, ge=1.0, le=100.0)

    @field_validator("chat_template_kwargs")
    @classmethod
    def _check_template_kwargs(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        taken = sorted(set(value or ()) & RESERVED_TEMPLATE_KWARGS)
        if taken:
            raise ValueError(f"{taken[0]} is set by the worker, not by chat_template_kwargs")
        return value

    @property
    def raw_prompt(self) -> bool:
        """The prompt goes to the engine as it is, not through the chat template."""
        return self.prompt is not None and not self.apply_chat_template

    def chat_messages(self) -> list[Message]:
        if self.messages is not None:
            return self.messages
        return [Message(role="user", content=self.prompt or "")]

    @model_validator(mode="before")
    @classmethod
    def _gather_flat_sampling(cls, data: Any) -> Any:
        """Move flat sampling keys under ``sampling_params``; the same key in both is an error."""
        if not isinstance(data, dict):
            return data
        flat = {k: v for k, v in data.items() if k in _SAMPLING_KEYS}
        if not flat:
            return data
        nested = data.get("sampling_params") or {}
        if not isinstance(nested, dict):
            return data  # let the field's own validation report the type
        both = sorted(set(flat) & set(nested))
        if both:
            raise ValueError(f"{both[0]} is set both at the top level and in sampling_params")
        rest = {k: v for k, v in data.items() if k not in _SAMPLING_KEYS}
        return {**rest, "sampling_params": {**nested, **flat}}

    def targets(self) -> list[str]:
        """A shortcut grounding job's element descriptions, in order (one or several)."""
        if self.instructions is not None:
            return list(self.instructions)
        return [] if self.instruction is None else [self.instruction]

    def video_sources(self) -> list[tuple[str, str]]:
        """Each video's source with its field path, in prompt order."""
        found = []
        for i, message in enumerate(self.messages or ()):
            if not isinstance(message.content, list):
                continue
            for j, part in enumerate(message.content):
                if isinstance(part, VideoURLPart):
                    found.append((f"messages[{i}].content[{j}].video_url.url", part.source))
        return found

    def image_sources(self) -> list[tuple[str, str]]:
        """Each image's source with its field path, in prompt order."""
        if self.image is not None:
            return [("image", self.image)]
        found = []
        for i, message in enumerate(self.messages or ()):  # a raw prompt carries none
            if not isinstance(message.content, list):
                continue
            for j, part in enumerate(message.content):
                if isinstance(part, (ImageURLPart, ImagePart)):
                    suffix = ".image_url.url" if isinstance(part, ImageURLPart) else ".image"
                    found.append((f"messages[{i}].content[{j}]{suffix}", part.source))
        return found


_UNION_LABELS = {"str", "int", "float", "bool", "list", "dict"}
_PART_TAGS = {"text", "image_url", "image"}


def field_path(loc: tuple[int | str, ...]) -> str:
    """``('messages', 1, 'content', 'list[...]', 0, 'text', 'text')`` → ``messages[1].content[0].text``.

    pydantic puts union member labels and discriminator tags into ``loc``; clients want
    the path in their own JSON.
    """
    out = ""
    previous: int | str | None = None
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
        elif item in _UNION_LABELS or "[" in item or "(" in item:
            continue
        elif isinstance(previous, int) and item in _PART_TAGS and "content" in out:
            pass  # the discriminator tag after a content index
        else:
            out += f".{item}" if out else item
        previous = item if not (isinstance(item, str) and "[" in item) else previous
    return out or "input"


def validation_error_to_invalid_input(exc: ValidationError) -> InvalidInput:
    """The most specific of pydantic's errors (union members each report one) as ours."""
    errors = exc.errors(include_url=False)
    best = max(errors, key=lambda e: (len(e["loc"]), e["type"] != "string_type"))
    path = field_path(tuple(best["loc"]))
    message = best["msg"]
    if best["type"] == "extra_forbidden":
        message = "unknown field"
    elif message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    return InvalidInput(f"{path}: {message}", field=path)


def check_size(data: dict[str, Any], max_chars: int, max_parts: int) -> None:
    """Refuse a job too large to parse before parsing it: megabytes of text would be
    validated and tokenized (holding the GIL) only to be refused as too long, and
    hundreds of thousands of tiny parts stall validation as long. Only lengths are read
    (``len`` is O(1)); the walk stops at the first cap passed."""
    chars = 0
    for name in ("prompt", "instruction", "system_prompt"):
        if isinstance(value := data.get(name), str):
            chars += len(value)
    if isinstance(targets := data.get("instructions"), list):
        chars += sum(len(t) for t in targets[: max_parts + 1] if isinstance(t, str))
    messages = data.get("messages")
    if isinstance(messages, list):
        parts = len(messages)
        for message in messages:
            if parts > max_parts:
                break
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                chars += len(content)
            elif isinstance(content, list):
                parts += len(content)
                if parts > max_parts:
                    break
                for part in content:
                    if isinstance(part, dict) and isinstance(text := part.get("text"), str):
                        chars += len(text)
            if chars > max_chars:
                break
        if parts > max_parts:
            raise InvalidInput(
                f"messages: the job has more than {max_parts} messages and content parts "
                f"(MAX_CONTENT_PARTS={max_parts})",
                field="messages",
            )
    if chars > max_chars:
        raise InvalidInput(
            f"the job's text is more than {max_chars} characters "
            f"(MAX_JOB_TEXT_CHARS={max_chars}); it is refused before tokenizing",
            field="messages" if isinstance(messages, list) else "prompt",
        )


def parse_job(data: Any, max_chars: int | None = None, max_parts: int | None = None) -> Job:
    """The job, validated; with ``max_chars`` / ``max_parts``, sizes first (``check_size``)."""
    if not isinstance(data, dict):
        raise InvalidInput(f"input must be a JSON object, got {type(data).__name__}", field="input")
    if max_chars is not None and max_parts is not None:
        check_size(data, max_chars, max_parts)
    try:
        job = Job.model_validate(data)
    except ValidationError as exc:
        raise validation_error_to_invalid_input(exc) from None
    check_task(job)
    return job


_GROUNDING_ONLY = ("instruction", "instructions", "constrain", "image", "system_prompt")


def check_task(job: Job) -> None:
    """The rules between fields, per ``task``, as ``InvalidInput`` naming the field at fault.

    A grounding job has exactly one image and an element description: the shortcut
    (``instruction`` + ``image``) or ``messages``, never both, and no system message of
    its own, since the worker's states the resized size (``system_prompt`` changes the text).
    """
    if job.task == "chat":
        for name in _GROUNDING_ONLY:
            if getattr(job, name) is not None:
                raise InvalidInput(f"{name}: only used with task 'grounding'", field=name)
        if job.messages is None and job.prompt is None:
            raise InvalidInput(
                "messages: Field required (or prompt, a raw text prompt)", field="messages"
            )
        if job.messages is not None and job.prompt is not None:
            raise InvalidInput("prompt: give messages or prompt, not both", field="prompt")
        if job.messages is not None and job.apply_chat_template is False:
            raise InvalidInput(
                "apply_chat_template: messages always go through the chat template; send a "
                "raw prompt instead",
                field="apply_chat_template",
            )
        return
    for name in ("prompt", "apply_chat_template", "mm_processor_kwargs"):
        if getattr(job, name) is not None:
            raise InvalidInput(
                f"{name}: only used with task 'chat' (grounding resizes with "
                "GROUNDING_MIN_PIXELS / GROUNDING_MAX_PIXELS)"
                if name == "mm_processor_kwargs"
                else f"{name}: only used with task 'chat'",
                field=name,
            )
    if job.instruction is not None and job.instructions is not None:
        raise InvalidInput(
            "instructions: give instruction or instructions, not both", field="instructions"
        )
    for i, text in enumerate(job.instructions or ()):
        if not text.strip():
            raise InvalidInput(f"instructions[{i}]: must not be empty", field=f"instructions[{i}]")
    if job.messages is None:
        if job.instruction is None and job.instructions is None:
            raise InvalidInput(
                "instruction: required for task 'grounding' (the element to locate), "
                "with image; or give messages instead",
                field="instruction",
            )
        if job.instruction is not None and not job.instruction.strip():
            raise InvalidInput("instruction: must not be empty", field="instruction")
        if job.image is None:
            raise InvalidInput(
                "image: required for task 'grounding' (the screenshot: a data: URI, base64 "
                "or an http(s) URL)",
                field="image",
            )
        return
    for name in ("instruction", "instructions", "image"):
        if getattr(job, name) is not None:
            raise InvalidInput(
                f"{name}: give either messages, or instruction and image, not both",
                field=name,
            )
    for i, message in enumerate(job.messages):
        if message.role == "system":
            raise InvalidInput(
                f"messages[{i}].role: a grounding job's system message is the worker's (it "
                "states the resized image size); set system_prompt to change its text",
                field=f"messages[{i}].role",
            )
    videos = job.video_sources()
    if videos:
        raise InvalidInput(
            f"{videos[0][0]}: a grounding job takes one image and no video", field=videos[0][0]
        )
    sources = job.image_sources()
    if not sources:
        raise InvalidInput(
            "messages: a grounding job needs exactly one image (the screenshot); found none",
            field="messages",
        )
    if len(sources) > 1:
        raise InvalidInput(
            f"{sources[1][0]}: a grounding job takes exactly one image; this is image 2",
            field=sources[1][0],
        )
    has_text = any(
        (
            m.content.strip()
            if isinstance(m.content, str)
            else any(isinstance(p, TextPart) and p.text.strip() for p in m.content or ())
        )
        for m in job.messages
        if m.role == "user"
    )
    if not has_text:
        raise InvalidInput(
            "messages: a grounding job needs the element description as text beside the image",
            field="messages",
        )
