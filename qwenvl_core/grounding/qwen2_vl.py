"""Qwen2-VL grounding: ``<|object_ref_start|>phrase<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``,
integers on a relative 0-1000 grid of the original image.

Sources:
- QwenLM (maintainer kq-chen, QwenLM/Qwen3-VL issue #105, 2024-09-06): the special tokens "correspond to <ref>,
  </ref>, <box>, and </box> tokens used in the Qwen-VL paper. Apart from the renaming of these special
  characters, all other details are consistent with the implementation in Qwen-VL, including the normalization
  of coordinates"; issue #9: "normalized relative coordinates" on the 1000 grid.
- The official converter, QwenLM/Qwen3-VL ``qwen-vl-finetune/tools/process_bbox.ipynb``
  ("Convert to Qwen2-VL training format"): ``round(x / w * 1000)`` clipped to ``[0, 1000]``. That clip (1000
  allowed) is what is followed here, where v1 clamps to 999; the right / bottom edge is thus exact.
- The tokens are in the Qwen2-VL tokenizer (ids 151646-151651, with ``<|quad_start|>`` / ``<|quad_end|>``).
  They are special tokens: decoding with ``skip_special_tokens=True`` removes them, so the text parsed here must be
  decoded with them kept.
No points in this convention.
"""

from __future__ import annotations

from qwenvl_core.grounding.geometry import GRID_1000
from qwenvl_core.grounding.tags import TagCodec, TagSet

QWEN2_VL_TAGS = TagSet(ref=("<|object_ref_start|>", "<|object_ref_end|>"), box=("<|box_start|>", "<|box_end|>"),
                       quad=("<|quad_start|>", "<|quad_end|>"))


def qwen2_vl_codec() -> TagCodec:
    """The Qwen2-VL convention (independent of image resizing)."""
    return TagCodec("qwen2-vl", QWEN2_VL_TAGS, GRID_1000)
