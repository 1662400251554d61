"""transformers' names below its documented API that the image path relies on.

Checked against transformers 5.17.0 (the pinned one, beside vLLM 0.26.0); the suite also
passes with 5.19.0, which ``make test-latest`` installs beside vLLM 0.32.0. transformers
5.19 warns that ``min_pixels``/``max_pixels`` processor arguments (vLLM passes them) go
away in 5.23, which pyproject's cap excludes. What each is for, and what breaks if it moves:

* ``transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize``: the resize
  rule of the Qwen2-VL family's processors. The worker pre-resizes with it, so the size
  it states in grounding prompts is the size the processor produces.
* ``transformers.image_processing_backends.TorchvisionBackend`` and its unbound
  ``resize`` with ``transformers.image_utils.SizeDict``: the "fast" processor's own
  resampling. vLLM loads that processor; resizing with its code keeps the pixels
  bit-identical to what the model sees without the pre-resize (a test compares them).
* ``transformers.image_transforms.convert_to_rgb``: the processor's RGB conversion
  (alpha over white), so a pre-converted image is the one the processor would make.
* The modules above, imported once by every image process at start (``warm_imports``):
  the first job in a process would otherwise pay seconds of imports.
"""

from __future__ import annotations

from typing import Any

#: The transformers release every name above was checked against.
CHECKED_AGAINST = "5.17.0"


def smart_resize(
    height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """(height, width) the Qwen2-VL processors resize to; ``ValueError`` past 200:1."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as rule

    return rule(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def is_torchvision_processor(processor: Any) -> bool:
    try:
        from transformers.image_processing_backends import TorchvisionBackend
    except ImportError:  # pragma: no cover - a transformers without the torchvision backend
        return False
    return isinstance(processor, TorchvisionBackend)


def torchvision_resize(processor: Any, pixels: Any, height: int, width: int, resample: Any) -> Any:
    """``pixels`` (a CHW uint8 tensor) resized by the processor's own torchvision code."""
    import torch
    from transformers.image_processing_backends import TorchvisionBackend
    from transformers.image_utils import SizeDict

    with torch.inference_mode():
        out = TorchvisionBackend.resize(
            processor,
            pixels.unsqueeze(0),
            SizeDict(height=height, width=width),
            resample=resample,
        )
    return out[0]


def convert_to_rgb(image: Any) -> Any:
    from transformers.image_transforms import convert_to_rgb as convert

    return convert(image)


def warm_imports() -> None:
    """Import what the image path uses, so no job pays for it."""
    import transformers.image_processing_backends
    import transformers.image_transforms
    import transformers.image_utils
    import transformers.models.qwen2_vl.image_processing_qwen2_vl  # noqa: F401
