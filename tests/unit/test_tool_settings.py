"""Tool calling's settings: checked at start, and requests refused by the rule vllm serve uses."""

from __future__ import annotations

import pytest

from vlm_worker.config.settings import load_worker_settings
from vlm_worker.contract.errors import ConfigError, InvalidInput
from vlm_worker.serving.tool_calls import ToolCalls, uses_tools
from vlm_worker.serving.worker import check_tool_parser

TOOLS = [{"type": "function", "function": {"name": "click", "parameters": {"type": "object"}}}]


def test_settings_are_checked_before_any_engine():
    with pytest.raises(ConfigError, match="ENABLE_AUTO_TOOL_CHOICE=true needs TOOL_CALL_PARSER"):
        load_worker_settings({"ENABLE_AUTO_TOOL_CHOICE": "true"})
    with pytest.raises(ConfigError, match="TOOL_CALL_PARSER='hermez' is not one of") as info:
        check_tool_parser(load_worker_settings({"TOOL_CALL_PARSER": "hermez"}))
    assert "hermes" in info.value.message  # the known names are listed
    check_tool_parser(load_worker_settings({"TOOL_CALL_PARSER": "hermes"}))


@pytest.mark.parametrize(
    ("env", "choice", "words"),
    [
        ({}, None, '"auto" needs ENABLE_AUTO_TOOL_CHOICE=true'),
        ({}, "required", "required needs TOOL_CALL_PARSER"),
        ({"TOOL_CALL_PARSER": "hermes"}, "auto", '"auto" needs'),  # parser, but no auto
        ({}, {"type": "function", "function": {"name": "click"}}, 'function "click" needs'),
    ],
)
def test_tool_choices_need_the_parser_as_vllm_serve_says(env, choice, words):
    body = {"tools": TOOLS} | ({"tool_choice": choice} if choice is not None else {})
    assert uses_tools(body)
    with pytest.raises(InvalidInput) as info:
        ToolCalls.for_request(body, load_worker_settings(env), tokenizer=None)
    assert info.value.field == "tool_choice" and words in info.value.message


def test_tools_with_choice_none_need_no_parser():
    tools = ToolCalls.for_request(
        {"tools": TOOLS, "tool_choice": "none"}, load_worker_settings({}), tokenizer=None
    )
    fields = tools.native_fields()
    assert fields["tools"][0]["function"]["name"] == "click"
    assert "structured_outputs" not in fields
    message, reason = tools.message("<tool_call>{}</tool_call>", [1, 2], "stop")
    assert message == {"role": "assistant", "content": "<tool_call>{}</tool_call>"}
    assert reason == "stop"
    assert not uses_tools({"tool_choice": "none"}) and not uses_tools({})
