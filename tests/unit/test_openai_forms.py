"""The job forms that carry OpenAI requests, and the completions route's shapes."""

from __future__ import annotations

import pytest

from vlm_worker.contract.errors import InvalidInput
from vlm_worker.contract.openai_shapes import (
    CompletionFormatter,
    completion_to_native,
    parse_completion_request,
)
from vlm_worker.serving.openai_route import openai_request


@pytest.mark.parametrize(
    ("job_input", "expected"),
    [
        ({"openai_route": "/v1/models"}, ("/v1/models", None)),
        ({"openai_input": {"messages": []}}, ("/v1/chat/completions", {"messages": []})),
        (
            {"openai_route": "/v1/completions", "openai_input": {"prompt": "a"}},
            ("/v1/completions", {"prompt": "a"}),
        ),
        ({"route": "/v1/models", "method": "GET"}, ("/v1/models", None)),
        (
            {"route": "/v1/completions", "body": {"prompt": "a"}},
            ("/v1/completions", {"prompt": "a"}),
        ),
        ({"messages": []}, None),
        ({"prompt": "a"}, None),
        ("text", None),
    ],
)
def test_openai_forms_are_recognised(job_input, expected):
    assert openai_request(job_input) == expected


@pytest.mark.parametrize(
    ("job_input", "field"),
    [
        ({"openai_route": "/v1/models", "messages": []}, "messages"),
        ({"route": "/v1/models", "method": "DELETE"}, "method"),
        ({"route": "/v1/models", "stream": True}, "stream"),
    ],
)
def test_mixed_forms_are_refused_naming_the_key(job_input, field):
    with pytest.raises(InvalidInput) as info:
        openai_request(job_input)
    assert info.value.field == field


def test_completions_map_onto_a_raw_prompt_job():
    req = parse_completion_request({"prompt": ["Once"], "logprobs": 2, "echo": True, "seed": 1})
    assert completion_to_native(req) == {
        "prompt": "Once",
        "stream": False,
        "max_tokens": 16,  # the route's default, as OpenAI's and vLLM's
        "seed": 1,
        "logprobs": 2,
        "prompt_logprobs": 2,
    }
    for body, field in [
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": "a", "suffix": "b"}, "suffix"),
        ({"prompt": "a", "best_of": 2}, "best_of"),
        ({"prompt": "a", "n": 0}, "n"),
        ({"prompt": ""}, "prompt"),
    ]:
        with pytest.raises(InvalidInput) as info:
            completion_to_native(parse_completion_request(body))
        assert info.value.field == field, body


def entry(token: str, logprob: float | None, *alts: tuple[str, float]) -> dict:
    top = None if logprob is None else [{"token": t, "logprob": lp, "bytes": []} for t, lp in alts]
    return {"token": token, "logprob": logprob, "bytes": [], "top_logprobs": top}


def test_completion_logprobs_echo_the_prompt_and_give_one_more_alternative():
    req = parse_completion_request({"prompt": "ab", "logprobs": 1, "echo": True, "stream": True})
    fmt = CompletionFormatter("m", req, "ab")
    first = {
        "text": "c",
        "prompt_logprobs": [entry("a", None), entry("b", -1.0, ("b", -1.0), ("x", -0.5))],
        "logprobs": [entry("c", -0.1, ("c", -0.1), ("d", -2.0), ("e", -3.0))],
    }
    (choice,) = fmt.chunk(first)["choices"]
    assert choice["text"] == "abc"
    assert choice["logprobs"] == {
        "text_offset": [0, 1, 2],
        "token_logprobs": [None, -1.0, -0.1],
        "tokens": ["a", "b", "c"],
        "top_logprobs": [None, {"b": -1.0, "x": -0.5}, {"c": -0.1, "d": -2.0}],
    }
    (last,) = fmt.chunk({"text": "de", "logprobs": [entry("de", -0.2)], "finish_reason": "length"})[
        "choices"
    ]
    # the prompt once; offsets go on from the generated text's length, as vllm serve counts
    assert last["text"] == "de" and last["finish_reason"] == "length"
    assert last["logprobs"]["text_offset"] == [1]


def test_chat_template_kwargs_pass_through_and_reserved_ones_are_refused():
    from vlm_worker.contract.job_schema import parse_job
    from vlm_worker.contract.openai_shapes import parse_request, to_native

    body = {"messages": [{"role": "user", "content": "hi"}]}
    native = to_native(parse_request({**body, "chat_template_kwargs": {"add_vision_id": True}}))
    assert native["chat_template_kwargs"] == {"add_vision_id": True}
    assert parse_job(native).chat_template_kwargs == {"add_vision_id": True}
    with pytest.raises(InvalidInput) as info:
        parse_job({**body, "chat_template_kwargs": {"tokenize": True}})
    assert info.value.field == "chat_template_kwargs" and "tokenize" in info.value.message


async def test_a_stream_that_fails_midway_ends_with_a_framed_error_and_done(processor):
    """After the first SSE event the gateway has sent its status: the error must travel as
    an event, and the stream must still end with [DONE]."""
    import json

    from support.fakes import ScriptedEngine, scripted_info, tok
    from vlm_worker.config.settings import load_worker_settings
    from vlm_worker.contract.errors import EngineError
    from vlm_worker.pipeline.runner import JobRunner
    from vlm_worker.serving.openai_route import OpenAIRoute

    script = [tok("a", prompt=3), tok("b"), tok("c"), EngineError("the engine failed")]
    runner = JobRunner(ScriptedEngine(scripted_info(processor), script), load_worker_settings({}))
    route = OpenAIRoute(runner)
    for path, body in [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"prompt": "hi"}),
    ]:
        out = [c async for c in route.handle("j", path, {**body, "stream": True})]
        assert all(isinstance(c, str) for c in out), out
        *_, last = "".join(out).strip().split("\n\n")
        events = "".join(out).strip().split("\n\n")
        assert last == "data: [DONE]"
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert error["type"] == "server_error" and "engine failed" in error["message"]
