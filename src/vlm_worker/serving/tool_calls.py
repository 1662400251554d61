"""Tool calling on the chat route, with vLLM's own parsers, decided as ``vllm serve`` decides.

A request with ``tools`` is read by vLLM's own request model; ``tool_choice`` then says
what happens:

* ``none``: the template shows the tools; nothing in the answer is read as a call.
* ``auto`` (the default with tools): the parser named by ``TOOL_CALL_PARSER`` finds calls
  in the text (``ENABLE_AUTO_TOOL_CHOICE``, as ``--enable-auto-tool-choice``).
* ``required`` and a named function: the parser's ``adjust_request`` constrains decoding
  to the functions' JSON schema, and the JSON that comes out is read back as calls.

Each choice gets its own parser instance, because streaming parsers keep state; streamed
answers carry ``delta.tool_calls`` as vLLM's server sends them, and a choice that called
tools ends with ``finish_reason: "tool_calls"`` (a named function: ``"stop"``, as OpenAI).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from vlm_worker.adapters.vllm import (
    chat_parser_class,
    chat_request,
    is_named_tool_choice,
    new_tool_call_id,
    request_error_types,
    streamed_tool_call_keeps_length,
    validation_parameter,
)
from vlm_worker.config.settings import WorkerSettings
from vlm_worker.contract.errors import InvalidInput
from vlm_worker.contract.job_schema import STRUCTURED_KINDS

#: Options of vLLM's structured outputs a parser may set beside its constraint.
_STRUCTURED_OPTIONS = (
    "disable_any_whitespace",
    "disable_additional_properties",
    "whitespace_pattern",
)

#: The request fields vLLM's parsers read; the rest of the request is the worker's.
_TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls")


def uses_tools(body: dict[str, Any]) -> bool:
    return bool(body.get("tools")) or body.get("tool_choice") not in (None, "none")


class ToolCalls:
    """One request's tool calling: what the job needs, and how to read its answers."""

    def __init__(
        self, request: Any, parser_cls: Any, tokenizer: Any, settings: WorkerSettings
    ) -> None:
        self.request = request
        self.parser_cls = parser_cls
        self.tokenizer = tokenizer
        self.enable_auto = settings.enable_auto_tool_choice
        self.named = is_named_tool_choice(request.tool_choice)
        self.required = request.tool_choice == "required"
        self._stream_parsers: dict[int, Any] = {}
        self._streamed: set[int] = set()  # choices that sent tool calls

    @classmethod
    def for_request(
        cls, body: dict[str, Any], settings: WorkerSettings, tokenizer: Any
    ) -> ToolCalls:
        """Validate the request's tool fields and set up its parser, or say why not."""
        fields = {k: body[k] for k in _TOOL_FIELDS if k in body}
        try:
            request = chat_request({"messages": [{"role": "user", "content": ""}], **fields})
        except ValidationError as exc:
            error = exc.errors(include_url=False)[0]
            field = ".".join(str(p) for p in error["loc"]) or "tool_choice"
            message = error["msg"].removeprefix("Value error, ")
            raise InvalidInput(f"{field}: {message}", field=field) from None
        except request_error_types() as exc:  # vLLM 0.27+: its own error, not pydantic's
            raise _refused(exc, "tool_choice") from None
        parser_cls = chat_parser_class(settings.tool_call_parser, settings.enable_auto_tool_choice)
        tool_parser = getattr(parser_cls, "tool_parser_cls", None)
        choice = request.tool_choice
        if tool_parser is None and choice not in (None, "none"):
            if choice == "auto":
                raise InvalidInput(
                    'tool_choice: "auto" needs ENABLE_AUTO_TOOL_CHOICE=true and '
                    "TOOL_CALL_PARSER on this worker",
                    field="tool_choice",
                )
            wanted = (
                f'function "{choice.function.name}"' if is_named_tool_choice(choice) else choice
            )
            raise InvalidInput(
                f"tool_choice: {wanted} needs TOOL_CALL_PARSER and ENABLE_AUTO_TOOL_CHOICE=true "
                "on this worker",
                field="tool_choice",
            )
        if parser_cls is not None and choice != "none":
            try:
                request = cls._parser(parser_cls, tokenizer, request).adjust_request(
                    request=request
                )
            except request_error_types() as exc:
                raise _refused(exc, "tools") from None
        return cls(request, parser_cls, tokenizer, settings)

    @staticmethod
    def _parser(parser_cls: Any, tokenizer: Any, request: Any) -> Any:
        return parser_cls(tokenizer, request.tools, model_config=None)

    # ------------------------------------------------------------------ the job
    def native_fields(self) -> dict[str, Any]:
        """What the native job needs: the tools for the template, the constraint a
        required or named choice implies, and the token ids the parsers read."""
        fields: dict[str, Any] = {"return_token_ids": True}
        if self.request.tools:
            fields["tools"] = [tool.model_dump() for tool in self.request.tools]
        structured = self.request.structured_outputs
        if structured is not None:  # the parser's constraint replaces response_format, as vLLM
            fields["structured_outputs"] = {
                k: v
                for k in (*STRUCTURED_KINDS, *_STRUCTURED_OPTIONS)
                if (v := getattr(structured, k, None)) not in (None, False)
            }
        if self.request.skip_special_tokens is False:
            fields["skip_special_tokens"] = False
        return fields

    # ----------------------------------------------------------- whole answers
    def message(
        self, text: str, token_ids: list[int] | None, finish_reason: str | None
    ) -> tuple[dict[str, Any], str]:
        """An assistant message (content, tool calls) and the choice's finish reason."""
        calls: list[Any] = []
        content: str | None = text
        if self.parser_cls is not None:
            parser = self._parser(self.parser_cls, self.tokenizer, self.request)
            _, content, found = parser.parse(
                text,
                self.request,
                enable_auto_tools=self.enable_auto,
                model_output_token_ids=token_ids or [],
            )
            calls = list(found or [])
        choice = self.request.tool_choice
        auto = self.enable_auto and self.parser_cls is not None and choice in (None, "auto")
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if self.named or self.required:
            message["content"] = content or ""
            message["tool_calls"] = [self._call(c) for c in calls]
        elif auto and self.request.tools and calls:
            message["tool_calls"] = [self._call(c) for c in calls]
        if self.request.parallel_tool_calls is False and message.get("tool_calls"):
            message["tool_calls"] = message["tool_calls"][:1]
        called = auto and bool(calls)
        if called or (self.required and finish_reason == "stop"):
            return message, "tool_calls"
        return message, finish_reason or "stop"

    @staticmethod
    def _call(call: Any) -> dict[str, Any]:
        return {
            "id": call.id or new_tool_call_id(),
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }

    # ---------------------------------------------------------------- streams
    def delta(
        self, index: int, text: str, token_ids: list[int] | None, finished: bool
    ) -> dict[str, Any] | None:
        """The ``delta`` for this piece of choice ``index``, or None to send nothing yet."""
        if self.parser_cls is None:
            return {"content": text} if text else None
        parser = self._stream_parsers.get(index)
        if parser is None:
            parser = self._parser(self.parser_cls, self.tokenizer, self.request)
            self._stream_parsers[index] = parser
        message = parser.parse_delta(
            delta_text=text,
            delta_token_ids=list(token_ids or []),
            request=self.request,
            prompt_token_ids=[],  # no reasoning parser: the answer starts in content
            finished=finished,
        )
        if message is None:
            return None
        delta = message.model_dump(exclude_unset=True)
        if delta.get("tool_calls"):
            self._streamed.add(index)
            if self.request.parallel_tool_calls is False:
                delta["tool_calls"] = [c for c in delta["tool_calls"] if c.get("index") == 0]
        return delta

    def stream_finish_reason(self, index: int, finish_reason: str | None) -> str:
        """As the installed ``vllm serve``: "tool_calls" once calls streamed (not for a
        named function), but from 0.31 a call cut short keeps "length"."""
        cut_short = finish_reason not in (None, "stop")
        keeps_length = cut_short and streamed_tool_call_keeps_length()
        if index in self._streamed and not self.named and not keeps_length:
            return "tool_calls"
        return finish_reason or "stop"


def _refused(exc: BaseException, default_field: str) -> InvalidInput:
    """vLLM's refusal of a tool request, naming the parameter it names (or the default)."""
    field = validation_parameter(exc) or default_field
    message = str(exc).split(" (parameter=")[0]
    return InvalidInput(f"{field}: {message}", field=field)
