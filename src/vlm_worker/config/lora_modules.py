"""LoRA adapters served by name, from ``LORA_MODULES``, as ``vllm serve --lora-modules``.

``LORA_MODULES`` takes ``name=path`` pairs, comma-separated, or a JSON list of
``{"name", "path"}`` objects; a path is a local folder or a Hugging Face repo id, fetched
like the model (the hub cache first, then a download). Everything is checked at start,
before the engine: a name used twice, an adapter that is nowhere, one whose rank is above
``MAX_LORA_RANK``, or adapters without ``ENABLE_LORA=true`` stop the worker with exit 2
(exit 1 for one that cannot be fetched), instead of failing the first job that names it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm_worker.contract.errors import ConfigError

#: vLLM's default ``max_lora_rank`` (``MAX_LORA_RANK`` unset).
DEFAULT_MAX_LORA_RANK = 16

_NAME = re.compile(r"^[A-Za-z0-9][\w.\-/:]{0,127}$")


@dataclass(frozen=True)
class LoraModule:
    """An adapter as configured: the name requests use, and where it comes from."""

    name: str
    source: str


@dataclass(frozen=True)
class LoraAdapter:
    """An adapter ready to serve: its folder, and the id vLLM keys it by (1, 2, ...)."""

    name: str
    path: str
    id: int
    rank: int


def parse_lora_modules(raw: str | None) -> list[LoraModule]:
    """``LORA_MODULES`` as a list of modules; a malformed value is a ``ConfigError``."""
    if raw is None or not raw.strip():
        return []
    text = raw.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"LORA_MODULES is not valid JSON: {exc}") from None
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise ConfigError('LORA_MODULES as JSON is a list of {"name", "path"} objects')
        pairs = [(str(i.get("name", "")), str(i.get("path", ""))) for i in items]
    else:
        pairs = []
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, sep, source = item.partition("=")
            if not sep:
                raise ConfigError(f"LORA_MODULES entry {item!r} is not name=path")
            pairs.append((name.strip(), source.strip()))
    modules: list[LoraModule] = []
    for name, source in pairs:
        if not _NAME.match(name):
            raise ConfigError(f"LORA_MODULES: {name!r} is not a usable adapter name")
        if not source:
            raise ConfigError(f"LORA_MODULES: adapter {name!r} has no path")
        if any(m.name == name for m in modules):
            raise ConfigError(f"LORA_MODULES: the name {name!r} is used twice")
        modules.append(LoraModule(name, source))
    return modules


def resolve_adapters(
    modules: list[LoraModule],
    engine_kwargs: Mapping[str, Any],
    *,
    cached: Callable[[str, str | None], Path | None],
    download: Callable[[str, str | None], Path],
    base_names: tuple[str, ...] = (),
) -> dict[str, LoraAdapter]:
    """Each adapter's folder, checked: found, a LoRA adapter, and within ``MAX_LORA_RANK``."""
    if not modules:
        return {}
    if not engine_kwargs.get("enable_lora"):
        raise ConfigError("LORA_MODULES needs ENABLE_LORA=true")
    max_rank = int(engine_kwargs.get("max_lora_rank") or DEFAULT_MAX_LORA_RANK)
    adapters: dict[str, LoraAdapter] = {}
    for number, module in enumerate(modules, start=1):
        if module.name in base_names:
            raise ConfigError(f"LORA_MODULES: {module.name!r} is the base model's own name")
        local = Path(module.source).expanduser()
        if local.exists():
            folder = local
        elif module.source.startswith(("/", ".", "~")):
            raise ConfigError(f"LORA_MODULES: adapter {module.name!r}: no folder {local}")
        else:
            folder = cached(module.source, None) or download(module.source, None)
        config_path = Path(folder) / "adapter_config.json"
        if not config_path.is_file():
            raise ConfigError(
                f"LORA_MODULES: adapter {module.name!r} at {folder} has no adapter_config.json"
            )
        config = json.loads(config_path.read_text(encoding="utf-8"))
        rank = int(config.get("r") or 0)
        if rank > max_rank:
            raise ConfigError(
                f"LORA_MODULES: adapter {module.name!r} has rank {rank}, above "
                f"MAX_LORA_RANK={max_rank}"
            )
        adapters[module.name] = LoraAdapter(module.name, str(Path(folder).resolve()), number, rank)
    return adapters
