"""The OpenAI-compatible route through the real engine, checked with the `openai` package's
own response models, and driven by the real `openai` client through a gateway shim."""

from __future__ import annotations

import json

import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from support.jobs import collect, data_uri, screenshot
from support.openai_shim import OpenAIShim
from vlm_worker.contract.errors import InvalidInput
from vlm_worker.contract.openai_shapes import (
    field_aliases,
    from_worker_error,
    parse_request,
    to_native,
)

MODEL = "tiny-qwen2.5-vl"


def body(**extra):
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}], **extra}


def image_body(**extra):
    return {
        "model": MODEL,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in the image?"},
                    {"type": "image_url", "image_url": {"url": data_uri(screenshot(640, 360))}},
                ],
            }
        ],
        **extra,
    }


def route(payload, route_="/v1/chat/completions"):
    job = {"openai_route": route_}
    if payload is not None:
        job["openai_input"] = payload
    return job


def sse_events(chunks: list[str]) -> list[str]:
    text = "".join(chunks)
    assert text.endswith("data: [DONE]\n\n")
    events = text.split("\n\n")
    assert events[-1] == ""
    assert all(e.startswith("data: ") for e in events[:-1])
    return [e.removeprefix("data: ") for e in events[:-1]]


# ------------------------------------------------------------------ unit
def test_to_native_maps_fields():
    req = parse_request(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "sys", "name": "x"},
                {"role": "user", "content": "hi"},
            ],
            "max_completion_tokens": 9,
            "temperature": 0.3,
            "stop": "\n",
            "top_k": 4,
            "logit_bias": {"5": 1.5},
            "stream": True,
            "user": "u1",
        }
    )
    native = to_native(req)
    assert native["messages"][0] == {"role": "system", "content": "sys"}
    assert native["max_tokens"] == 9 and native["top_k"] == 4 and native["stream"] is True
    assert native["logit_bias"] == {"5": 1.5} and "user" not in native


@pytest.mark.parametrize(
    ("payload", "field", "words"),
    [
        ({"functions": []}, "functions", "function calling"),
        ({"top_logprobs": 2}, "top_logprobs", "requires logprobs: true"),
        (
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
            "structured_outputs",
            "not both",
        ),
        (
            {"response_format": {"type": "json_schema"}},
            "response_format.json_schema",
            "required",
        ),
        ({"max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens", "not both"),
    ],
)
def test_unsupported_requests_are_refused_by_name(payload, field, words):
    with pytest.raises(InvalidInput) as info:
        to_native(parse_request(body(**payload)))
    assert info.value.field == field and words in info.value.message


def test_structured_output_and_logprobs_map_as_vllm_serve_maps_them():
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    as_schema = {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}
    cases = [
        ({"response_format": as_schema}, {"json": schema}),
        ({"response_format": {"type": "json_object"}}, {"json_object": True}),
        ({"response_format": {"type": "text"}}, None),
        ({"structured_outputs": {"regex": "[0-9]+"}}, {"regex": "[0-9]+"}),
    ]
    for extra, structured in cases:
        native = to_native(parse_request(body(**extra)))
        assert native.get("structured_outputs") == structured
    assert to_native(parse_request(body(logprobs=True)))["logprobs"] == 0
    assert to_native(parse_request(body(logprobs=True, top_logprobs=3)))["logprobs"] == 3
    assert "logprobs" not in to_native(parse_request(body(logprobs=False)))


def test_errors_name_the_field_as_the_request_named_it():
    req = parse_request(body(response_format={"type": "json_object"}, logprobs=True))
    aliases = field_aliases(req)
    err = {"type": "invalid_input", "message": "m", "field": "sampling_params.structured_outputs"}
    assert from_worker_error(err, aliases)["error"]["param"] == "response_format"
    err["field"] = "sampling_params.logprobs"
    assert from_worker_error(err, aliases)["error"]["param"] == "logprobs"
    err["field"] = "sampling_params.structured_outputs.regex"  # vLLM's own field
    assert from_worker_error(err)["error"]["param"] == "structured_outputs.regex"


# ------------------------------------------------------------- real engine


@pytest.mark.engine
async def test_non_streamed_text_only(worker):
    (out,) = await collect(worker, route(body(max_tokens=7, ignore_eos=True)))
    completion = ChatCompletion.model_validate(out)
    assert completion.object == "chat.completion" and completion.model == MODEL
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 7
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 7


@pytest.mark.engine
async def test_non_streamed_with_an_image(worker):
    (out,) = await collect(worker, route(image_body(max_completion_tokens=5, ignore_eos=True)))
    completion = ChatCompletion.model_validate(out)
    # 640x360 resizes to 644x364: 23*13 image tokens beyond the text
    assert completion.usage.prompt_tokens > 23 * 13
    assert completion.usage.completion_tokens == 5


@pytest.mark.engine
@pytest.mark.parametrize("include_usage", [False, True])
async def test_streaming(worker, include_usage):
    payload = image_body(
        max_tokens=30, ignore_eos=True, stream=True, stream_options={"include_usage": include_usage}
    )
    chunks = await collect(worker, route(payload))
    assert all(isinstance(c, str) for c in chunks)
    assert len(chunks) >= 3, "text should arrive in several batches"
    events = sse_events(chunks)
    assert events[-1] == "[DONE]"
    parsed = [ChatCompletionChunk.model_validate(json.loads(e)) for e in events[:-1]]
    assert len({p.id for p in parsed}) == 1
    assert parsed[0].choices[0].delta.role == "assistant"
    content = "".join(p.choices[0].delta.content or "" for p in parsed if p.choices)
    assert content
    finishes = [p.choices[0].finish_reason for p in parsed if p.choices]
    assert finishes[-1] == "length" and finishes.count("length") == 1
    if include_usage:
        assert parsed[-1].choices == [] and parsed[-1].usage.completion_tokens == 30
    else:
        assert all(p.usage is None for p in parsed)


@pytest.mark.engine
async def test_models_route(worker):
    (out,) = await collect(worker, route(None, "/v1/models"))
    assert out["object"] == "list" and out["data"][0]["id"] == MODEL
    from openai.types import Model

    Model.model_validate(out["data"][0])


@pytest.mark.engine
@pytest.mark.parametrize(
    ("job", "param", "code"),
    [
        (route(body(), "/v1/embeddings"), "openai_route", 404),
        (route(body(model="gpt-4o")), "model", "model_not_found"),
        (route(body(n=99)), "n", 400),  # above MAX_N
        (route(body(n=0)), "n", 400),
        (route(body(temperature=-1)), "temperature", 400),
        (route({"messages": []}), "messages", 400),
        (route(body(colour="red")), "colour", 400),
        (route("not a body"), "openai_input", 400),
        (
            route(
                {
                    "model": MODEL,
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}
                            ],
                        }
                    ],
                }
            ),
            "messages[0].content[0].image_url.url",
            400,
        ),
    ],
)
async def test_bad_requests_get_openai_errors(worker, job, param, code):
    (out,) = await collect(worker, job)
    err = out["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["param"], err["code"]) == (param, code), err
    assert err["type"] == "invalid_request_error" and err["message"]


@pytest.mark.engine
def test_real_openai_client_through_a_gateway_shim(worker):
    with OpenAIShim(worker.handler) as shim:
        client = openai.OpenAI(base_url=shim.base_url, api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == [MODEL]

        res = client.chat.completions.create(
            model=MODEL,
            messages=image_body()["messages"],
            max_tokens=6,
            extra_body={"ignore_eos": True},
        )
        assert res.usage.completion_tokens == 6 and res.choices[0].message.content

        stream = client.chat.completions.create(
            model=MODEL,
            messages=image_body()["messages"],
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        parts = list(stream)
        assert parts[0].choices[0].delta.role == "assistant"
        assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
        assert parts[-1].usage.completion_tokens == 20

        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="nope", messages=body()["messages"])
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=body()["messages"], n=99)
        assert "MAX_N=8" in info.value.message


@pytest.mark.engine
def test_openai_client_reads_structured_output_and_logprobs(worker):
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["x"],
        "additionalProperties": False,
    }
    with OpenAIShim(worker.handler) as shim:
        client = openai.OpenAI(base_url=shim.base_url, api_key="unused", max_retries=0)
        # Random weights may pad with whitespace (which the schema allows) until
        # max_tokens; sampling with a seed closes the object within a few tries.
        finished = []
        for seed in range(4):
            res = client.chat.completions.create(
                model=MODEL,
                messages=image_body()["messages"],
                max_tokens=120,
                temperature=1.0,
                seed=seed,
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "point", "schema": schema, "strict": True},
                },
            )
            if res.choices[0].finish_reason == "stop":
                finished.append(json.loads(res.choices[0].message.content))
        assert finished, "no seed closed the JSON object"
        for answer in finished:
            jsonschema.validate(answer, schema)

        res = client.chat.completions.create(
            model=MODEL,
            messages=body()["messages"],
            max_tokens=5,
            logprobs=True,
            top_logprobs=2,
            extra_body={"ignore_eos": True},
        )
        content = res.choices[0].logprobs.content
        assert len(content) == 5 == res.usage.completion_tokens
        assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)

        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model=MODEL,
                messages=body()["messages"],
                extra_body={"structured_outputs": {"regex": "(unclosed"}},
            )
        assert info.value.body["param"] == "structured_outputs"
