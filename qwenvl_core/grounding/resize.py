"""The dynamic-resolution resize of the Qwen2-VL family of image processors, as a grounding codec needs it.

Qwen2.5-VL writes coordinates in pixels of the image *after* the processor resized it, so its codec must resize
exactly as the processor does: ``transformers``' own ``smart_resize`` (imported when first used, so this module
stays free of torch) with the processor's ``min_pixels`` (``size["shortest_edge"]``), ``max_pixels``
(``size["longest_edge"]``) and ``factor = patch_size * merge_size`` (14 * 2 = 28 for Qwen2/2.5-VL). Per-job
``min_pixels`` / ``max_pixels`` change the resized size, hence the coordinates: build the codec from the job's
values (``ResizeRule.from_image_processor`` on the job's processor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qwenvl_core.errors import ConfigError, PromptError
from qwenvl_core.grounding.geometry import check_size
from qwenvl_core.grounding.types import ImageSize

QWEN2_VL_DEFAULT_MIN_PIXELS = 56 * 56
QWEN2_VL_DEFAULT_MAX_PIXELS = 28 * 28 * 1280
"""``Qwen2VLImageProcessor``'s defaults in ``transformers`` 5.24 (official checkpoints ship their own values)."""


@dataclass(frozen=True)
class ResizeRule:
    """How a Qwen2-VL-family image processor sizes an image: pixel budget and the side multiple ``factor``."""

    min_pixels: int = QWEN2_VL_DEFAULT_MIN_PIXELS
    max_pixels: int = QWEN2_VL_DEFAULT_MAX_PIXELS
    factor: int = 28

    def __post_init__(self) -> None:
        for name in ("min_pixels", "max_pixels", "factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.min_pixels > self.max_pixels:
            raise ConfigError(f"min_pixels ({self.min_pixels}) must not exceed max_pixels ({self.max_pixels})")

    @classmethod
    def from_image_processor(cls, processor: Any) -> ResizeRule:
        """The rule of a ``transformers`` Qwen2-VL-family processor or image processor (its ``size`` /
        ``min_pixels`` / ``max_pixels``, ``patch_size`` and ``merge_size``)."""
        processor = getattr(processor, "image_processor", processor)
        size = getattr(processor, "size", None) or {}
        get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
        min_pixels = get("shortest_edge") or getattr(processor, "min_pixels", None)
        max_pixels = get("longest_edge") or getattr(processor, "max_pixels", None)
        factor = getattr(processor, "patch_size", 14) * getattr(processor, "merge_size", 2)
        return cls(int(min_pixels or QWEN2_VL_DEFAULT_MIN_PIXELS), int(max_pixels or QWEN2_VL_DEFAULT_MAX_PIXELS),
                   int(factor))

    def resized(self, image_size: ImageSize) -> ImageSize:
        """``(width, height)`` the processor resizes an image of ``image_size`` to; ``PromptError`` for an image
        it refuses (aspect ratio over 200)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        check_size(image_size)
        width, height = image_size
        try:
            new_height, new_width = smart_resize(height, width, factor=self.factor, min_pixels=self.min_pixels,
                                                 max_pixels=self.max_pixels)
        except ValueError as exc:
            raise PromptError(f"image {width}x{height} cannot be resized for the model: {exc}") from exc
        return new_width, new_height
