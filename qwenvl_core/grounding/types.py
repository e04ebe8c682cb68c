"""The pixel-space grounding types every convention converts to and from, and the ``GroundingCodec`` protocol.

Boxes and points are always in pixels of the ORIGINAL image (the file a dataset names, the image a chat request
sends), ``(x1, y1, x2, y2)`` top-left then bottom-right, as floats. ``PixelBox`` / ``PixelObject`` are v1's own
types (``qwenvl_core.models.qwen_vl.grounding``), re-exported here so every family shares one representation;
``PixelPoint`` adds the point grounding that Qwen2.5-VL and Qwen3-VL have and v1 / Qwen2-VL do not.

A codec owns one family's text convention (``qwenvl_core.grounding.<family>``): it formats pixel objects as the
text a model of that family is trained to emit, parses model output back to pixels (leniently: never raises),
strips the markup for display and lists problems of markup in training text with their character positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from qwenvl_core.models.qwen_vl.grounding import PixelBox, PixelObject

ImageSize = tuple[int, int]
"""``(width, height)`` of the ORIGINAL image in pixels."""

__all__ = ["GroundingCodec", "ImageSize", "PixelBox", "PixelObject", "PixelPoint"]


@dataclass(frozen=True)
class PixelPoint:
    """A grounded point in pixel coordinates of a given image, with the phrase it belongs to (None when none)."""

    ref: str | None
    point: tuple[float, float]


@runtime_checkable
class GroundingCodec(Protocol):
    """One family's grounding convention. ``image_size`` is always the ORIGINAL image's ``(width, height)``; a
    codec whose convention depends on the resized image (Qwen2.5-VL) knows its resize rule from its constructor."""

    name: str
    """The convention's family name (``qwen-vl``, ``qwen2-vl``, ``qwen2.5-vl``, ``qwen3-vl``)."""

    ref_markup: tuple[str, str]
    """What wraps a referring phrase that has no box (``<ref>``/``</ref>`` in v1; nothing in the JSON families)."""

    def format(self, objects: list[PixelObject | PixelPoint], image_size: ImageSize) -> str:
        """A whole grounding answer naming ``objects``: exact and deterministic. Raises ``PromptError`` for what
        the convention cannot say (points in v1 / Qwen2-VL, non-finite coordinates, an image it cannot resize)."""
        ...

    def format_inline(self, objects: list[PixelObject | PixelPoint], image_size: ImageSize) -> str:
        """``objects`` written inside prose (a caption with grounding); same numerics as ``format``."""
        ...

    def parse(self, text: str, image_size: ImageSize) -> list[PixelObject]:
        """Every box in model output ``text`` in pixels, corners ordered and clipped to the image; never raises."""
        ...

    def parse_points(self, text: str, image_size: ImageSize) -> list[PixelPoint]:
        """Every point in model output ``text`` in pixels, clipped to the image; never raises."""
        ...

    def strip(self, text: str) -> str:
        """``text`` without coordinates, the referring phrases kept (for display)."""
        ...

    def validate(self, text: str, image_size: ImageSize | None = None) -> list[str]:
        """Problems with the grounding markup of training ``text`` (empty when well formed), each naming its
        character position. Checks the v1 markup the platform converts and the family's own markup; bounds that
        depend on the image are only checked when ``image_size`` is given."""
        ...

    def from_v1_markup(self, text: str, image_size: ImageSize) -> str:
        """``text`` with the platform's v1 markup (``<ref>..</ref><box>(x1,y1),(x2,y2)</box>``, 0-1000 grid of the
        original image) rewritten in this convention; other text is kept."""
        ...
