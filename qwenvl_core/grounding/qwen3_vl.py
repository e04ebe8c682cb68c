"""Qwen3-VL grounding: JSON ``[{"bbox_2d": [x1, y1, x2, y2], "label": ...}]`` and ``{"point_2d": [x, y], ...}``,
integers on a relative 0-1000 grid of the original image (the resize, patch 16 x merge 2 = factor 32, does not
enter).

Sources:
- QwenLM/Qwen3-VL ``cookbooks/2d_grounding.ipynb``: "Qwen3-VL's default coordinate system has been changed from
  the absolute coordinates used in Qwen2.5-VL to relative coordinates ranging from 0 to 1000. (You don't need to
  calculate the resized_w)"; its ``plot_bounding_boxes`` reads ``bbox_2d[i] / 1000 * width`` and
  ``plot_points_json`` reads ``point_2d`` the same way; prompts ask for "bbox coordinates in JSON format".
- QwenLM/Qwen3-VL ``cookbooks/spatial_understanding.ipynb``: a recorded answer
  "```json\\n[\\n\\t{"point_2d": [925, 618], "label": "point_1"}\\n]\\n```", the layout ``format`` writes.
- ms-swift (modelscope/ms-swift PR #6178): "qwen2/3-vl ... need thousandth normalisation of bbox coordinates".
Writing rounds and clips to ``[0, 1000]`` as the official Qwen2-VL converter does (no Qwen3-VL converter is
published; the grid is the same).
"""

from __future__ import annotations

from qwenvl_core.grounding.geometry import GRID_1000, Frame
from qwenvl_core.grounding.json_codec import JsonCodec


def _grid(image_size: tuple[int, int] | None) -> Frame:
    return GRID_1000


def _describe(frame: Frame) -> str:
    return "qwen3-vl uses a relative 0-1000 grid (absolute pixels of the resized image are Qwen2.5-VL's convention)"


def qwen3_vl_codec() -> JsonCodec:
    """The Qwen3-VL convention (independent of image resizing)."""
    return JsonCodec("qwen3-vl", _grid, _describe)
