"""LORA_MODULES: parsed and every adapter checked at start, before the engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlm_worker.config.lora_modules import (
    LoraAdapter,
    LoraModule,
    parse_lora_modules,
    resolve_adapters,
)
from vlm_worker.contract.errors import ConfigError


def adapter(folder: Path, rank: int = 8) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank}))
    return folder


def test_both_forms_as_vllm_serve_takes_them():
    assert parse_lora_modules("a=/x, b=org/repo") == [
        LoraModule("a", "/x"),
        LoraModule("b", "org/repo"),
    ]
    assert parse_lora_modules('[{"name": "a", "path": "/x"}]') == [LoraModule("a", "/x")]
    assert parse_lora_modules(None) == parse_lora_modules(" ") == []


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ("a", "is not name=path"),
        ("a=/x,a=/y", "used twice"),
        ("=/x", "not a usable adapter name"),
        ("a=", "has no path"),
        ("[{", "not valid JSON"),
        ('{"a": "/x"}', "not name=path"),
        ('["a"]', 'list of {"name", "path"}'),
    ],
)
def test_malformed_values_name_lora_modules(raw, words):
    with pytest.raises(ConfigError, match="LORA_MODULES") as info:
        parse_lora_modules(raw)
    assert words in info.value.message


def never(name: str, revision: str | None) -> Path:
    raise AssertionError(f"the hub was asked for {name}")


def test_adapters_are_found_and_checked(tmp_path):
    local = adapter(tmp_path / "local")
    hub = adapter(tmp_path / "hub-snapshot", rank=4)
    modules = [LoraModule("mine", str(local)), LoraModule("theirs", "org/adapter")]
    found = resolve_adapters(
        modules,
        {"enable_lora": True, "max_lora_rank": 8},
        cached=lambda name, rev: hub if name == "org/adapter" else None,
        download=never,
    )
    assert found == {
        "mine": LoraAdapter("mine", str(local.resolve()), 1, 8),
        "theirs": LoraAdapter("theirs", str(hub.resolve()), 2, 4),
    }


@pytest.mark.parametrize(
    ("kwargs", "module", "words"),
    [
        ({}, None, "needs ENABLE_LORA=true"),
        ({"enable_lora": True}, "big", "rank 32, above MAX_LORA_RANK=16"),
        ({"enable_lora": True}, "/nowhere", "no folder"),
        ({"enable_lora": True}, "plain", "no adapter_config.json"),
        ({"enable_lora": True}, "tiny", "the base model's own name"),
    ],
)
def test_a_bad_adapter_stops_the_start(tmp_path, kwargs, module, words):
    adapter(tmp_path / "ok")
    adapter(tmp_path / "big", rank=32)
    (tmp_path / "plain").mkdir()
    source = {None: "ok", "big": "big", "plain": "plain", "tiny": "ok"}.get(module, module)
    path = source if source.startswith("/") else str(tmp_path / source)
    name = "tiny" if module == "tiny" else "a"
    with pytest.raises(ConfigError) as info:
        resolve_adapters(
            [LoraModule(name, path)], kwargs, cached=never, download=never, base_names=("tiny",)
        )
    assert words in info.value.message
