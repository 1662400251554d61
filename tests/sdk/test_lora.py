"""A LoRA adapter made by the test, served by name through the SDK's HTTP server."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from test_sdk import worker_env

from support.lora import build_lora_adapter
from support.server import start_api_server, stop_process

pytestmark = pytest.mark.engine

BASE = "tiny-qwen2.5-vl"


def runsync(base: str, job_input: dict) -> list:
    req = urllib.request.Request(
        base + "/runsync",
        data=json.dumps({"input": job_input}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        res = json.loads(resp.read())
    assert res["status"] == "COMPLETED", res
    return res["output"]


@pytest.fixture(scope="module")
def lora_server(tiny_model: str, tmp_path_factory: pytest.TempPathFactory):
    folder = build_lora_adapter(Path(tmp_path_factory.mktemp("lora")) / "tiny-lora")
    env = worker_env(ENABLE_LORA="true", MAX_LORA_RANK="8", LORA_MODULES=f"tiny-lora={folder}")
    proc, base = start_api_server(env)
    yield base, folder
    stop_process(proc)


def chat(model: str) -> dict:
    return {
        "openai_route": "/v1/chat/completions",
        "openai_input": {
            "model": model,
            "messages": [{"role": "user", "content": "Describe a login screen."}],
            "max_tokens": 12,
            "temperature": 0,
            "ignore_eos": True,
        },
    }


def test_an_adapter_is_listed_and_answers_by_its_name(lora_server):
    base, folder = lora_server
    (models,) = runsync(base, {"openai_route": "/v1/models"})
    by_id = {m["id"]: m for m in models["data"]}
    assert set(by_id) == {BASE, "tiny-lora"}
    assert by_id["tiny-lora"]["parent"] == BASE and by_id["tiny-lora"]["root"] == str(folder)

    (plain,) = runsync(base, chat(BASE))
    (tuned,) = runsync(base, chat("tiny-lora"))
    text = tuned["choices"][0]["message"]["content"]
    assert text != plain["choices"][0]["message"]["content"]  # the adapter changed the answer
    # a native job names the adapter the same way, and gets the same answer
    native = runsync(
        base,
        {
            "model": "tiny-lora",
            "messages": [{"role": "user", "content": "Describe a login screen."}],
            "max_tokens": 12,
            "temperature": 0,
            "ignore_eos": True,
            "stream": False,
        },
    )
    assert native[-1]["text"] == text


def test_an_unknown_model_is_refused_naming_what_is_served(lora_server):
    base, _ = lora_server
    (err,) = runsync(base, chat("tiny-lora-2"))
    assert err["error"]["code"] == "model_not_found"
    assert "`tiny-lora`" in err["error"]["message"]
    (native,) = runsync(base, {"model": "nope", "prompt": "x"})
    assert native["error"]["field"] == "model" and "tiny-lora" in native["error"]["message"]
