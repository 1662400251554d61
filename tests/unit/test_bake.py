"""builder/bake_model.py against a local model folder, and a worker started from its output.

Nothing can be downloaded here, so the bake runs its local-folder path (the same
allow-patterns and manifest as a hub download) against the tiny model; then the real
worker starts from that snapshot with HF_HUB_OFFLINE=1 and serves a job.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.jobs import image_job
from vlm_worker.config.model_source import read_manifest, snapshot_problems

ROOT = Path(__file__).resolve().parents[2]
BAKE = ROOT / "builder" / "bake_model.py"


def bake(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BAKE), *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def baked(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model baked under a hub-like name; returns the manifest's path."""
    dest = tmp_path_factory.mktemp("models")
    proc = bake(tiny_model, "--dest", str(dest), "--name", "tiny/baked-test")
    assert proc.returncode == 0, proc.stderr
    return dest / "manifest.json"


def test_bake_writes_snapshot_and_manifest(baked, tiny_model):
    data = json.loads(baked.read_text())
    assert data["model_name"] == "tiny/baked-test" and data["path"] == "tiny--baked-test"
    assert data["source"] == "local" and data["commit"] is None and data["format"] == 1
    folder = baked.parent / data["path"]
    copied = sorted(p.name for p in folder.iterdir())
    expected = sorted(
        p.name
        for p in Path(tiny_model).iterdir()
        if p.suffix in (".json", ".safetensors", ".jinja")
    )
    assert copied == expected
    assert data["files"] == len(copied)
    assert data["bytes"] == sum(p.stat().st_size for p in folder.iterdir())
    manifest = read_manifest(baked)
    assert manifest is not None and manifest.path == folder.resolve()
    assert snapshot_problems(manifest.path) == []


def test_bake_copies_only_what_serving_needs(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / ".git").mkdir()
    wanted = ["config.json", "model.safetensors", "tokenizer.model", "merges.txt",
              "chat_template.jinja", "modeling_x.py", "sub/preprocessor_config.json"]  # fmt: skip
    unwanted = ["pytorch_model.bin", "README.md", "model.onnx", ".git/config.json", "img.png"]
    for name in wanted + unwanted:
        (src / name).write_text("{}")
    proc = bake(str(src), "--dest", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "out" / "src"
    got = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert got == sorted(wanted)


def test_bake_refuses_an_unservable_folder_and_writes_no_manifest(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}})
    )
    (src / "model-1.safetensors").write_text("x")
    proc = bake(str(src), "--dest", str(tmp_path / "out"), "--name", "org/broken")
    assert proc.returncode == 1
    assert (
        "error: org/broken: the snapshot cannot be served: weight shards missing: " in proc.stderr
    )
    assert "model-2.safetensors" in proc.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_bake_never_overwrites_its_source(tmp_path):
    src = tmp_path / "models" / "src"
    src.mkdir(parents=True)
    (src / "config.json").write_text("{}")
    proc = bake(str(src), "--dest", str(tmp_path / "models"))
    assert proc.returncode == 1 and "would overwrite the source folder" in proc.stderr
    assert (src / "config.json").is_file()


def test_token_comes_from_the_secret_file_then_the_environment(tmp_path, monkeypatch):
    from test_deploy import load_bake_module

    module = load_bake_module()
    secret = tmp_path / "HF_TOKEN"
    secret.write_text("hf_from_secret\n")
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert module.read_token(secret) == "hf_from_secret"
    assert module.read_token(tmp_path / "absent") == "hf_from_env"
    secret.write_text("")
    assert module.read_token(secret) == "hf_from_env"
    monkeypatch.delenv("HF_TOKEN")
    assert module.read_token(None) is None


def worker_env(**extra: str) -> dict[str, str]:
    drop = ("MODEL_NAME", "MODEL_REVISION", "RUNPOD_WEBHOOK_GET_JOB", "BAKED_MODEL_MANIFEST")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    return env


def test_unknown_model_offline_fails_fast_naming_model_name(tmp_path):
    proc = subprocess.run(
        [sys.executable, "handler.py"],
        cwd=ROOT,
        env=worker_env(
            MODEL_NAME="someorg/not-cached-model",
            HF_HUB_OFFLINE="1",
            HF_HUB_CACHE=str(tmp_path / "empty-cache"),
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert (
        "MODEL_NAME='someorg/not-cached-model' is not (completely) in the Hugging Face cache"
        in proc.stderr
    )
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in proc.stderr
    assert "Initializing a V1 LLM engine" not in proc.stdout + proc.stderr


@pytest.mark.engine
def test_worker_serves_the_baked_snapshot_offline(baked, tmp_path):
    """End to end: the manifest, offline, the real engine, one image job."""
    job = {"input": image_job(max_tokens=6, ignore_eos=True, stream=False)}
    proc = subprocess.run(
        [sys.executable, "handler.py", "--test_input", json.dumps(job)],
        cwd=ROOT,
        env=worker_env(
            BAKED_MODEL_MANIFEST=str(baked),
            HF_HUB_OFFLINE="1",
            HF_HUB_CACHE=str(tmp_path / "empty-cache"),  # nothing may come from a cache
            WARMUP="false",
        ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("result:")]
    result = json.loads(line.removeprefix("result:"))
    assert result["status"] == "COMPLETED"
    (final,) = result["output"]
    assert final["model"] == "tiny/baked-test"
    assert final["usage"]["completion_tokens"] == 6
    snapshot = str(baked.parent.resolve() / "tiny--baked-test")
    assert "serving the model baked into the image (offline)" in proc.stderr
    assert f"path={snapshot}" in proc.stderr
    assert "serving the built-in tiny random-weight model" not in proc.stderr
