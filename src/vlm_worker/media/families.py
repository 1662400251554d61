"""Which models' image resize the worker reproduces, and may therefore do ahead of vLLM.

Pre-resizing in the image processes pays (the resize leaves vLLM's event loop, and the
grounding prompt can state the size the model sees) only where the worker's result is
exactly what the model's processor would make; anywhere else it would resize twice, or
hand the processor pixels it would never have produced. So the rule is an allowlist:
an architecture whose vLLM model class counts one token per merged patch, served with
the Qwen2-VL image processor (``smart_resize``). Everything else is decoded, oriented
and converted to RGB off the event loop, and vLLM's processor resizes the full-size
image as the model expects.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vlm_worker.media.geometry import ImageGeometry

#: Architectures whose image tokens are ``(h / factor) * (w / factor)`` of the image the
#: Qwen2-VL processor resized: Qwen2-VL, Qwen2.5-VL (and fine-tunes on it such as GTA1,
#: UI-TARS-1.5), Qwen3-VL (dense and MoE), OpenCUA (Qwen2.5-VL's vision tower).
QWEN_RESIZE_ARCHITECTURES = frozenset(
    {
        "Qwen2VLForConditionalGeneration",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen3VLForConditionalGeneration",
        "Qwen3VLMoeForConditionalGeneration",
        "OpenCUAForConditionalGeneration",
    }
)

#: The image processor classes that resize with ``smart_resize`` (transformers 5 names
#: the torchvision one without a suffix and the Pillow one ``...Pil``; 4.x had ``Fast``).
QWEN_IMAGE_PROCESSORS = frozenset(
    {"Qwen2VLImageProcessor", "Qwen2VLImageProcessorFast", "Qwen2VLImageProcessorPil"}
)


@dataclass(frozen=True)
class ImageHandling:
    """How the worker prepares the served model's images, and why (for the start-up log)."""

    architecture: str
    processor_class: str
    #: The resize rule the worker reproduces; None: vLLM's processor resizes.
    geometry: ImageGeometry | None
    reason: str

    @property
    def pre_resize(self) -> bool:
        return self.geometry is not None

    def describe(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "image_processor": self.processor_class,
            "pre_resize": self.pre_resize,
            "reason": self.reason,
        }


def image_handling(
    architecture: str, image_processor: Any, geometry: Callable[[], ImageGeometry]
) -> ImageHandling:
    """The handling for a model, from its architecture and its image processor.

    ``geometry`` reads the processor's bounds; it is called only for the families whose
    rule is reproduced (another processor's ``size`` means something else).
    """
    processor_class = type(image_processor).__name__
    if architecture not in QWEN_RESIZE_ARCHITECTURES:
        return ImageHandling(
            architecture,
            processor_class,
            None,
            f"{architecture} is not a Qwen2-VL-family architecture: its processor "
            f"({processor_class}) resizes full-size images",
        )
    if processor_class not in QWEN_IMAGE_PROCESSORS:
        return ImageHandling(
            architecture,
            processor_class,
            None,
            f"{architecture} is served with {processor_class}, not the Qwen2-VL image "
            "processor whose resize the worker reproduces: it resizes full-size images",
        )
    return ImageHandling(
        architecture,
        processor_class,
        geometry(),
        f"{processor_class} resizes with smart_resize, which the worker reproduces "
        "bit for bit: images are resized in the image workers",
    )
