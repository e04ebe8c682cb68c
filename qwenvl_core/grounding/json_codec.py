"""JSON grounding (Qwen2.5-VL, Qwen3-VL): ``{"bbox_2d": [x1, y1, x2, y2], "label": ...}`` and
``{"point_2d": [x, y], "label": ...}`` objects, a whole answer being a list in a ```json fence, as the official
cookbooks show the models answering. The family decides the coordinate frame (``frame_for``).

Parsing is lenient the way model output needs: objects are found anywhere (in a fence or bare, alone or in a
list, with text around, in a truncated list whose last object is cut off), values may be floats or nested once
(``[[x1, y1, x2, y2]]``), corners may be swapped (ordered) or outside the image (clipped); anything else is
skipped, never raised. The XML points of the Qwen2.5-VL cookbook (``<points x1="..." y1="..." alt="...">phrase
</points>``) are read as well. Formatting is exact: integers, ``json.dumps`` with ``ensure_ascii=False``, one
object per tab-indented line.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from qwenvl_core.errors import PromptError
from qwenvl_core.grounding.geometry import Frame, check_size, read_box, write_box
from qwenvl_core.grounding.types import ImageSize, PixelObject, PixelPoint
from qwenvl_core.grounding.v1_markup import rewrite_v1_markup
from qwenvl_core.models.qwen_vl.grounding import validate_box_markup

BOX_KEY, POINT_KEY, LABEL_KEY = "bbox_2d", "point_2d", "label"
_SHAPES = {BOX_KEY: 4, POINT_KEY: 2}
_OBJECT_START = re.compile(r'\{(?=\s*")')
_KEY = re.compile(r'"(bbox_2d|point_2d)"')
_XML_POINTS = re.compile(r"<points\b(?P<attrs>[^<>]*?)/?>(?:(?P<text>[^<]*)</points>)?")
_XML_ATTR = re.compile(r'(\w+)\s*=\s*"([^"]*)"')
_BLOCK_GAP = re.compile(r"[\s,]*")
_OPEN_TAIL = re.compile(r"(?:```[A-Za-z]*\s*)?\[\s*\Z")
_CLOSE_HEAD = re.compile(r"[\s,]*\](?:\s*```)?")
_DECODER = json.JSONDecoder()

FrameFor = Callable[[ImageSize | None], Frame | None]
"""The frame of an image of a given original size (None: not known without the size)."""


@dataclass(frozen=True)
class _Entry:
    """A decoded grounding object and where it is in the text."""

    start: int
    end: int
    value: dict[str, Any]


class JsonCodec:
    """A ``GroundingCodec`` for the JSON conventions; ``describe`` explains a frame in validation messages."""

    ref_markup = ("", "")

    def __init__(self, name: str, frame_for: FrameFor, describe: Callable[[Frame], str]) -> None:
        self.name, self._frame_for, self._describe = name, frame_for, describe

    def _frame(self, image_size: ImageSize) -> Frame:
        frame = self._frame_for(image_size)
        assert frame is not None  # a frame is always known given the size
        return frame

    # -- formatting ------------------------------------------------------------------------------------------

    def _entries(self, objects: list[PixelObject | PixelPoint], image_size: ImageSize) -> list[str]:
        check_size(image_size)
        frame = self._frame(image_size)
        out = []
        for obj in objects:
            if isinstance(obj, PixelObject):
                entry: dict[str, Any] = {BOX_KEY: list(write_box(frame, obj.box, image_size))}
            else:
                entry = {POINT_KEY: list(frame.write(obj.point[0], obj.point[1], image_size))}
            if obj.ref is not None:
                entry[LABEL_KEY] = obj.ref
            out.append(json.dumps(entry, ensure_ascii=False))
        return out

    def format(self, objects: list[PixelObject | PixelPoint], image_size: ImageSize) -> str:
        entries = self._entries(objects, image_size)
        body = "[\n" + ",\n".join(f"\t{e}" for e in entries) + "\n]" if entries else "[]"
        return f"```json\n{body}\n```"

    def format_inline(self, objects: list[PixelObject | PixelPoint], image_size: ImageSize) -> str:
        entries = self._entries(objects, image_size)
        return entries[0] if len(entries) == 1 else "[" + ", ".join(entries) + "]"

    def from_v1_markup(self, text: str, image_size: ImageSize) -> str:
        return rewrite_v1_markup(text, image_size, self)

    # -- parsing ---------------------------------------------------------------------------------------------

    def parse(self, text: str, image_size: ImageSize) -> list[PixelObject]:
        frame = self._safe_frame(image_size)
        if frame is None:
            return []
        return [PixelObject(_label(e.value), read_box(frame, values, image_size))
                for e in find_entries(text) if (values := _numbers(e.value.get(BOX_KEY), 4)) is not None]

    def parse_points(self, text: str, image_size: ImageSize) -> list[PixelPoint]:
        frame = self._safe_frame(image_size)
        if frame is None:
            return []
        points = [PixelPoint(_label(e.value), frame.read(values[0], values[1], image_size))
                  for e in find_entries(text) if (values := _numbers(e.value.get(POINT_KEY), 2)) is not None]
        return points + [PixelPoint(ref, frame.read(x, y, image_size)) for ref, x, y in _xml_points(text)]

    def _safe_frame(self, image_size: ImageSize) -> Frame | None:
        try:
            check_size(image_size)
            return self._frame_for(image_size)
        except (PromptError, TypeError, ValueError):
            return None

    # -- display and validation ------------------------------------------------------------------------------

    def strip(self, text: str) -> str:
        """Each block of grounding objects (with its list brackets and fence) replaced by their labels."""
        out, last = [], 0
        for start, end, labels in _blocks(text, find_entries(text)):
            out += [text[last:start], ", ".join(labels)]
            last = end
        return "".join(out) + text[last:]

    def validate(self, text: str, image_size: ImageSize | None = None) -> list[str]:
        entries = find_entries(text)
        problems = validate_box_markup(text)
        try:
            frame = self._frame_for(image_size)
        except PromptError as exc:
            frame, problems = None, [*problems, str(exc)]
        covered = [(e.start, e.end) for e in entries]
        problems += [f"'{m.group(1)}' at char {m.start()} is not in a well-formed JSON object"
                     for m in _KEY.finditer(text) if not any(s <= m.start() < e for s, e in covered)]
        for entry in entries:
            problems += self._entry_problems(entry, frame)
        return problems

    def _entry_problems(self, entry: _Entry, frame: Frame | None) -> list[str]:
        where = f"object at char {entry.start}"
        problems = []
        label = entry.value.get(LABEL_KEY)
        if label is not None and not isinstance(label, str):
            problems.append(f"{where}: '{LABEL_KEY}' must be a string, got {label!r}")
        for key, count in _SHAPES.items():
            if key not in entry.value:
                continue
            values = entry.value[key]
            if not (isinstance(values, list) and len(values) == count and all(_is_number(v) for v in values)):
                problems.append(f"{where}: '{key}' must be a list of {count} numbers, got {values!r}")
                continue
            problems += [f"{where}: '{key}' value {v!r} is not an integer" for v in values if not isinstance(v, int)]
            problems += self._range_problems(where, key, values, frame)
            if key == BOX_KEY and (values[2] < values[0] or values[3] < values[1]):
                problems.append(f"{where}: '{key}' {values} has x2 < x1 or y2 < y1")
        return problems

    def _range_problems(self, where: str, key: str, values: list[float], frame: Frame | None) -> list[str]:
        problems = [f"{where}: '{key}' value {v} is negative" for v in values if v < 0]
        if frame is not None:
            for axis, value in zip("xyxy", values, strict=False):
                limit = frame.max_x if axis == "x" else frame.max_y
                if value > limit:
                    problems.append(f"{where}: '{key}' {axis}={value} exceeds {limit}: {self._describe(frame)}")
        return problems


def find_entries(text: str) -> list[_Entry]:
    """Every JSON object in ``text`` that has ``bbox_2d`` or ``point_2d``, in order (objects nested in other
    objects or lists are found too)."""
    if _KEY.search(text) is None:
        return []
    entries: list[_Entry] = []
    resume = 0
    for match in _OBJECT_START.finditer(text):
        if match.start() < resume:
            continue
        try:
            value, end = _DECODER.raw_decode(text, match.start())
        except (ValueError, RecursionError):
            continue
        if isinstance(value, dict) and (BOX_KEY in value or POINT_KEY in value):
            entries.append(_Entry(match.start(), end, value))
            resume = end
    return entries


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _numbers(values: Any, count: int) -> list[float] | None:
    """``count`` finite numbers from a model's coordinate list (nested lists flattened once), else None."""
    if not isinstance(values, list):
        return None
    if values and all(isinstance(v, list) for v in values):
        values = [v for inner in values for v in inner]
    if len(values) != count or not all(_is_number(v) for v in values):
        return None
    return [float(v) for v in values]


def _label(value: dict[str, Any]) -> str | None:
    label = value.get(LABEL_KEY)
    return label.strip() if isinstance(label, str) else None


def _xml_points(text: str) -> Iterator[tuple[str | None, float, float]]:
    """Points of ``<points x1="..." y1="..." x2=... alt="...">phrase</points>`` (the Qwen2.5-VL cookbook)."""
    for match in _XML_POINTS.finditer(text):
        attrs = dict(_XML_ATTR.findall(match["attrs"]))
        ref = (attrs.get("alt") or (match["text"] or "")).strip() or None
        i = 1
        while f"x{i}" in attrs and f"y{i}" in attrs:
            try:
                x, y = float(attrs[f"x{i}"]), float(attrs[f"y{i}"])
            except ValueError:
                break
            if math.isfinite(x) and math.isfinite(y):
                yield ref, x, y
            i += 1


def _blocks(text: str, entries: list[_Entry]) -> Iterator[tuple[int, int, list[str]]]:
    """Runs of entries separated only by commas / whitespace, widened over their ``[ ]`` and ```json fence."""
    run: list[_Entry] = []
    for entry in [*entries, None]:
        if entry is not None and run and _BLOCK_GAP.fullmatch(text[run[-1].end : entry.start]):
            run.append(entry)
            continue
        if run:
            start, end = run[0].start, run[-1].end
            head, tail = _OPEN_TAIL.search(text[:start]), _CLOSE_HEAD.match(text, end)
            if head and tail:
                start, end = head.start(), tail.end()
            yield start, end, [label for e in run if (label := _label(e.value))]
        run = [entry] if entry is not None else []
