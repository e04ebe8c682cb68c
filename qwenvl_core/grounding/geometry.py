"""Coordinate frames: the numerics shared by every codec written here (v1 keeps its own, unchanged).

A convention writes coordinates as integers in a *frame*: ``units`` model units span the image's width / height,
and written values are clipped to ``[0, max]``. The 0-1000 grids of Qwen2-VL and Qwen3-VL are
``Frame(1000, 1000, 1000, 1000)``; Qwen2.5-VL's absolute coordinates of the resized ``w' x h'`` image are
``Frame(w', h', w' - 1, h' - 1)``. Writing rounds with Python's ``round`` (half to even), as the official
converters do (Qwen3-VL repo, ``qwen-vl-finetune/tools/process_bbox.ipynb``); reading maps ``v / units * size``
without rounding (the cookbooks truncate with ``int()`` only to draw) and clips to the image.

``iou`` compares two boxes. This module also checks pixel boxes / points that dataset authors give (``pixel_problems``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from qwenvl_core.errors import PromptError
from qwenvl_core.grounding.types import ImageSize, PixelObject, PixelPoint


@dataclass(frozen=True)
class Frame:
    """Model units per image side (``units_x``, ``units_y``) and the largest value written on each axis."""

    units_x: int
    units_y: int
    max_x: int
    max_y: int

    def write(self, x: float, y: float, image_size: ImageSize) -> tuple[int, int]:
        """Pixel ``(x, y)`` of an image of ``image_size`` as model units, rounded and clipped."""
        width, height = image_size
        if not (math.isfinite(x) and math.isfinite(y)):
            raise PromptError(f"coordinate ({x}, {y}) is not a finite number")
        return (_clip(round(x / width * self.units_x), 0, self.max_x),
                _clip(round(y / height * self.units_y), 0, self.max_y))

    def read(self, x: float, y: float, image_size: ImageSize) -> tuple[float, float]:
        """Model units ``(x, y)`` as pixels of an image of ``image_size``, clipped to the image."""
        width, height = image_size
        return (_clip(x / self.units_x * width, 0.0, float(width)),
                _clip(y / self.units_y * height, 0.0, float(height)))


GRID_1000 = Frame(1000, 1000, 1000, 1000)
"""The relative grid of Qwen2-VL and Qwen3-VL: 0 is the left / top edge, 1000 the right / bottom edge."""


def _clip(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes ``(x1, y1, x2, y2)`` in the same frame (pixels, or a 0-1000 grid)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area if area > 0 else 0.0


def write_box(frame: Frame, box: Sequence[float], image_size: ImageSize) -> tuple[int, int, int, int]:
    """A pixel box as model units, corners ordered (top-left first)."""
    x1, y1 = frame.write(box[0], box[1], image_size)
    x2, y2 = frame.write(box[2], box[3], image_size)
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def read_box(frame: Frame, values: Sequence[float], image_size: ImageSize) -> tuple[float, float, float, float]:
    """Model units ``(x1, y1, x2, y2)`` as a pixel box, corners ordered and clipped to the image."""
    x1, y1 = frame.read(values[0], values[1], image_size)
    x2, y2 = frame.read(values[2], values[3], image_size)
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def check_size(image_size: ImageSize) -> None:
    """Raise ``PromptError`` unless ``image_size`` is two positive integers."""
    width, height = image_size
    if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in (width, height)):
        raise PromptError(f"image size must be two positive integers (width, height), got {image_size!r}")


def pixel_problems(objects: Sequence[PixelObject | PixelPoint], image_size: ImageSize) -> list[str]:
    """Problems with pixel boxes / points a dataset author gave for an image of ``image_size`` (empty when fine):
    non-finite values, coordinates outside ``[0, width] x [0, height]``, x2 < x1 or y2 < y1."""
    width, height = image_size
    problems: list[str] = []
    for i, obj in enumerate(objects):
        values = obj.box if isinstance(obj, PixelObject) else obj.point
        where = f"object {i}" + (f" ({obj.ref!r})" if obj.ref else "")
        if len(values) != (4 if isinstance(obj, PixelObject) else 2):
            problems.append(f"{where}: expected {'4 box' if isinstance(obj, PixelObject) else '2 point'} "
                            f"coordinates, got {len(values)}")
            continue
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            problems.append(f"{where}: coordinates must be finite numbers, got {list(values)}")
            continue
        for axis, value in zip("xyxy", values, strict=False):
            limit = width if axis == "x" else height
            if not 0 <= value <= limit:
                problems.append(f"{where}: {axis}={value} is outside the image (0..{limit} px)")
        if isinstance(obj, PixelObject) and (values[2] < values[0] or values[3] < values[1]):
            problems.append(f"{where}: box {list(values)} has x2 < x1 or y2 < y1")
    return problems
