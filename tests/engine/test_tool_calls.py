"""Tool calling through the official ``openai`` client, on the session's worker (hermes).

Random weights never choose to call a tool, but ``tool_choice`` ``required`` or a named
function constrains decoding to the functions' schema: whatever comes out is a call.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletionMessageToolCall

from support.jobs import collect, data_uri, screenshot
from support.openai_shim import OpenAIShim

pytestmark = pytest.mark.engine

MODEL = "tiny-qwen2.5-vl"
CLICK = {
    "type": "object",
    "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 99},
        "y": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["x", "y"],
    "additionalProperties": False,
}
# strict: vLLM 0.27+ pins a tool's arguments to its schema only for a strict tool
# (OpenAI's meaning; `vllm serve --tool-strict-level parameter` pins all), where 0.26 pinned
# them always. Strict tools get the same constraint on every tested release.
TOOLS = [
    {"type": "function", "function": {"name": "click", "parameters": CLICK, "strict": True}},
    {
        "type": "function",
        "function": {
            "name": "scroll",
            "strict": True,
            "parameters": {
                "type": "object",
                "properties": {"down": {"type": "boolean"}},
                "required": ["down"],
            },
        },
    },
]
MESSAGES = [
    {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": data_uri(screenshot(320, 200, 5))}},
            {"type": "text", "text": "Click the green box."},
        ],
    }
]


def test_a_named_function_comes_back_as_a_tool_call_whole_and_streamed(worker):
    with OpenAIShim(worker.handler) as shim:
        client = openai.OpenAI(base_url=shim.base_url, api_key="unused", max_retries=0)
        named = {"type": "function", "function": {"name": "click"}}
        # sampled with a seed, the JSON closes within a few tries (greedy random weights
        # may pad it with whitespace); the same seed streamed must give the same call
        for seed in range(10):
            args = {"model": MODEL, "messages": MESSAGES, "tools": TOOLS, "seed": seed}
            args |= {"tool_choice": named, "max_tokens": 200, "temperature": 1.0}
            res = client.chat.completions.create(**args)
            if res.choices[0].finish_reason == "stop":
                break
        else:
            pytest.fail("no seed closed the call's JSON")
        (call,) = res.choices[0].message.tool_calls
        assert isinstance(call, ChatCompletionMessageToolCall) and call.function.name == "click"
        jsonschema.validate(json.loads(call.function.arguments), CLICK)
        assert call.id and res.choices[0].message.content in ("", None)

        chunks = list(client.chat.completions.create(**args, stream=True))
        pieces = [
            c.function
            for chunk in chunks
            for choice in chunk.choices
            for c in choice.delta.tool_calls or []
        ]
        assert "".join(p.name or "" for p in pieces) == "click"
        # streamed, the arguments arrive as the model wrote them (vllm serve does the same);
        # whole, the parser re-serialises them: the same JSON either way
        streamed = "".join(p.arguments or "" for p in pieces)
        assert json.loads(streamed) == json.loads(call.function.arguments)
        assert chunks[-1].choices[0].finish_reason == "stop"  # a named function: stop


async def test_required_calls_and_a_tool_history(worker):
    body = {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "required", "max_tokens": 200}
    body |= {"temperature": 1.0}
    for seed in range(10):
        (res,) = await collect(
            worker, {"openai_route": "/v1/chat/completions", "openai_input": {**body, "seed": seed}}
        )
        if res["choices"][0]["finish_reason"] == "tool_calls":
            break
    else:
        pytest.fail("no seed closed the calls' JSON")
    calls = res["choices"][0]["message"]["tool_calls"]
    assert calls and {c["function"]["name"] for c in calls} <= {"click", "scroll"}
    # the calls and their results go back as history, and the model answers on
    history = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": calls},
        *({"role": "tool", "tool_call_id": c["id"], "content": "done"} for c in calls),
    ]
    (after,) = await collect(
        worker,
        {
            "openai_route": "/v1/chat/completions",
            "openai_input": {"messages": history, "tools": TOOLS, "max_tokens": 4},
        },
    )
    assert after["usage"]["prompt_tokens"] > res["usage"]["prompt_tokens"]


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        (
            {"tool_choice": {"type": "function", "function": {"name": "drag"}}},
            "tool_choice",
            "match",
        ),
        ({"tool_choice": "sometimes"}, "tool_choice", "Invalid value"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice", "tools"),
        ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role", "tool"),
    ],
)
async def test_bad_tool_requests_name_the_field(worker, extra, param, words):
    body = {"messages": MESSAGES, "tools": TOOLS, **extra}
    (out,) = await collect(worker, {"openai_route": "/v1/chat/completions", "openai_input": body})
    err = out["error"]
    assert err["param"] == param and words in err["message"], err
