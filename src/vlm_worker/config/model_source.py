"""Where the served model comes from: decided once at start, logged, and checked early.

In order:

* ``baked``: a snapshot written into the image by ``builder/bake_model.py``. Its manifest
  (``BAKED_MODEL_MANIFEST``) names the model; the worker serves the local folder and goes
  offline (``HF_HUB_OFFLINE=1``), since everything it needs is on the image's disk. A
  ``MODEL_NAME`` naming another model wins over the baked one (with a warning).
* ``local``: ``MODEL_NAME`` is a folder (or file) on disk.
* ``cache``: ``MODEL_NAME`` is a hub repo already in the Hugging Face cache. The image
  points that cache at the network volume, so a model downloaded by one cold start (or
  cached by RunPod) is reused by the next.
* ``download``: otherwise it is fetched into that cache now, with progress bars.

With neither ``MODEL_NAME`` nor a baked model, a local run serves the tiny test model;
on RunPod that is a configuration error (``ConfigError``, exit 2), not a silent
gibberish endpoint.

Why resolve before the engine: a typo in ``MODEL_NAME``, a gated repo without
``HF_TOKEN`` or an offline worker without the files would otherwise surface minutes later
as a stack trace from deep inside vLLM; here start-up fails within seconds with a message
naming ``MODEL_NAME``. Resolution takes its lookups (``cached``, ``download``) as
arguments, so every branch is tested without a network.

The engine is then handed the local snapshot folder, never the repo id: the processor,
the config and vLLM all read the same files, and nothing is fetched twice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vlm_worker.config.engine_args import EngineSpec
from vlm_worker.config.settings import TINY_MODEL_DIR, WorkerSettings
from vlm_worker.contract.errors import ConfigError

log = logging.getLogger("vlm_worker.model")

#: Files a snapshot needs: weights, config, tokenizer, processor and chat template files,
#: and remote code for TRUST_REMOTE_CODE models. Not ``*.bin``/``*.pt`` duplicates of the
#: safetensors weights, ONNX or GGUF exports. ``builder/bake_model.py`` keeps the same list
#: (a test checks they agree).
ALLOW_PATTERNS: tuple[str, ...] = (
    "*.safetensors",  # weights (vLLM loads safetensors)
    "*.json",  # config, generation config, safetensors index, tokenizer, processor, templates
    "*.jinja",  # chat templates shipped as files
    "*.model",  # sentencepiece tokenizer.model
    "*.tiktoken",  # tiktoken vocabularies
    "*.txt",  # merges.txt, vocab.txt
    "*.py",  # remote code (TRUST_REMOTE_CODE)
)

#: Version of the manifest ``builder/bake_model.py`` writes.
MANIFEST_FORMAT = 1

Kind = Literal["baked", "local", "cache", "download", "tiny"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_TRUE = {"1", "ON", "YES", "TRUE"}


class ModelNotFoundError(RuntimeError):
    """MODEL_NAME (or the baked manifest) names nothing the worker can load."""


@dataclass(frozen=True)
class Manifest:
    """What the bake step recorded: the model's name, revision and where its files are."""

    model_name: str
    revision: str | None
    commit: str | None
    path: Path


@dataclass(frozen=True)
class ModelSource:
    kind: Kind
    #: The name jobs report: MODEL_NAME, or the baked model's name.
    name: str
    #: What the engine loads: always a local path.
    path: str
    revision: str | None = None
    #: Everything is on local disk: the worker sets HF_HUB_OFFLINE=1.
    offline: bool = False


def read_manifest(path: Path) -> Manifest | None:
    """The baked model's manifest, or None when the image has none (the usual case)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"BAKED_MODEL_MANIFEST={str(path)!r} is unreadable: {exc}"
        ) from exc
    if (
        not isinstance(data, dict)
        or data.get("format") != MANIFEST_FORMAT
        or not isinstance(data.get("model_name"), str)
        or not isinstance(data.get("path"), str)
    ):
        raise ModelNotFoundError(
            f"BAKED_MODEL_MANIFEST={str(path)!r} is not a format-{MANIFEST_FORMAT} manifest "
            f"written by builder/bake_model.py"
        )
    return Manifest(
        model_name=data["model_name"],
        revision=data.get("revision") or None,
        commit=data.get("commit") or None,
        path=(path.parent / data["path"]).resolve(),
    )


def snapshot_problems(path: Path) -> list[str]:
    """Why a snapshot folder cannot be served, e.g. a download cut off halfway."""
    if not path.is_dir():
        return [f"{path} is not a folder"]
    problems = []
    if not (path / "config.json").is_file():
        problems.append("no config.json")
    if not any(path.glob("*.safetensors")):
        problems.append("no *.safetensors weights")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            return [*problems, f"unreadable {index.name}: {exc}"]
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            problems.append(
                f"{len(missing)} of {len(shards)} weight shards missing ({missing[0]}, ...)"
            )
    return problems


def hub_offline(env: Mapping[str, str]) -> bool:
    """huggingface_hub's own reading of HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE."""
    value = env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in _TRUE


def on_runpod(env: Mapping[str, str]) -> bool:
    """Whether this process runs on RunPod (a serverless worker or a pod), where the tiny
    test model would answer every caller with gibberish."""
    return bool(env.get("RUNPOD_WEBHOOK_GET_JOB") or env.get("RUNPOD_POD_ID"))


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1


def _describe(name: str, revision: str | None) -> str:
    text = f"MODEL_NAME={name!r}"
    return text + (f" (MODEL_REVISION={revision!r})" if revision else "")


def _baked(settings: WorkerSettings, manifest: Manifest | None) -> Manifest | None:
    """The manifest, if it is the model to serve: MODEL_NAME unset or naming the same one."""
    if manifest is None:
        return None
    name, revision = settings.model_name, settings.model_revision
    if name is None:
        return manifest
    if name == manifest.model_name and revision in (None, manifest.revision, manifest.commit):
        return manifest
    log.warning(
        "%s differs from the model baked into this image; ignoring the baked snapshot",
        _describe(name, revision),
        extra={"baked_model": manifest.model_name, "baked_revision": manifest.revision},
    )
    return None


def resolve(
    settings: WorkerSettings,
    env: Mapping[str, str],
    *,
    manifest: Manifest | None,
    cached: Callable[[str, str | None], Path | None],
    download: Callable[[str, str | None], Path],
    tiny_dir: Path = TINY_MODEL_DIR,
) -> ModelSource:
    """Decide where the model comes from; raise ``ModelNotFoundError`` if it is nowhere.

    ``cached(repo, revision)`` returns the snapshot folder in the hub cache, or None;
    ``download(repo, revision)`` fetches it and returns the folder (or raises).
    """
    baked = _baked(settings, manifest)
    if baked is not None:
        problems = snapshot_problems(baked.path)
        if problems:
            raise ModelNotFoundError(
                f"the model baked into this image ({baked.model_name}) is unusable at "
                f"{baked.path}: {'; '.join(problems)}"
            )
        return ModelSource(
            "baked", baked.model_name, str(baked.path), baked.commit or baked.revision, True
        )
    name, revision = settings.model_name, settings.model_revision
    if name is None:
        if on_runpod(env):
            raise ConfigError(
                "MODEL_NAME is not set and no model is baked into this image: set MODEL_NAME "
                "in the endpoint's environment to the model to serve (a Hugging Face repo "
                "id such as Qwen/Qwen2.5-VL-7B-Instruct, or a path on the network volume)"
            )
        return ModelSource("tiny", tiny_dir.name, str(tiny_dir))
    local = Path(name).expanduser()
    if local.exists():
        if local.is_dir() and not (local / "config.json").is_file():
            raise ModelNotFoundError(
                f"MODEL_NAME={name!r} is a folder without config.json, not a model"
            )
        return ModelSource("local", name, str(local), revision)
    if _looks_like_path(name):
        raise ModelNotFoundError(f"MODEL_NAME={name!r} is a local path that does not exist")
    if not _REPO_ID.match(name) or "--" in name or ".." in name:
        raise ModelNotFoundError(
            f"MODEL_NAME={name!r} is neither an existing path nor a Hugging Face repo id "
            f"such as Qwen/Qwen2.5-VL-7B-Instruct"
        )
    hit = cached(name, revision)
    if hit is not None:
        problems = snapshot_problems(hit)
        if not problems:
            return ModelSource("cache", name, str(hit), revision)
        log.warning(
            "the cached snapshot is incomplete: %s", "; ".join(problems), extra={"path": str(hit)}
        )
    if hub_offline(env):
        where = env.get("HF_HUB_CACHE") or env.get("HF_HOME") or "the default cache"
        raise ModelNotFoundError(
            f"{_describe(name, revision)} is not (completely) in the Hugging Face cache "
            f"({where}) and HF_HUB_OFFLINE=1 forbids downloading it"
        )
    path = download(name, revision)
    problems = snapshot_problems(path)
    if problems:
        raise ModelNotFoundError(
            f"{_describe(name, revision)} cannot be served from its download: "
            f"{'; '.join(problems)} (the worker loads safetensors weights only)"
        )
    return ModelSource("download", name, str(path), revision)


# ----------------------------------------------------------- the real lookups
def explain_hub_error(exc: Exception, name: str, revision: str | None) -> ModelNotFoundError | None:
    """A clear message for the hub's "no such model" answers; None for other failures."""
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GatedRepoError):
        return ModelNotFoundError(
            f"{_describe(name, revision)} is a gated repo: accept its terms on the Hugging "
            f"Face hub and set HF_TOKEN to a token of that account"
        )
    if isinstance(exc, RepositoryNotFoundError):
        return ModelNotFoundError(
            f"{_describe(name, revision)} was not found on the Hugging Face hub "
            f"(check the spelling; a private repo also needs HF_TOKEN)"
        )
    if isinstance(exc, RevisionNotFoundError):
        return ModelNotFoundError(f"MODEL_REVISION={revision!r} does not exist in {name!r}")
    return None


def hub_cache_lookup(cache_dir: str | None) -> Callable[[str, str | None], Path | None]:
    def cached(name: str, revision: str | None) -> Path | None:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            path = snapshot_download(
                name, revision=revision, cache_dir=cache_dir, local_files_only=True
            )
        except LocalEntryNotFoundError:
            return None
        return Path(str(path))

    return cached


def hub_download(cache_dir: str | None) -> Callable[[str, str | None], Path]:
    def download(name: str, revision: str | None) -> Path:
        from huggingface_hub import snapshot_download

        log.info(
            "downloading the model into the Hugging Face cache (progress below)",
            extra={"model": name, "revision": revision, "cache_dir": cache_dir or "default"},
        )
        start = time.perf_counter()
        try:
            path = Path(
                str(
                    snapshot_download(
                        name,
                        revision=revision,
                        cache_dir=cache_dir,
                        allow_patterns=list(ALLOW_PATTERNS),
                    )
                )
            )
        except Exception as exc:
            clear = explain_hub_error(exc, name, revision)
            if clear is not None:
                raise clear from exc
            raise
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        log.info(
            "download done",
            extra={"seconds": round(time.perf_counter() - start, 1), "gib": round(size / 2**30, 2)},
        )
        return path

    return download


def go_offline(environ: MutableMapping[str, str] | None = None) -> None:
    """HF_HUB_OFFLINE=1 for this process and the engine's children.

    huggingface_hub reads the variable once, at import; if it is imported already, its
    constant (which vLLM reads) is updated too.
    """
    (os.environ if environ is None else environ)["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True  # type: ignore[attr-defined]


_WHERE = {
    "baked": "serving the model baked into the image (offline)",
    "local": "serving the model from a local path",
    "cache": "serving the model from the Hugging Face cache",
    "download": "serving the model just downloaded into the Hugging Face cache",
    "tiny": "serving the built-in tiny test model",
}


def resolve_model_source(env: Mapping[str, str], settings: WorkerSettings) -> ModelSource:
    """``resolve`` with the real manifest, hub cache and downloader; logs the outcome."""
    cache_dir = env.get("DOWNLOAD_DIR") or None
    source = resolve(
        settings,
        env,
        manifest=read_manifest(Path(settings.baked_model_manifest)),
        cached=hub_cache_lookup(cache_dir),
        download=hub_download(cache_dir),
    )
    if source.offline:
        go_offline()
    log.info(
        _WHERE[source.kind],
        extra={
            "model_source": source.kind,
            "model": source.name,
            "revision": source.revision,
            "path": source.path,
        },
    )
    return source


def served_settings(settings: WorkerSettings, source: ModelSource) -> WorkerSettings:
    """The settings as if MODEL_NAME named the baked model, so every consumer agrees on it."""
    if source.kind == "baked" and settings.model_name is None:
        return dataclasses.replace(settings, model_name=source.name)
    return settings


def use_source(spec: EngineSpec, source: ModelSource) -> EngineSpec:
    """Point the engine at the local folder; a snapshot already is its revision."""
    kwargs = {**spec.kwargs, "model": source.path}
    if source.kind in ("baked", "cache", "download"):
        kwargs.pop("revision", None)
    return EngineSpec(kwargs, spec.explicit)
