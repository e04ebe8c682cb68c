"""Qwen2.5-VL grounding: JSON ``[{"bbox_2d": [x1, y1, x2, y2], "label": ...}]`` and ``{"point_2d": [x, y], ...}``
in ABSOLUTE pixel coordinates of the RESIZED image the model saw (``smart_resize`` with the processor's
``min_pixels`` / ``max_pixels`` and factor 28), integers in ``[0, w' - 1] x [0, h' - 1]``.

Sources:
- QwenLM/Qwen2.5-VL README: grounding "using absolute position coordinates, it supports both boxes and points";
  the Qwen2.5-VL blog: "localize objects ... by generating bounding boxes or points, and it can provide stable
  JSON outputs for coordinates and attributes".
- The official converter, QwenLM/Qwen3-VL ``qwen-vl-finetune/tools/process_bbox.ipynb`` ("Qwen2.5-VL using the
  absolute coordinated for the resized image"): ``round(x * new_width / width)`` clipped to
  ``[0, new_width - 1]``, e.g. ``[146, 137, 615, 415]`` on 640x428 -> ``[147, 134, 619, 407]``.
- The Qwen2.5-VL ``cookbooks/spatial_understanding.ipynb`` reads answers with ``input_width =
  image_grid_thw[2] * 14`` and ``bbox_2d[0] / input_width * width`` (boxes in a ```json fence); its points came as
  XML ``<points x1="..." y1="..." alt="...">phrase</points>`` (also read here; written as JSON ``point_2d``, like the
  boxes, so that one answer is one list).
The user-facing trap (QwenLM/Qwen3-VL issues #830, #1300, #1616; ms-swift PR #6178): the numbers change with
``max_pixels``; that is why the codec is built from the job's resize rule and datasets carry pixels or v1 markup.
"""

from __future__ import annotations

from qwenvl_core.grounding.geometry import Frame
from qwenvl_core.grounding.json_codec import JsonCodec
from qwenvl_core.grounding.resize import ResizeRule


def qwen2_5_vl_codec(rule: ResizeRule) -> JsonCodec:
    """The Qwen2.5-VL convention for images resized by ``rule`` (the job's ``min_pixels`` / ``max_pixels``)."""

    def frame_for(image_size: tuple[int, int] | None) -> Frame | None:
        if image_size is None:
            return None
        width, height = rule.resized(image_size)
        return Frame(width, height, width - 1, height - 1)

    def describe(frame: Frame) -> str:
        return (f"qwen2.5-vl uses absolute coordinates of the {frame.units_x}x{frame.units_y} image the model sees "
                f"after resizing (min_pixels={rule.min_pixels}, max_pixels={rule.max_pixels})")

    return JsonCodec("qwen2.5-vl", frame_for, describe)
