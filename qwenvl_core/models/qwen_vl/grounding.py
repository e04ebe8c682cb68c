"""Qwen-VL grounding markup: ``<ref>text</ref><box>(x1,y1),(x2,y2)</box>``.

This module owns the box format (integer corners normalised to [0, 1000) of the image width / height,
top-left then bottom-right), conversion between pixel and normalised boxes, tolerant parsing of model output,
stripping the markup for display, strict validation for training data, and drawing boxes on an image.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from qwenvl_core.errors import PromptError

GRID = 1000  # normalised coordinates are integers in [0, GRID)

_NUM = r"\s*(-?\d+)\s*"
_POINT = rf"\({_NUM},{_NUM}\)"
_BOX_COORDS = re.compile(rf"\s*{_POINT}\s*,\s*{_POINT}\s*")
_QUAD_COORDS = re.compile(rf"\s*{_POINT}\s*,\s*{_POINT}\s*,\s*{_POINT}\s*,\s*{_POINT}\s*")
# Ref text and box contents never contain '<', so a missing closing tag cannot swallow later markup.
_REF_OR_BOX = re.compile(r"<ref>(?P<ref>[^<]*)</ref>|<box>(?P<box>[^<]*)</box>")
_BOX_OR_QUAD = re.compile(r"<(?P<tag>box|quad)>(?P<body>[^<]*)</(?P=tag)>")
_TAG = re.compile(r"<(?P<close>/?)(?P<name>ref|box|quad)>")
_STRIP_SPANS = re.compile(r"<(box|quad)>[^<]*</\1>")

_COLOURS = ("red", "lime", "blue", "orange", "magenta", "cyan", "yellow", "purple")


@dataclass(frozen=True)
class Box:
    """A normalised box: integer corners in [0, 1000), (x1, y1) top-left, (x2, y2) bottom-right."""

    x1: int
    y1: int
    x2: int
    y2: int

    def __post_init__(self) -> None:
        for name in ("x1", "y1", "x2", "y2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < GRID:
                raise PromptError(f"box {name}={value!r} must be an integer in [0, {GRID})")
        if self.x2 < self.x1 or self.y2 < self.y1:
            raise PromptError(f"box ({self.x1},{self.y1}),({self.x2},{self.y2}): x2 < x1 or y2 < y1")


@dataclass(frozen=True)
class GroundedObject:
    """One box from model output, with the ``<ref>`` text it belongs to (None when it has none)."""

    ref: str | None
    box: Box


PixelBox = tuple[float, float, float, float]


@dataclass(frozen=True)
class PixelObject:
    """A grounded object in pixel coordinates of a given image."""

    ref: str | None
    box: PixelBox


def format_box(box: Box) -> str:
    """``<box>(x1,y1),(x2,y2)</box>``."""
    return f"<box>({box.x1},{box.y1}),({box.x2},{box.y2})</box>"


def format_ref(text: str, box: Box) -> str:
    """``<ref>text</ref><box>(x1,y1),(x2,y2)</box>``."""
    return f"<ref>{text}</ref>{format_box(box)}"


def _to_grid(value: float, size: int) -> int:
    return min(max(round(value / size * GRID), 0), GRID - 1)


def normalize_box(box: Sequence[float], width: int, height: int) -> Box:
    """A pixel box ``(x1, y1, x2, y2)`` of a ``width`` x ``height`` image as a normalised ``Box``."""
    if width <= 0 or height <= 0:
        raise PromptError(f"image size must be positive, got {width}x{height}")
    x1, y1, x2, y2 = box
    xs = sorted((_to_grid(x1, width), _to_grid(x2, width)))
    ys = sorted((_to_grid(y1, height), _to_grid(y2, height)))
    return Box(xs[0], ys[0], xs[1], ys[1])


def to_pixels(box: Box, width: int, height: int) -> PixelBox:
    """The pixel corners of a normalised box (``x / 1000 * w``, as the official drawing code)."""
    return (box.x1 / GRID * width, box.y1 / GRID * height, box.x2 / GRID * width, box.y2 / GRID * height)


def _lenient_box(body: str) -> Box | None:
    """Parse box coordinates from model output: 1000 is clamped to 999, swapped corners reordered."""
    match = _BOX_COORDS.fullmatch(body)
    if match is None:
        return None
    values = [int(v) for v in match.groups()]
    if any(not 0 <= v <= GRID for v in values):
        return None
    x1, y1, x2, y2 = (min(v, GRID - 1) for v in values)
    return Box(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def parse_grounding(text: str) -> list[GroundedObject]:
    """Every box in ``text`` with its ref; never raises.

    A ``<ref>`` applies to the boxes that follow it with only whitespace between (one ref may name several
    boxes); a box after other text has no ref. Malformed boxes are skipped.
    """
    objects: list[GroundedObject] = []
    for ref, body in iter_ref_boxes(_REF_OR_BOX, text):
        box = _lenient_box(body)
        if box is not None:
            objects.append(GroundedObject(ref=ref, box=box))
    return objects


def iter_ref_boxes(pattern: re.Pattern[str], text: str) -> Iterator[tuple[str | None, str]]:
    """``(ref, box body)`` of every box ``pattern`` (groups ``ref`` / ``box``) finds in ``text``, in order: a box
    takes the ref written before it, also when several boxes follow one ref; other text in between clears it. The
    tag conventions of v1 and Qwen2-VL (``qwenvl_core.grounding.tags``) read boxes this way."""
    ref: str | None = None
    last_end = 0
    for match in pattern.finditer(text):
        if text[last_end : match.start()].strip():
            ref = None
        last_end = match.end()
        if match["ref"] is not None:
            ref = match["ref"].strip()
            continue
        yield ref, match["box"]


def parse_boxes_pixels(text: str, width: int, height: int) -> list[PixelObject]:
    """``parse_grounding`` with boxes mapped to pixels of a ``width`` x ``height`` image."""
    return [PixelObject(o.ref, to_pixels(o.box, width, height)) for o in parse_grounding(text)]


def strip_grounding(text: str) -> str:
    """``text`` without grounding markup: boxes and quads removed, ref text kept."""
    return _TAG.sub("", _STRIP_SPANS.sub("", text))


def validate_box_markup(text: str) -> list[str]:
    """Problems with the grounding markup in training text (empty when it is well formed)."""
    return _tag_problems(text) + [p for m in _BOX_OR_QUAD.finditer(text) for p in _coord_problems(m)]


def _tag_problems(text: str) -> list[str]:
    problems: list[str] = []
    open_tag: re.Match[str] | None = None
    for tag in _TAG.finditer(text):
        name, pos = tag["name"], tag.start()
        if not tag["close"]:
            if open_tag is not None:
                problems.append(f"'<{name}>' at char {pos} opened before '<{open_tag['name']}>' was closed")
            open_tag = tag
        elif open_tag is None or open_tag["name"] != name:
            problems.append(f"'</{name}>' at char {pos} has no matching '<{name}>'")
            open_tag = None
        else:
            open_tag = None
    if open_tag is not None:
        problems.append(f"'<{open_tag['name']}>' at char {open_tag.start()} is never closed")
    return problems


def _coord_problems(match: re.Match[str]) -> list[str]:
    tag, body = match["tag"], match["body"]
    where = f"{tag} {match.group(0)!r} at char {match.start()}"
    pattern = _BOX_COORDS if tag == "box" else _QUAD_COORDS
    coords = pattern.fullmatch(body)
    if coords is None:
        shape = "(x1,y1),(x2,y2)" if tag == "box" else "four points (x,y)"
        return [f"{where}: malformed coordinates, expected {shape} with integers"]
    values = [int(v) for v in coords.groups()]
    problems = [f"{where}: coordinate {v} outside [0, {GRID})" for v in values if not 0 <= v < GRID]
    if tag == "box":
        x1, y1, x2, y2 = values
        if x2 < x1:
            problems.append(f"{where}: x2 ({x2}) < x1 ({x1})")
        if y2 < y1:
            problems.append(f"{where}: y2 ({y2}) < y1 ({y1})")
    return problems


def draw_boxes(image: Image.Image, objects: Sequence[GroundedObject]) -> Image.Image:
    """A copy of ``image`` (RGB) with each box drawn as a rectangle, labelled with its ref."""
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    line = max(1, min(canvas.size) // 200)
    for obj, colour in zip(objects, _cycle_colours(), strict=False):
        x1, y1, x2, y2 = to_pixels(obj.box, canvas.width, canvas.height)
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
        if obj.ref:
            left, top, right, bottom = draw.textbbox((x1, y1), obj.ref, font=font)
            draw.rectangle((left, top, right, bottom), fill=colour)
            draw.text((x1, y1), obj.ref, fill="white", font=font)
    return canvas


def _cycle_colours() -> Iterator[str]:
    while True:
        yield from _COLOURS
