"""Tiny random-weight checkpoints of the vision-language families the worker serves.

``tools/tiny_model.py`` builds Qwen2.5-VL; this package adds the other families, each with the
real transformers config, model and processor classes (so vLLM takes the production code path
for them), shrunk to run on two CPU cores, with a locally trained tokenizer that carries the
family's special tokens and a chat template in the family's own style. Nothing is downloaded.

Builds are seeded and deterministic; a ``tiny_model.json`` marker is written last.

Usage::

    python -m tools.tiny_models DIR_ROOT [--only NAME ...] [--seed N] [--force]
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

__all__ = [
    "ARCHITECTURES",
    "EXTRA_FAMILIES",
    "FAMILIES",
    "VIDEO_FAMILIES",
    "build",
    "family_module",
]

# name -> module; the order is the build order.
_MODULES: dict[str, str] = {
    "qwen2-vl": "qwen2_vl",
    "qwen3-vl": "qwen3_vl",
    "llava": "llava",
    "gemma3": "gemma3",
    "idefics3": "idefics3",
    "internvl": "internvl",
    "glm4v": "glm4v",
    "mistral3": "mistral3",
}

#: Built by ``python -m tools.tiny_models`` and ``make models``. LLaVA is in although vLLM 0.26
#: cannot load it with transformers 5.17 (see EXTRA_FAMILIES): no LLaVA variant avoids that, and
#: its tokenizer and template still matter to the worker's own rendering.
FAMILIES: tuple[str, ...] = (
    "qwen2-vl",
    "qwen3-vl",
    "llava",
    "gemma3",
    "idefics3",
    "internvl",
    "glm4v",
)

#: Built and loadable by transformers, but not by vLLM 0.26 with transformers 5.17: vLLM's
#: Mistral 3 (and LLaVA) modules import ``PixtralRotaryEmbedding`` and
#: ``position_ids_in_meshgrid`` from transformers' Pixtral module, which 5.17 no longer has.
#: ``build()`` accepts these; InternVL took Mistral 3's place in ``FAMILIES``.
EXTRA_FAMILIES: tuple[str, ...] = ("mistral3",)

#: The HF architecture (``config.json``'s ``architectures[0]``) each family is built as.
ARCHITECTURES: dict[str, str] = {
    "qwen2-vl": "Qwen2VLForConditionalGeneration",
    "qwen3-vl": "Qwen3VLForConditionalGeneration",
    "llava": "LlavaForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
    "glm4v": "Glm4vForConditionalGeneration",
    "mistral3": "Mistral3ForConditionalGeneration",
}

#: Families whose processor and template take video parts.
VIDEO_FAMILIES: tuple[str, ...] = ("qwen2-vl", "qwen3-vl", "internvl", "glm4v")


def family_module(name: str) -> ModuleType:
    """The module that builds ``name``; imported lazily so listing families needs no torch."""
    if name not in _MODULES:
        raise ValueError(f"unknown family {name!r}; expected one of {', '.join(_MODULES)}")
    return importlib.import_module(f"{__name__}.{_MODULES[name]}")


def build(name: str, out_dir: str | Path, force: bool = False, seed: int = 0) -> Path:
    """Build family ``name`` into ``out_dir`` unless an identical build is already there.

    Returns the resolved model directory. Raises ``FileExistsError`` when ``out_dir`` holds
    something else and ``force`` is not set.
    """
    from tools.tiny_models import _common

    module = family_module(name)
    return _common.install(name, module.build_into, out_dir, seed, force)
