"""Constrained decoding and log probabilities through the real engine, on native jobs.

Random weights say nothing about quality, but a constraint makes the output checkable:
whatever the model would have said, the text must match the schema, regex or choices.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from support.jobs import collect, data_uri, image_job, screenshot

pytestmark = pytest.mark.engine

SCHEMA = {
    "type": "object",
    "properties": {"x": {"type": "integer"}, "label": {"type": "string", "maxLength": 8}},
    "required": ["x", "label"],
    "additionalProperties": False,
}


def job(structured: dict | None = None, **extra) -> dict:
    extra = {"max_tokens": 48, "stream": False, **extra}
    out = image_job(data_uri(screenshot(320, 200, 4)), **extra)
    if structured is not None:
        out["sampling_params"] = {"structured_outputs": structured}
    return out


def same_text(tokens: str, text: str, special: re.Pattern[str] | None = None) -> bool:
    """A token that ends inside a character is reported as U+FFFD on its own, as vLLM's
    server reports it, while the text holds the whole character (random weights make
    such tokens common); and a special token the sampled answer holds (``special``) has
    its logprob entry but no text, as the text skips special tokens."""
    if special is not None:
        tokens = special.sub("", tokens)
    return tokens.replace("\ufffd", "") == text.replace("\ufffd", "")


async def final_of(worker, job_input) -> dict:
    chunks = await collect(worker, job_input)
    assert "error" not in chunks[-1], chunks[-1]
    return chunks[-1]


async def test_a_json_schema_constrains_the_answer(worker):
    final = await final_of(worker, job({"json": SCHEMA}, temperature=1.0, seed=3))
    assert final["finish_reason"] == "stop", final  # the schema closed the object
    jsonschema.validate(json.loads(final["text"]), SCHEMA)


async def test_regex_choice_and_json_object(worker):
    final = await final_of(worker, job({"regex": "[a-f]{3}-[0-9]{2}"}))
    assert re.fullmatch("[a-f]{3}-[0-9]{2}", final["text"]), final["text"]
    final = await final_of(worker, job({"choice": ["left", "right", "up"]}))
    assert final["text"] in ("left", "right", "up")
    final = await final_of(worker, job({"json_object": True}, max_tokens=24, seed=1))
    assert final["text"].startswith("{")


async def test_a_constraint_the_engine_cannot_compile_is_invalid_input(worker):
    (chunk,) = await collect(worker, job({"regex": "(unclosed"}))
    err = chunk["error"]
    assert err["type"] == "invalid_input", err
    assert err["field"] == "sampling_params.structured_outputs", err
    # the worker serves on
    assert "error" not in (await collect(worker, job({"choice": ["a", "b"]})))[-1]


async def test_logprobs_per_token_non_streamed_and_streamed(worker):
    final = await final_of(worker, job(logprobs=3, ignore_eos=True, max_tokens=12))
    entries = final["logprobs"]
    assert len(entries) == final["usage"]["completion_tokens"] == 12
    special = worker.engine.info.special_tokens
    assert same_text("".join(e["token"] for e in entries), final["text"], special)
    for e in entries:
        # vLLM's step: the token itself, then the 3 most likely (it may be one of them)
        top = e["top_logprobs"]
        assert e["logprob"] <= 0 and len(top) in (3, 4) and top[0]["token"] == e["token"]
        assert e["bytes"] == list(e["token"].encode("utf-8", "replace"))
        assert max(t["logprob"] for t in top) >= e["logprob"] - 1e-6

    streamed = await collect(
        worker,
        image_job(data_uri(screenshot(320, 200, 4)), max_tokens=12, ignore_eos=True, logprobs=0),
    )
    tokens = [e for c in streamed for e in c.get("logprobs", [])]
    assert len(tokens) == 12
    assert all([t["token"] for t in e["top_logprobs"]] == [e["token"]] for e in tokens)
    assert same_text(
        "".join(e["token"] for e in tokens), "".join(c["text"] for c in streamed), special
    )
    # no logprobs asked: none sent
    plain = await final_of(worker, job(max_tokens=4))
    assert "logprobs" not in plain


async def test_a_raw_prompt_reaches_the_engine_without_the_chat_template(worker):
    """worker-vllm's ``{"prompt": ...}`` job: the text as it is, with its tokens' logprobs."""
    text = "Write a short poem about artificial intelligence."
    final = await final_of(
        worker,
        {
            "prompt": text,
            "max_tokens": 6,
            "ignore_eos": True,
            "stream": False,
            "prompt_logprobs": 1,
        },
    )
    ids = worker.engine.info.tokenizer.encode(text)
    assert final["usage"]["prompt_tokens"] == len(ids)  # no template around it
    prompt_entries = final["prompt_logprobs"]
    assert len(prompt_entries) == len(ids) and prompt_entries[0]["logprob"] is None
    assert all(e["logprob"] <= 0 for e in prompt_entries[1:])
    # the same text as one user message, through the template, is longer
    templated = await final_of(
        worker, {"prompt": text, "apply_chat_template": True, "max_tokens": 2, "stream": False}
    )
    assert templated["usage"]["prompt_tokens"] > len(ids)


async def test_logprobs_above_the_engines_cap_name_the_field(worker):
    """MAX_LOGPROBS (vLLM's default: 20) caps them, as vllm serve does."""
    (chunk,) = await collect(worker, job(logprobs=21, max_tokens=2))
    assert chunk["error"]["type"] == "invalid_input"
    assert chunk["error"]["field"] == "sampling_params.logprobs", chunk
    assert "20" in chunk["error"]["message"]
