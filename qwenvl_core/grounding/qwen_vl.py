"""Qwen-VL (v1) grounding: ``<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>`` on a 0-1000 grid of the original image.

A thin wrapper: every numeric and every rule is ``qwenvl_core.models.qwen_vl.grounding``'s (integers in
``[0, 1000)``, ``round`` then clamped to 999; reading ``v / 1000 * size``). Source: the Qwen-VL paper
(arXiv 2308.12966, "normalized within [0, 1000)") and Qwen-VL's ``tokenization_qwen.py`` drawing code. This is
also the platform's dataset markup, so ``from_v1_markup`` is the identity. v1 has ``<quad>`` (OCR) but no points.
"""

from __future__ import annotations

from qwenvl_core.errors import PromptError
from qwenvl_core.grounding.geometry import check_size
from qwenvl_core.grounding.types import ImageSize, PixelObject, PixelPoint
from qwenvl_core.models.qwen_vl import grounding as v1


class QwenVLCodec:
    """The v1 convention (see the module docstring)."""

    name = "qwen-vl"
    ref_markup = ("<ref>", "</ref>")

    def format(self, objects: list[PixelObject | PixelPoint], image_size: ImageSize) -> str:
        """Consecutive objects with the same phrase share one ``<ref>``; groups are joined by newlines."""
        check_size(image_size)
        width, height = image_size
        groups: list[str] = []
        previous: PixelObject | None = None
        for obj in objects:
            if not isinstance(obj, PixelObject):
                raise PromptError("the qwen-vl grounding convention has boxes only, no points")
            if obj.ref is not None and "<" in obj.ref:
                raise PromptError(f"a grounded phrase cannot contain '<': {obj.ref!r}")
            box = v1.normalize_box(obj.box, width, height)
            if previous is not None and obj.ref == previous.ref:
                groups[-1] += v1.format_box(box)
            else:
                groups.append(v1.format_box(box) if obj.ref is None else v1.format_ref(obj.ref, box))
            previous = obj
        return "\n".join(groups)

    def format_inline(self, objects: list[PixelObject | PixelPoint], image_size: ImageSize) -> str:
        return self.format(objects, image_size)

    def parse(self, text: str, image_size: ImageSize) -> list[PixelObject]:
        width, height = image_size
        if width <= 0 or height <= 0:
            return []
        return v1.parse_boxes_pixels(text, width, height)

    def parse_points(self, text: str, image_size: ImageSize) -> list[PixelPoint]:
        return []

    def strip(self, text: str) -> str:
        return v1.strip_grounding(text)

    def validate(self, text: str, image_size: ImageSize | None = None) -> list[str]:
        return v1.validate_box_markup(text)

    def from_v1_markup(self, text: str, image_size: ImageSize) -> str:
        return text
