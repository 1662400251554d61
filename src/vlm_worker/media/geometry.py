"""The processor's resize rule for Qwen2-VL-style models, and what it implies in tokens.

Kept apart from decoding because the engine, grounding and the image pool all need the
geometry without any image.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlm_worker.adapters.transformers import smart_resize
from vlm_worker.contract.errors import ImageDecodeError


@dataclass(frozen=True)
class ImageGeometry:
    """The processor's resize rule: sides are multiples of ``factor``, area within bounds."""

    patch_size: int = 14
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    #: "processor": resize with the processor's own resampler (what the model sees when
    #: the processor resizes); "pillow": Pillow's bicubic ``Image.resize``, for a family
    #: whose reference code pre-resizes that way (GTA1's inference).
    resample: str = "processor"

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def target_size(self, height: int, width: int, field: str | None = None) -> tuple[int, int]:
        """(height, width) from transformers' own ``smart_resize``, errors made specific."""
        try:
            return smart_resize(
                height,
                width,
                factor=self.factor,
                min_pixels=self.min_pixels,
                max_pixels=self.max_pixels,
            )
        except ValueError as exc:
            raise ImageDecodeError(
                f"image is {width}x{height}; its aspect ratio "
                f"{max(height, width) / min(height, width):.1f}:1 exceeds the 200:1 the "
                f"model's processor accepts",
                field=field,
            ) from exc

    def is_fixed_point(self, height: int, width: int) -> bool:
        """Whether the processor, given an image of this size, keeps the size."""
        if max(height, width) / min(height, width) > 200:
            return False
        try:
            return self.target_size(height, width) == (height, width)
        except ImageDecodeError:
            return False

    def image_tokens(self, height: int, width: int) -> int:
        """Placeholder tokens vLLM expands one image of this (resized) size into."""
        return (height // self.factor) * (width // self.factor)
