"""The OpenAI route against vLLM's own OpenAI server, same tiny model, same engine args.

Each request goes to ``python -m vllm.entrypoints.openai.api_server`` over HTTP and to this
worker's ``openai_route`` job; under greedy decoding the answers must agree token for
token: text, finish reason, usage, and every logprob. Streamed answers must reassemble to
the same message. Ids, timestamps and the model's name differ on purpose.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from support.jobs import collect, data_uri, screenshot
from support.server import ROOT, stop_process
from vlm_worker.adapters.vllm import serve_mm_kwargs_flags

pytestmark = pytest.mark.engine

SCHEMA = {
    "type": "object",
    "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 9999},
        "y": {"type": "integer", "minimum": 0, "maximum": 9999},
    },
    "required": ["x", "y"],
    "additionalProperties": False,
}


def engine_cli(env: dict[str, str], model: str) -> list[str]:
    """The session worker's engine arguments (conftest's environment) as vLLM's flags."""
    return [
        "--model",
        model,
        "--dtype",
        env["DTYPE"],
        "--max-model-len",
        env["MAX_MODEL_LEN"],
        "--max-num-seqs",
        env["MAX_NUM_SEQS"],
        "--enforce-eager",
        "--limit-mm-per-prompt",
        json.dumps({"image": 1, "video": 0}),
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "hermes",
        # 0.31+: per-request mm_processor_kwargs only with this flag (the worker takes
        # them within its pixel bounds, so the comparison needs the server to as well)
        *serve_mm_kwargs_flags(),
    ]


@pytest.fixture(scope="module")
def vllm_server(tiny_model: str) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "MODEL_NAME"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1"]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), *engine_cli(env, tiny_model)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM's server exited: {proc.stderr.read()[-3000:]}")
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("vLLM's server did not come up") from None
                time.sleep(1)
        yield base
    finally:
        stop_process(proc)


def vllm_answer(base: str, body: dict[str, Any], route: str = "/v1/chat/completions") -> Any:
    req = urllib.request.Request(
        base + route,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            raw = resp.read().decode()
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"vllm serve answered {exc.code}: {exc.read().decode()}") from None
    if not body.get("stream"):
        return json.loads(raw)
    return [
        json.loads(line.removeprefix("data: "))
        for line in raw.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


async def our_answer(worker: Any, body: dict[str, Any], route: str = "/v1/chat/completions") -> Any:
    job = {"openai_route": route, "openai_input": body}
    out = await collect(worker, job)
    if not body.get("stream"):
        (single,) = out
        return single
    text = "".join(out)
    return [
        json.loads(line.removeprefix("data: "))
        for line in text.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


def reassemble(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """A streamed answer as whole messages, one per choice, and the usage; streamed tool
    calls joined by their index (the name once, the arguments in pieces)."""
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    for chunk in chunks:
        usage = chunk.get("usage") or usage
        for c in chunk["choices"]:
            own = choices.setdefault(
                c["index"],
                {"content": "", "finish_reason": None, "logprobs": [], "tool_calls": {}},
            )
            own["content"] += c["delta"].get("content") or ""
            own["logprobs"] += (c.get("logprobs") or {}).get("content") or []
            own["finish_reason"] = c.get("finish_reason") or own["finish_reason"]
            for call in c["delta"].get("tool_calls") or []:
                mine = own["tool_calls"].setdefault(call["index"], ["", ""])
                function = call.get("function") or {}
                mine[0] += function.get("name") or ""
                mine[1] += function.get("arguments") or ""
    for own in choices.values():
        own["tool_calls"] = [tuple(own["tool_calls"][i]) for i in sorted(own["tool_calls"])]
    return {"choices": [choices[i] for i in sorted(choices)], "usage": usage}


def message(answer: dict[str, Any]) -> dict[str, Any]:
    return {
        "choices": [
            {
                "content": c["message"]["content"],
                "finish_reason": c["finish_reason"],
                "logprobs": (c.get("logprobs") or {}).get("content") or [],
                "tool_calls": [
                    (t["function"]["name"], t["function"]["arguments"])
                    for t in c["message"].get("tool_calls") or []
                ],
            }
            for c in sorted(answer["choices"], key=lambda c: c["index"])
        ],
        "usage": answer["usage"],
    }


def same_logprobs(ours: list[dict], theirs: list[dict]) -> None:
    assert [e["token"] for e in ours] == [e["token"] for e in theirs]
    assert [e["bytes"] for e in ours] == [e["bytes"] for e in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-3)
        assert [t["token"] for t in a["top_logprobs"]] == [t["token"] for t in b["top_logprobs"]]
        for x, y in zip(a["top_logprobs"], b["top_logprobs"], strict=True):
            assert x["logprob"] == pytest.approx(y["logprob"], abs=1e-3)


def image_messages() -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_uri(screenshot(448, 300, 7))}},
                {"type": "text", "text": "Where is the blue bar?"},
            ],
        }
    ]


TEXT = [{"role": "user", "content": "Say something about screens."}]
# strict: see test_tool_calls.TOOLS (vLLM 0.27+ pins arguments only for strict tools).
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "click",
            "strict": True,
            "description": "Click a point on the screen.",
            "parameters": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": 0, "maximum": 999},
                    "y": {"type": "integer", "minimum": 0, "maximum": 999},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "type_text",
            "strict": True,
            "parameters": {
                "type": "object",
                "properties": {"text": {"type": "string", "maxLength": 12}},
                "required": ["text"],
                "additionalProperties": False,
            },
        },
    },
]
TOOL_HISTORY = [
    {"role": "user", "content": "Click the blue bar."},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "click", "arguments": '{"x": 10, "y": 20}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "clicked"},
]
CASES = {
    "text": {"messages": TEXT, "max_tokens": 16},
    "image": {"messages": image_messages(), "max_tokens": 16},
    "json_schema": {
        "messages": image_messages(),
        "max_tokens": 120,
        "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}},
    },
    "regex": {"messages": TEXT, "max_tokens": 16, "structured_outputs": {"regex": "[a-z]{2,9}"}},
    "logprobs": {
        "messages": image_messages(),
        "max_tokens": 8,
        "logprobs": True,
        "top_logprobs": 3,
    },
    # this request's resize bounds reach both processors: fewer image tokens, same answer
    "mm_kwargs": {
        "messages": image_messages(),
        "max_tokens": 8,
        "mm_processor_kwargs": {"max_pixels": 40_000},
    },
    # several choices, sampled with a seed: the same choices, in the same order
    "n": {"messages": TEXT, "max_tokens": 8, "n": 3, "seed": 11, "temperature": 1.0},
    # tools: a named function and "required" constrain decoding to the functions'
    # schema and read the JSON back as calls; "auto" lets hermes look for <tool_call>
    "tool_named": {
        "messages": image_messages(),
        "max_tokens": 60,
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "click"}},
    },
    "tool_required": {
        "messages": TEXT,
        "max_tokens": 80,
        "tools": TOOLS,
        "tool_choice": "required",
    },
    "tool_auto": {"messages": TEXT, "max_tokens": 16, "tools": TOOLS},
    "tool_history": {"messages": TOOL_HISTORY, "max_tokens": 12, "tools": TOOLS},
    "template_kwargs": {
        "messages": image_messages(),
        "max_tokens": 8,
        "chat_template_kwargs": {"add_vision_id": True},  # "Picture 1: " before the image
    },
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("case", list(CASES))
async def test_the_route_answers_as_vllm_serve_does(worker, vllm_server, case, stream):
    body = {"temperature": 0.0, **CASES[case], "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    theirs, ours = vllm_answer(vllm_server, body), await our_answer(worker, body)
    if stream:
        theirs, ours = reassemble(theirs), reassemble(ours)
    else:
        assert ours["object"] == theirs["object"] == "chat.completion"
        assert set(ours["choices"][0]) >= {"index", "message", "finish_reason", "logprobs"}
        theirs, ours = message(theirs), message(ours)
    assert len(ours["choices"]) == len(theirs["choices"]) == body.get("n", 1)
    for mine, vllms in zip(ours["choices"], theirs["choices"], strict=True):
        assert (mine["content"] or "") == (vllms["content"] or "")
        assert mine["finish_reason"] == vllms["finish_reason"]
        assert mine["tool_calls"] == vllms["tool_calls"]
        same_logprobs(mine["logprobs"], vllms["logprobs"])
    usage_keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert {k: ours["usage"][k] for k in usage_keys} == {k: theirs["usage"][k] for k in usage_keys}
    first = ours["choices"][0]
    if case == "json_schema" and first["finish_reason"] == "stop":
        assert set(json.loads(first["content"])) == {"x", "y"}
    if case == "logprobs":
        assert len(first["logprobs"]) == ours["usage"]["completion_tokens"]
    if case == "n":  # sampled, the choices differ
        assert len({c["content"] for c in ours["choices"]}) > 1
    if case in ("tool_named", "tool_required"):
        # Random weights may pad the JSON with whitespace until max_tokens; both servers
        # then answer alike (compared above). A call that ended in time is whole JSON;
        # test_tool_calls shows calls that end, with sampling.
        calls = ours["choices"][0]["tool_calls"]
        if ours["usage"]["completion_tokens"] < body["max_tokens"]:
            assert calls and all(isinstance(json.loads(a), dict) for _, a in calls), calls
    if case == "mm_kwargs":
        plain = await our_answer(worker, {**CASES["image"], "max_tokens": 1})
        assert ours["usage"]["prompt_tokens"] < plain["usage"]["prompt_tokens"]
    if case == "template_kwargs":  # the variable reached the template: a longer prompt
        plain = await our_answer(worker, {**CASES["image"], "max_tokens": 1})
        assert ours["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]


PROMPT = "Once upon a time, a screen"
COMPLETIONS = {
    "default_length": {"prompt": PROMPT},
    "text": {"prompt": PROMPT, "max_tokens": 12},
    "logprobs": {"prompt": PROMPT, "max_tokens": 8, "logprobs": 2},
    "echo": {"prompt": PROMPT, "max_tokens": 5, "echo": True},
    "echo_logprobs": {"prompt": PROMPT, "max_tokens": 5, "echo": True, "logprobs": 1},
    "n": {"prompt": PROMPT, "max_tokens": 6, "n": 2, "seed": 5, "temperature": 1.0, "logprobs": 1},
}


def text_choices(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """A streamed completion as whole choices; logprobs' lists joined, offsets dropped
    (each side counts them from its own chunking)."""
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    for chunk in chunks:
        usage = chunk.get("usage") or usage
        for c in chunk["choices"]:
            own = choices.setdefault(
                c["index"],
                {
                    "index": c["index"],
                    "text": "",
                    "finish_reason": None,
                    "logprobs": {"tokens": [], "token_logprobs": [], "top_logprobs": []},
                },
            )
            own["text"] += c["text"]
            own["finish_reason"] = c.get("finish_reason") or own["finish_reason"]
            for key in own["logprobs"]:
                own["logprobs"][key] += (c.get("logprobs") or {}).get(key) or []
    return {"choices": [choices[i] for i in sorted(choices)], "usage": usage}


def close(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-3
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("case", list(COMPLETIONS))
async def test_completions_answer_as_vllm_serve_does(worker, vllm_server, case, stream):
    body = {"temperature": 0.0, **COMPLETIONS[case], "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    route = "/v1/completions"
    theirs = vllm_answer(vllm_server, body, route)
    ours = await our_answer(worker, body, route)
    if stream:
        theirs, ours = text_choices(theirs), text_choices(ours)
        if "logprobs" not in body:
            for c in theirs["choices"] + ours["choices"]:
                c["logprobs"] = None
    else:
        assert ours["object"] == theirs["object"] == "text_completion"
    assert len(ours["choices"]) == len(theirs["choices"]) == body.get("n", 1)
    for mine, vllms in zip(ours["choices"], theirs["choices"], strict=True):
        assert mine["index"] == vllms["index"]
        assert mine["text"] == vllms["text"]
        if body.get("echo"):
            assert mine["text"].startswith(PROMPT)
        assert mine["finish_reason"] == vllms["finish_reason"]
        assert close(mine["logprobs"], vllms["logprobs"]), (mine["logprobs"], vllms["logprobs"])
    usage_keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert {k: ours["usage"][k] for k in usage_keys} == {k: theirs["usage"][k] for k in usage_keys}
