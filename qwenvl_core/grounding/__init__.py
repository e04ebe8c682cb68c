"""Grounding written once: pixel boxes / points <-> each Qwen VL family's own text convention.

Datasets and chat responses speak pixels of the original image (``PixelObject``, ``PixelPoint``) or the
platform's v1 markup; a ``GroundingCodec`` per family converts when a sample is encoded (``format`` /
``from_v1_markup``) and when model output is read (``parse`` / ``parse_points``), and checks training text
(``validate``). ``codec_for(family, rule)`` picks the codec from a table, so callers never branch on the family.

| family       | written as                                                          | coordinates                  |
|--------------|---------------------------------------------------------------------|------------------------------|
| qwen-vl      | ``<ref>p</ref><box>(x1,y1),(x2,y2)</box>``                          | 0-999 grid, original image   |
| qwen2-vl     | ``<|object_ref_start|>p<|object_ref_end|><|box_start|>(..),(..)<|box_end|>`` | 0-1000 grid      |
| qwen2.5-vl   | ```json ``[{"bbox_2d": [..], "label": p}]``, ``point_2d``            | pixels of the RESIZED image  |
| qwen3-vl     | ```json ``[{"bbox_2d": [..], "label": p}]``, ``point_2d``            | 0-1000 grid                  |

Modules: ``types`` (pixel types, the protocol), ``geometry`` (frames and rounding), ``resize`` (transformers'
``smart_resize`` with a job's pixel budget), ``tags`` / ``json_codec`` (the two markup styles), ``v1_markup``
(rewriting the dataset markup), and one module per family citing where its convention is stated.
"""

from __future__ import annotations

from collections.abc import Callable

from qwenvl_core.errors import ConfigError
from qwenvl_core.grounding.geometry import pixel_problems
from qwenvl_core.grounding.qwen2_5_vl import qwen2_5_vl_codec
from qwenvl_core.grounding.qwen2_vl import qwen2_vl_codec
from qwenvl_core.grounding.qwen3_vl import qwen3_vl_codec
from qwenvl_core.grounding.qwen_vl import QwenVLCodec
from qwenvl_core.grounding.resize import ResizeRule
from qwenvl_core.grounding.types import GroundingCodec, ImageSize, PixelBox, PixelObject, PixelPoint

__all__ = [
    "CODECS",
    "GroundingCodec",
    "ImageSize",
    "PixelBox",
    "PixelObject",
    "PixelPoint",
    "ResizeRule",
    "codec_for",
    "pixel_problems",
]

CODECS: dict[str, Callable[[ResizeRule], GroundingCodec]] = {
    "qwen-vl": lambda rule: QwenVLCodec(),
    "qwen2-vl": lambda rule: qwen2_vl_codec(),
    "qwen2.5-vl": qwen2_5_vl_codec,
    "qwen3-vl": lambda rule: qwen3_vl_codec(),
}
"""Family name -> codec builder; only Qwen2.5-VL's convention depends on the resize rule."""


def codec_for(family: str, rule: ResizeRule | None = None) -> GroundingCodec:
    """The grounding codec of model family ``family`` for images resized by ``rule`` (default: the Qwen2-VL
    image processor's defaults; pass the job's / the served model's rule)."""
    builder = CODECS.get(str(family))
    if builder is None:
        raise ConfigError(f"no grounding convention for model family {family!r}; known: {', '.join(CODECS)}")
    return builder(rule or ResizeRule())
