"""Rewriting the platform's dataset markup (v1's ``<ref>..</ref><box>(x1,y1),(x2,y2)</box>``, 0-1000 grid of the
original image) in another family's convention.

Each span (an optional ``<ref>`` followed by one or more ``<box>``, whitespace between) is read with v1's own
parser (``parse_boxes_pixels``: v1 numerics, one ref naming several boxes) into pixel boxes and written with the
target codec. When the text is nothing but spans, it becomes one whole answer (``codec.format``: a JSON list in
the JSON families, as their models answer); spans inside prose are written with ``codec.format_inline``. A
``<ref>`` without a box becomes the codec's ``ref_markup``. A span v1 cannot read (malformed coordinates) and
``<quad>`` spans (v1 only) are left as they are; the validator reports them.
"""

from __future__ import annotations

import re

from qwenvl_core.grounding.types import GroundingCodec, ImageSize
from qwenvl_core.models.qwen_vl.grounding import parse_boxes_pixels

_BOX = r"<box>[^<]*</box>"
_SPAN = re.compile(rf"(?P<span>(?:<ref>[^<]*</ref>)?\s*{_BOX}(?:\s*{_BOX})*)|<ref>(?P<ref>[^<]*)</ref>")
_BOX_TAG = re.compile(r"<box>")


def rewrite_v1_markup(text: str, image_size: ImageSize, codec: GroundingCodec) -> str:
    """``text`` with its v1 grounding spans written in ``codec``'s convention (see the module docstring)."""
    width, height = image_size
    matches = list(_SPAN.finditer(text))
    if not matches:
        return text
    spans = [m for m in matches if m["span"] is not None]
    if spans and not _SPAN.sub("", text).strip() and len(spans) == len(matches):
        objects = [o for m in spans for o in parse_boxes_pixels(m["span"], width, height)]
        if len(objects) == sum(len(_BOX_TAG.findall(m["span"])) for m in spans):
            return codec.format(objects, image_size)
    return _SPAN.sub(lambda m: _rewrite_one(m, image_size, codec), text)


def _rewrite_one(match: re.Match[str], image_size: ImageSize, codec: GroundingCodec) -> str:
    if match["span"] is None:
        opening, closing = codec.ref_markup
        return f"{opening}{match['ref']}{closing}"
    span = match["span"]
    leading = span[: len(span) - len(span.lstrip())]
    objects = parse_boxes_pixels(span, *image_size)
    if len(objects) != len(_BOX_TAG.findall(span)):
        return span
    return leading + codec.format_inline(list(objects), image_size)
