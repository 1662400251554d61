"""Where the model comes from: baked, local, hub cache, download, tiny; and failing fast."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import httpx
import pytest

from vlm_worker.config.engine_args import EngineSpec
from vlm_worker.config.model_source import (
    ModelNotFoundError,
    ModelSource,
    explain_hub_error,
    go_offline,
    hub_cache_lookup,
    hub_offline,
    on_runpod,
    read_manifest,
    resolve,
    served_settings,
    snapshot_problems,
    use_source,
)
from vlm_worker.config.settings import load_worker_settings
from vlm_worker.contract.errors import ConfigError


def make_snapshot(path: Path, shards: int = 0) -> Path:
    """A folder that passes the snapshot check: config, weights, optional shard index."""
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    if shards:
        names = [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]
        index = {"weight_map": {f"w{i}": n for i, n in enumerate(names)}}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
        for name in names:
            (path / name).write_bytes(b"x")
    else:
        (path / "model.safetensors").write_bytes(b"x")
    return path


def write_manifest(folder: Path, name: str = "org/baked", **extra) -> Path:
    path = folder.parent / "manifest.json"
    body = {"format": 1, "model_name": name, "path": folder.name, **extra}
    path.write_text(json.dumps(body))
    return path


class Hub:
    """Scripted hub lookups: what is cached, what a download returns, what was asked."""

    def __init__(self, cached: Path | None = None, downloaded: Path | None = None) -> None:
        self.cached_path, self.downloaded = cached, downloaded
        self.calls: list[tuple[str, str, str | None]] = []

    def cached(self, name: str, revision: str | None) -> Path | None:
        self.calls.append(("cached", name, revision))
        return self.cached_path

    def download(self, name: str, revision: str | None) -> Path:
        self.calls.append(("download", name, revision))
        if self.downloaded is None:
            raise AssertionError("download must not be called")
        return self.downloaded


def run(env: dict[str, str], hub: Hub, manifest=None, tiny: Path = Path("/tiny")) -> ModelSource:
    settings = load_worker_settings(env)
    return resolve(
        settings, env, manifest=manifest, cached=hub.cached, download=hub.download, tiny_dir=tiny
    )


# ---------------------------------------------------------------- manifest
def test_manifest_paths_resolve_against_the_manifest_folder(tmp_path):
    folder = make_snapshot(tmp_path / "org--baked")
    manifest = read_manifest(write_manifest(folder, revision="main", commit="abc"))
    assert manifest is not None
    assert (manifest.model_name, manifest.revision, manifest.commit) == ("org/baked", "main", "abc")
    assert manifest.path == folder.resolve()


def test_no_manifest_file_means_no_baked_model(tmp_path):
    assert read_manifest(tmp_path / "manifest.json") is None


@pytest.mark.parametrize("body", ["{not json", '{"format": 99, "model_name": "a", "path": "b"}'])
def test_a_broken_manifest_stops_start_up(tmp_path, body):
    path = tmp_path / "manifest.json"
    path.write_text(body)
    with pytest.raises(ModelNotFoundError, match="BAKED_MODEL_MANIFEST"):
        read_manifest(path)


# ---------------------------------------------------------------- snapshots
def test_snapshot_check_finds_missing_shards_config_and_weights(tmp_path):
    complete = make_snapshot(tmp_path / "ok", shards=3)
    assert snapshot_problems(complete) == []
    (complete / "model-00002-of-00003.safetensors").unlink()
    assert snapshot_problems(complete) == [
        "1 of 3 weight shards missing (model-00002-of-00003.safetensors, ...)"
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert snapshot_problems(empty) == ["no config.json", "no *.safetensors weights"]
    assert snapshot_problems(tmp_path / "nowhere") == [f"{tmp_path / 'nowhere'} is not a folder"]


# ---------------------------------------------------------------- resolution
def test_baked_model_is_served_offline_when_model_name_is_unset(tmp_path):
    folder = make_snapshot(tmp_path / "org--baked")
    manifest = read_manifest(write_manifest(folder, commit="c0ffee"))
    source = run({}, Hub(), manifest)
    assert source == ModelSource("baked", "org/baked", str(folder.resolve()), "c0ffee", True)


def test_baked_model_is_served_when_model_name_and_revision_match(tmp_path):
    folder = make_snapshot(tmp_path / "org--baked")
    manifest = read_manifest(write_manifest(folder, revision="v1", commit="c0ffee"))
    for revision in ("", "v1", "c0ffee"):
        env = {"MODEL_NAME": "org/baked", "MODEL_REVISION": revision}
        assert run(env, Hub(), manifest).kind == "baked"


def test_another_model_name_wins_over_the_baked_one(tmp_path, caplog):
    folder = make_snapshot(tmp_path / "org--baked")
    manifest = read_manifest(write_manifest(folder, revision="v1"))
    cached = make_snapshot(tmp_path / "cache" / "snap")
    hub = Hub(cached=cached)
    for env in ({"MODEL_NAME": "org/other"}, {"MODEL_NAME": "org/baked", "MODEL_REVISION": "v2"}):
        assert run(env, hub, manifest).kind == "cache"
    assert "differs from the model baked into this image" in caplog.text


def test_an_unusable_baked_snapshot_stops_start_up(tmp_path):
    folder = make_snapshot(tmp_path / "org--baked")
    (folder / "model.safetensors").unlink()
    manifest = read_manifest(write_manifest(folder))
    with pytest.raises(ModelNotFoundError, match=r"baked into this image \(org/baked\).*weights"):
        run({}, Hub(), manifest)


def test_tiny_model_when_nothing_is_named(tmp_path):
    hub = Hub()
    assert run({}, hub, tiny=tmp_path / "tiny-x") == ModelSource(
        "tiny", "tiny-x", str(tmp_path / "tiny-x")
    )
    assert hub.calls == []


def test_local_folder_is_served_as_given(tmp_path):
    folder = make_snapshot(tmp_path / "mine")
    hub = Hub()
    source = run({"MODEL_NAME": str(folder), "MODEL_REVISION": "r"}, hub)
    assert source == ModelSource("local", str(folder), str(folder), "r")
    assert hub.calls == []


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("/no/such/model", "MODEL_NAME='/no/such/model' is a local path that does not exist"),
        ("./rel/model", "is a local path that does not exist"),
        ("a/b/c", "is a local path that does not exist"),
        ("org/bad name!", "neither an existing path nor a Hugging Face repo id"),
        ("org/a--b", "neither an existing path nor a Hugging Face repo id"),
    ],
)
def test_a_model_that_cannot_exist_fails_without_asking_the_hub(name, message):
    hub = Hub()
    with pytest.raises(ModelNotFoundError, match=message.replace("(", r"\(")):
        run({"MODEL_NAME": name}, hub)
    assert hub.calls == []


def test_a_folder_without_config_is_not_a_model(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"folder without config\.json"):
        run({"MODEL_NAME": str(tmp_path)}, Hub())


def test_cached_snapshot_is_used_without_downloading(tmp_path):
    snap = make_snapshot(tmp_path / "snap")
    hub = Hub(cached=snap)
    source = run({"MODEL_NAME": "Qwen/Qwen2.5-VL-7B-Instruct", "MODEL_REVISION": "main"}, hub)
    assert source == ModelSource("cache", "Qwen/Qwen2.5-VL-7B-Instruct", str(snap), "main")
    assert hub.calls == [("cached", "Qwen/Qwen2.5-VL-7B-Instruct", "main")]


def test_missing_model_offline_fails_naming_model_name_and_the_cache():
    env = {"MODEL_NAME": "org/not-here", "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": "/vol/hub"}
    with pytest.raises(ModelNotFoundError) as info:
        run(env, Hub())
    assert str(info.value) == (
        "MODEL_NAME='org/not-here' is not (completely) in the Hugging Face cache (/vol/hub) "
        "and HF_HUB_OFFLINE=1 forbids downloading it"
    )


def test_missing_model_online_is_downloaded(tmp_path):
    got = make_snapshot(tmp_path / "downloaded")
    hub = Hub(downloaded=got)
    source = run({"MODEL_NAME": "org/m", "MODEL_REVISION": "v2"}, hub)
    assert source == ModelSource("download", "org/m", str(got), "v2")
    assert hub.calls == [("cached", "org/m", "v2"), ("download", "org/m", "v2")]


def test_incomplete_cache_is_completed_online_and_refused_offline(tmp_path):
    partial = make_snapshot(tmp_path / "partial", shards=2)
    (partial / "model-00001-of-00002.safetensors").unlink()
    complete = make_snapshot(tmp_path / "complete")
    assert run({"MODEL_NAME": "org/m"}, Hub(partial, complete)).kind == "download"
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE=1"):
        run({"MODEL_NAME": "org/m", "HF_HUB_OFFLINE": "true"}, Hub(partial))


def test_a_download_without_safetensors_is_refused(tmp_path):
    folder = tmp_path / "bin-only"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match=r"no \*\.safetensors weights"):
        run({"MODEL_NAME": "org/old"}, Hub(downloaded=folder))


@pytest.mark.parametrize(
    ("env", "offline"),
    [({}, False), ({"HF_HUB_OFFLINE": "0"}, False), ({"HF_HUB_OFFLINE": "1"}, True),
     ({"HF_HUB_OFFLINE": "yes"}, True), ({"TRANSFORMERS_OFFLINE": "ON"}, True)],
)  # fmt: skip
def test_offline_reads_like_huggingface_hub(env, offline):
    assert hub_offline(env) is offline


# ---------------------------------------------------------------- the real hub calls
def _response(status: int) -> httpx.Response:
    return httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/api/x"))


def test_hub_errors_become_messages_naming_model_name():
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    gated = explain_hub_error(GatedRepoError("x", response=_response(401)), "org/m", None)
    assert gated is not None and "MODEL_NAME='org/m' is a gated repo" in str(gated)
    assert "HF_TOKEN" in str(gated)
    missing = explain_hub_error(RepositoryNotFoundError("x", response=_response(404)), "o/m", "")
    assert missing is not None and "MODEL_NAME='o/m' was not found" in str(missing)
    revision = explain_hub_error(RevisionNotFoundError("x", response=_response(404)), "o/m", "v9")
    assert str(revision) == "MODEL_REVISION='v9' does not exist in 'o/m'"
    assert explain_hub_error(TimeoutError("slow"), "o/m", None) is None


def test_cache_lookup_reads_a_real_hub_cache_layout(tmp_path):
    """The hub cache (models--org--name/refs + snapshots) as huggingface_hub writes it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--org--m"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    make_snapshot(repo / "snapshots" / commit)
    cached = hub_cache_lookup(str(tmp_path))
    assert cached("org/m", None) == repo / "snapshots" / commit
    assert cached("org/m", commit) == repo / "snapshots" / commit
    assert cached("org/other", None) is None


def test_go_offline_sets_the_variable_and_an_imported_hub_constant(monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    environ: dict[str, str] = {}
    go_offline(environ)
    assert environ == {"HF_HUB_OFFLINE": "1"}
    assert constants.HF_HUB_OFFLINE is True
    assert "huggingface_hub.constants" in sys.modules


# ---------------------------------------------------------------- wiring
def test_engine_gets_the_local_folder_and_a_snapshot_drops_its_revision():
    spec = EngineSpec({"model": "org/m", "revision": "v1", "seed": 1}, frozenset({"revision"}))
    for kind in ("cache", "download", "baked"):
        got = use_source(spec, ModelSource(kind, "org/m", "/snap", "v1"))
        assert got.kwargs == {"model": "/snap", "seed": 1}
    local = use_source(spec, ModelSource("local", "/m", "/m", "v1"))
    assert local.kwargs == {"model": "/m", "revision": "v1", "seed": 1}


def test_the_baked_name_becomes_the_served_name():
    unset = load_worker_settings({})
    baked = ModelSource("baked", "org/baked", "/models/org--baked", None, True)
    assert served_settings(unset, baked).model_label == "org/baked"
    assert not served_settings(unset, baked).uses_tiny_model
    named = load_worker_settings({"MODEL_NAME": "org/baked"})
    assert served_settings(named, baked) is named
    tiny = ModelSource("tiny", "tiny", "/tiny")
    assert served_settings(unset, tiny) is unset


def test_engine_spec_reads_the_baked_snapshot(tiny_model, tmp_path):
    """The worker's engine arguments point at the snapshot and read its config offline."""
    from vlm_worker.serving.worker import engine_spec

    folder = tmp_path / "org--baked"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 2048  # only this copy says 2048
    (folder / "config.json").write_text(json.dumps(config))
    source = run({}, Hub(), read_manifest(write_manifest(folder)))
    settings = served_settings(load_worker_settings({}), source)
    spec = engine_spec({"HF_HUB_OFFLINE": "1"}, settings, source)
    assert spec.kwargs["model"] == str(folder.resolve())
    assert spec.kwargs["max_model_len"] == 2048


@pytest.mark.parametrize("marker", ["RUNPOD_WEBHOOK_GET_JOB", "RUNPOD_POD_ID"])
def test_on_runpod_an_unset_model_name_is_a_config_error_not_the_tiny_model(marker, tmp_path):
    """On RunPod the tiny model would answer every caller with gibberish: refuse to start."""
    hub = Hub()
    with pytest.raises(ConfigError, match=r"MODEL_NAME is not set.*Qwen/Qwen2.5-VL-7B"):
        run({marker: "https://api.runpod.ai/v2/x/job-take"}, hub, tiny=tmp_path / "tiny")
    assert hub.calls == []
    # a baked model, or MODEL_NAME, serves there as anywhere
    folder = make_snapshot(tmp_path / "org--baked")
    manifest = read_manifest(write_manifest(folder))
    assert run({marker: "1"}, hub, manifest).kind == "baked"
    assert run({marker: "1", "MODEL_NAME": str(folder)}, hub).kind == "local"
    assert on_runpod({marker: "1"}) and not on_runpod({marker: ""})
