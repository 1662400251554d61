"""Through the runpod SDK: `python handler.py` local runs and the `--rp_serve_api` server."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from support.jobs import image_job
from support.server import clean_env, start_api_server, worker_env
from vlm_worker.serving.local_run import local_job
from vlm_worker.serving.main import parse_args

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.engine


def test_local_job_selection(tmp_path):
    (tmp_path / "test_input.json").write_text('{"input": {"a": 1}}')
    assert local_job(parse_args([]), tmp_path) == {"input": {"a": 1}}
    assert local_job(parse_args(["--test_input", '{"input": 2}']), tmp_path) == {"input": 2}
    assert local_job(parse_args(["--rp_serve_api"]), tmp_path) is None
    assert local_job(parse_args([]), tmp_path / "empty") is None


def test_python_handler_runs_test_input_for_real(tiny_model):
    """The SDK's own local mode skips generator handlers; ours runs the job."""
    proc = subprocess.run(
        [sys.executable, "handler.py"],
        cwd=ROOT,
        env=worker_env(WARMUP="false"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("chunk:", "result:"))]
    result = json.loads(lines[-1].removeprefix("result:"))
    assert result["status"] == "COMPLETED"
    job = json.loads((ROOT / "test_input.json").read_text())["input"]
    final = result["output"][-1]
    assert final["usage"]["completion_tokens"] <= job["max_tokens"]
    assert final["usage"]["completion_tokens"] > 0 and result["text"]
    assert len(lines) - 1 == len(result["output"]) >= 2


def test_python_handler_bad_test_input_exits_nonzero(tiny_model):
    bad = json.dumps({"input": {"messages": []}})
    proc = subprocess.run(
        [sys.executable, "handler.py", "--test_input", bad],
        cwd=ROOT,
        env=worker_env(WARMUP="false"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("result:")]
    result = json.loads(line.removeprefix("result:"))
    assert result["status"] == "FAILED"
    assert result["output"][0]["error"]["type"] == "invalid_input"


def test_bad_setting_stops_the_worker_before_the_engine():
    proc = subprocess.run(
        [sys.executable, "handler.py"],
        cwd=ROOT,
        env=worker_env(MAX_CONCURRENCY="lots"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "MAX_CONCURRENCY='lots' is not an integer" in proc.stderr
    assert "Initializing a V1 LLM engine" not in proc.stdout + proc.stderr


def test_unloadable_model_exits_nonzero_with_the_cause(tmp_path):
    proc = subprocess.run(
        [sys.executable, "handler.py"],
        cwd=ROOT,
        env=worker_env(MODEL_NAME=str(tmp_path / "no-such-model"), HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "failed to start" in proc.stderr and "no-such-model" in proc.stderr


def _post(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def api_server(tiny_model):
    # Images in a worker process (the default from 4 cores up), so the real entry point
    # runs that path and the SIGTERM check below covers its processes too.
    # None of the Makefile's variables either: `python handler.py --rp_serve_api` as the
    # README writes it, with the worker's own CPU defaults.
    proc, base = start_api_server(clean_env(PREPROCESS_PROCESSES="1"))
    yield base
    import psutil

    engine_procs = psutil.Process(proc.pid).children(recursive=True)
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    _, alive = psutil.wait_procs(engine_procs, timeout=30)
    for p in alive:
        p.kill()
    assert not alive, f"SIGTERM left engine or image processes running: {alive}"


def test_runsync_returns_real_streamed_output(api_server):
    res = _post(api_server + "/runsync", {"input": image_job(max_tokens=20, ignore_eos=True)})
    assert res["status"] == "COMPLETED"
    *body, final = res["output"]
    assert body and all(c["text"] for c in body)
    assert final["usage"]["completion_tokens"] == 20
    assert final["images"][0]["original_size"] == [320, 200]


def test_runsync_non_streamed(api_server):
    res = _post(
        api_server + "/runsync", {"input": image_job(max_tokens=8, ignore_eos=True, stream=False)}
    )
    assert res["status"] == "COMPLETED" and len(res["output"]) == 1
    assert res["output"][0]["usage"]["completion_tokens"] == 8


def test_runsync_bad_input_is_an_error_chunk(api_server):
    res = _post(api_server + "/runsync", {"input": {"messages": [{"role": "bot", "content": "x"}]}})
    (chunk,) = res["output"]
    assert chunk["error"]["type"] == "invalid_input"
    assert chunk["error"]["field"] == "messages[0].role"


def test_run_then_stream(api_server):
    job = _post(api_server + "/run", {"input": image_job(max_tokens=12, ignore_eos=True)})
    assert job["status"] == "IN_PROGRESS"
    res = _post(f"{api_server}/stream/{job['id']}", {})
    assert res["status"] == "COMPLETED"
    chunks = [s["output"] for s in res["stream"]]
    assert chunks[-1]["usage"]["completion_tokens"] == 12


WORKER_VLLM_SHAPES = {
    # RunPod worker-vllm's own Hub test, as it sends it
    "hub_prompt": {"prompt": "Write a short poem about artificial intelligence."},
    "native_chat": {
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "sampling_params": {"max_tokens": 10, "temperature": 0.7},
    },
    "native_batching": {
        "prompt": "Count:",
        "stream": True,
        "sampling_params": {"max_tokens": 12, "ignore_eos": True},
        "min_batch_size": 2,
        "max_batch_size": 4,
        "batch_size_growth_factor": 2,
    },
    "openai_chat": {
        "openai_route": "/v1/chat/completions",
        "openai_input": {
            "model": "tiny-qwen2.5-vl",
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 8,
        },
    },
    "openai_input_alone": {"openai_input": {"messages": [{"role": "user", "content": "Hi"}]}},
    "openai_completions": {
        "openai_route": "/v1/completions",
        "openai_input": {"prompt": "Once upon a time", "max_tokens": 8, "stream": True},
    },
    "route_body": {"route": "/v1/completions", "body": {"prompt": "Hi", "max_tokens": 4}},
    "models": {"openai_route": "/v1/models"},
}


@pytest.mark.parametrize("shape", list(WORKER_VLLM_SHAPES))
def test_the_job_shapes_runpods_worker_vllm_takes_are_answered(api_server, shape):
    res = _post(api_server + "/runsync", {"input": WORKER_VLLM_SHAPES[shape]})
    assert res["status"] == "COMPLETED", res
    output = res["output"]
    assert not any(isinstance(c, dict) and "error" in c for c in output), output
    if shape == "models":
        assert output[0]["data"][0]["id"] == "tiny-qwen2.5-vl"
    elif shape == "openai_completions":  # SSE text, as the gateway relays it
        events = [e for e in "".join(output).split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[0].removeprefix("data: "))["object"] == "text_completion"
    elif shape.startswith(("openai", "route")):
        (answer,) = output
        assert answer["choices"][0] and answer["usage"]["completion_tokens"] > 0
    else:
        assert output[-1]["usage"]["completion_tokens"] > 0
        assert "".join(c.get("text", "") for c in output)
    if shape == "native_batching":
        sizes = [len(c["text"]) for c in output[:-1]]
        assert len(sizes) >= 2, output  # streamed in batches of 2, then 4 tokens
