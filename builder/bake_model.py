#!/usr/bin/env python3
"""Bake a model into the image at build time, for workers that start without downloading.

    python3 builder/bake_model.py MODEL [--revision REV] [--dest /models]
                                  [--token-file /run/secrets/HF_TOKEN] [--name NAME]

MODEL is a Hugging Face repo id, downloaded with ``snapshot_download`` (revision resolved
to a commit first, so the image records exactly what it holds), or a local model folder,
copied: the same allow-patterns pick the files either way. Only what serving needs is
kept: safetensors weights, config, tokenizer, processor and chat-template files, remote
code. The snapshot lands in ``DEST/<name>``, then ``DEST/manifest.json`` is written
(last, atomically) naming the model, its revision and commit, and the folder. At start the
worker finds that manifest (setting ``BAKED_MODEL_MANIFEST``), serves the folder and goes
offline (``HF_HUB_OFFLINE=1``).

The token comes from a BuildKit secret file (``--mount=type=secret,id=HF_TOKEN``), so it
is never stored in a layer nor printed; ``HF_TOKEN`` in the environment is the fallback.

This script depends on nothing but the standard library and huggingface_hub (both in the
vLLM base image), not on the worker package: the Dockerfile runs it before installing the
worker, so the multi-GB model layer stays cached when only the worker's code changes. The
patterns and the manifest format are shared with ``vlm_worker.config.model_source`` by value; the
test suite checks the two agree.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

#: Must equal vlm_worker.config.model_source.ALLOW_PATTERNS (tests/unit/test_deploy.py checks).
ALLOW_PATTERNS: tuple[str, ...] = (
    "*.safetensors",
    "*.json",
    "*.jinja",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "*.py",
)
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1


class BakeError(Exception):
    """A problem the build log should show as one clear line."""


def read_token(token_file: Path | None) -> str | None:
    """The build secret's content, else HF_TOKEN, else None (public models need none)."""
    if token_file is not None and token_file.is_file():
        token = token_file.read_text(encoding="utf-8").strip()
        if token:
            return token
    return os.environ.get("HF_TOKEN") or None


def allowed_files(root: Path) -> list[str]:
    """Files under ``root`` the allow-patterns select, as snapshot_download would."""
    from huggingface_hub.utils import filter_repo_objects

    names = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    return list(filter_repo_objects(names, allow_patterns=list(ALLOW_PATTERNS)))


def copy_local(src: Path, dest: Path) -> None:
    """Copy the allowed files of a local model folder, with a progress bar over bytes."""
    from huggingface_hub.utils import tqdm

    files = allowed_files(src)
    total = sum((src / name).stat().st_size for name in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"copying {src.name}") as bar:
        for name in files:
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, target)
            bar.update(target.stat().st_size)


def download(repo: str, revision: str | None, dest: Path, token: str | None) -> str:
    """Download the allowed files of ``repo`` at ``revision``; returns the commit baked."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        commit = HfApi(token=token).model_info(repo, revision=revision).sha
        print(f"baking {repo} at commit {commit} into {dest}", flush=True)
        snapshot_download(
            repo,
            revision=commit,
            local_dir=dest,
            allow_patterns=list(ALLOW_PATTERNS),
            token=token,
        )
    except GatedRepoError as exc:
        raise BakeError(
            f"MODEL_NAME={repo!r} is gated: accept its terms on the Hugging Face hub and pass "
            f"a token of that account with --secret id=HF_TOKEN,..."
        ) from exc
    except RepositoryNotFoundError as exc:
        raise BakeError(
            f"MODEL_NAME={repo!r} was not found on the Hugging Face hub (a private repo also "
            f"needs --secret id=HF_TOKEN,...)"
        ) from exc
    except RevisionNotFoundError as exc:
        raise BakeError(f"MODEL_REVISION={revision!r} does not exist in {repo!r}") from exc
    # snapshot_download keeps resume metadata next to the files; the image needs none.
    shutil.rmtree(dest / ".cache", ignore_errors=True)
    return str(commit)


def snapshot_problems(path: Path) -> list[str]:
    """Why the snapshot could not be served (the worker runs the same check at start)."""
    problems = []
    if not (path / "config.json").is_file():
        problems.append("no config.json")
    if not any(path.glob("*.safetensors")):
        problems.append("no *.safetensors weights (only safetensors are baked)")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            problems.append(f"weight shards missing: {', '.join(missing)}")
    return problems


def folder_name(name: str) -> str:
    return name.strip("/").replace("/", "--")


def write_manifest(dest: Path, manifest: dict[str, object]) -> Path:
    """Written last and atomically: a manifest exists only for a complete snapshot."""
    path = dest / MANIFEST_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def bake(
    model: str,
    dest: Path,
    *,
    revision: str | None = None,
    token_file: Path | None = None,
    name: str | None = None,
) -> Path:
    """Put the snapshot under ``dest`` and return the manifest's path."""
    source = Path(model).expanduser()
    is_local = source.is_dir()
    name = name or (source.resolve().name if is_local else model)
    folder = dest / folder_name(name)
    if is_local and folder.resolve() in (source.resolve(), *source.resolve().parents):
        raise BakeError(f"--dest {dest} would overwrite the source folder {source}")
    manifest_path = dest / MANIFEST_NAME
    manifest_path.unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if is_local:
        copy_local(source, folder)
        commit = None
    else:
        commit = download(model, revision, folder, read_token(token_file))
    problems = snapshot_problems(folder)
    if problems:
        raise BakeError(f"{name}: the snapshot cannot be served: {'; '.join(problems)}")
    files = [p for p in folder.rglob("*") if p.is_file()]
    return write_manifest(
        dest,
        {
            "format": MANIFEST_FORMAT,
            "model_name": name,
            "revision": revision,
            "commit": commit,
            "source": "local" if is_local else "hub",
            "path": folder.name,
            "files": len(files),
            "bytes": sum(p.stat().st_size for p in files),
        },
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="Hugging Face repo id, or a local model folder")
    parser.add_argument("--revision", default="", help="branch, tag or commit (repo ids only)")
    parser.add_argument("--dest", type=Path, default=Path("/models"), help="where to bake")
    parser.add_argument("--token-file", type=Path, default=None, help="file holding HF_TOKEN")
    parser.add_argument("--name", default=None, help="name jobs report (default: MODEL)")
    args = parser.parse_args(argv)
    try:
        manifest = bake(
            args.model,
            args.dest,
            revision=args.revision or None,
            token_file=args.token_file,
            name=args.name,
        )
    except BakeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"baked: {manifest.read_text(encoding='utf-8')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
