"""The job schema: accepted shapes, and errors that name the field."""

from __future__ import annotations

import json

import pytest

from vlm_worker.contract.errors import InvalidInput, error_chunk
from vlm_worker.contract.job_schema import ImagePart, ImageURLPart, parse_job

IMG = "data:image/png;base64,iVBORw0KGgo="


def user(*parts):
    return {"role": "user", "content": list(parts)}


def test_string_and_part_content_and_image_forms():
    job = parse_job(
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                user(
                    {"type": "text", "text": "hi"},
                    {"type": "image_url", "image_url": {"url": IMG, "detail": "high"}},
                    {"type": "image_url", "image_url": "https://example.com/a.png"},
                    {"type": "image", "image": "aGVsbG8="},
                ),
            ]
        }
    )
    parts = job.messages[1].content
    assert isinstance(parts[1], ImageURLPart) and parts[1].source == IMG
    assert parts[2].source == "https://example.com/a.png"
    assert isinstance(parts[3], ImagePart)
    assert [f for f, _ in job.image_sources()] == [
        "messages[1].content[1].image_url.url",
        "messages[1].content[2].image_url.url",
        "messages[1].content[3].image",
    ]
    assert job.stream is True


def test_sampling_flat_nested_and_alias():
    flat = parse_job(
        {
            "messages": [user({"type": "text", "text": "x"})],
            "max_new_tokens": 7,
            "temperature": 0,
            "stop": "END",
        }
    )
    assert flat.sampling_params.set_values() == {
        "max_tokens": 7,
        "temperature": 0.0,
        "stop": ["END"],
    }
    nested = parse_job(
        {
            "messages": [{"role": "user", "content": "x"}],
            "sampling_params": {"max_tokens": 3, "top_k": 5, "seed": 1},
            "stream": False,
        }
    )
    assert nested.sampling_params.set_values() == {"max_tokens": 3, "top_k": 5, "seed": 1}
    assert nested.stream is False


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        ({}, "messages", "Field required"),
        ({"messages": []}, "messages", "at least 1"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "'system'"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "Field required"),
        ({"messages": [user({"type": "video", "video": "x"})]}, "messages[0].content[0]", "type"),
        ({"messages": [user({"type": "text"})]}, "messages[0].content[0].text", "Field required"),
        (
            {"messages": [user({"type": "text", "text": 5})]},
            "messages[0].content[0].text",
            "string",
        ),
        (
            {"messages": [user({"type": "image_url", "image_url": {}})]},
            "messages[0].content[0].image_url.url",
            "Field required",
        ),
        (
            {"messages": [user({"type": "image", "image": ""})]},
            "messages[0].content[0].image",
            "at least 1",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "colour": 1}, "colour", "unknown field"),
        (
            {"messages": [{"role": "user", "content": "x", "name": "a"}]},
            "messages[0].name",
            "unknown field",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            "sampling_params.max_tokens",
            "greater than or equal to 1",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "temperature": -1},
            "sampling_params.temperature",
            "greater than or equal to 0",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "top_p": 1.5},
            "sampling_params.top_p",
            "less than or equal to 1",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "stop": [""]},
            "sampling_params.stop",
            "must not be empty",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 17},
            "sampling_params.stop",
            "at most 16",
        ),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 5,
                "sampling_params": {"max_tokens": 6},
            },
            "input",
            "both at the top level",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "sampling_params": {"temp": 1}},
            "sampling_params.temp",
            "unknown field",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "stream": "yes please"},
            "stream",
            "boolean",
        ),
        ({"messages": "hello"}, "messages", "list"),
    ],
)
def test_bad_input_names_the_field(data, field, words):
    with pytest.raises(InvalidInput) as info:
        parse_job(data)
    err = info.value
    assert err.field == field, err.message
    assert words in err.message
    assert err.message.startswith(field)


@pytest.mark.parametrize("data", [None, [], "text", 3])
def test_input_must_be_an_object(data):
    with pytest.raises(InvalidInput, match="input must be a JSON object"):
        parse_job(data)


def test_error_shape_is_json_even_through_str():
    """The runpod SDK reports a failed stream as str(output['error']): keep it parseable."""
    chunk = error_chunk(InvalidInput("messages: bad", field="messages"))
    assert chunk == {
        "error": {"type": "invalid_input", "message": "messages: bad", "field": "messages"}
    }
    assert json.loads(str(chunk["error"])) == chunk["error"]


def test_structured_outputs_take_exactly_one_constraint():
    job = parse_job(
        {"messages": [{"role": "user", "content": "hi"}], "structured_outputs": {"json": {}}}
    )
    assert job.sampling_params.set_values() == {"structured_outputs": {"json": {}}}
    job = parse_job(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "sampling_params": {"structured_outputs": {"choice": ["yes", "no"]}, "logprobs": 2},
        }
    )
    assert job.sampling_params.set_values() == {
        "logprobs": 2,
        "structured_outputs": {"choice": ["yes", "no"]},
    }
    for bad, words in [
        ({}, "got none"),
        ({"regex": "a", "choice": ["a"]}, "got regex, choice"),
        ({"choice": []}, "at least 1"),
        ({"regex": ""}, "at least 1 character"),
        ({"json_object": False}, "True"),
        ({"xml": "<a/>"}, "unknown field"),
    ]:
        with pytest.raises(InvalidInput) as info:
            parse_job({"messages": [{"role": "user", "content": "hi"}], "structured_outputs": bad})
        assert info.value.field.startswith("sampling_params.structured_outputs"), info.value
        assert words in info.value.message, info.value.message


def test_logprobs_are_not_negative():
    # the upper bound is the engine's MAX_LOGPROBS (test_structured_and_logprobs)
    for bad in (-1, -5):
        with pytest.raises(InvalidInput) as info:
            parse_job({"messages": [{"role": "user", "content": "hi"}], "logprobs": bad})
        assert info.value.field == "sampling_params.logprobs"


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"stream": "yes"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"max_tokens": "5"}, "sampling_params.max_tokens"),
        ({"temperature": "0.5"}, "sampling_params.temperature"),
        ({"sampling_params": {"ignore_eos": "true"}}, "sampling_params.ignore_eos"),
    ],
)
def test_a_string_is_neither_a_boolean_nor_a_number(extra, field):
    with pytest.raises(InvalidInput) as info:
        parse_job({"messages": [{"role": "user", "content": "hi"}], **extra})
    assert info.value.field == field, info.value
    # numbers and booleans as JSON gives them still parse; logit_bias keys are strings
    job = parse_job(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "temperature": 1,
            "stream": False,
            "logit_bias": {"5": 1},
        }
    )
    assert job.sampling_params.temperature == 1.0 and job.sampling_params.logit_bias == {5: 1.0}


@pytest.mark.parametrize(
    ("job", "field"),
    [
        ({"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
            "messages[0].content[0].text",
        ),
        ({"prompt": "x\ud83d"}, "prompt"),
    ],
)
def test_invalid_unicode_is_invalid_input(job, field):
    with pytest.raises(InvalidInput) as info:
        parse_job(job)
    assert info.value.field == field and "lone surrogate" in info.value.message
    parse_job({"messages": [{"role": "user", "content": "é 😀 ✓"}]})  # real characters pass


def test_the_openai_route_takes_no_strings_for_booleans_either():
    from vlm_worker.contract.openai_shapes import parse_request

    with pytest.raises(InvalidInput) as info:
        parse_request({"messages": [{"role": "user", "content": "hi"}], "stream": "true"})
    assert info.value.field == "stream"


def test_tool_turns_in_the_history():
    calls = [{"id": "c1", "type": "function", "function": {"name": "click", "arguments": "{}"}}]
    job = parse_job(
        {
            "messages": [
                {"role": "user", "content": "go"},
                {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "tool", "tool_call_id": "c1", "content": "done"},
            ]
        }
    )
    assert job.messages[1].tool_calls[0].function.name == "click"
    for bad, words in [
        ({"role": "tool", "content": "done"}, "tool_call_id: required"),
        ({"role": "user", "content": "x", "tool_call_id": "c1"}, "only a tool message"),
        ({"role": "user", "content": "x", "tool_calls": calls}, "only an assistant message"),
        ({"role": "user", "content": None}, "null only in an assistant message"),
    ]:
        with pytest.raises(InvalidInput) as info:
            parse_job({"messages": [bad]})
        assert info.value.field.startswith("messages[0]") and words in info.value.message
