"""Special-token grounding markup (Qwen2-VL's ``<|object_ref_start|>phrase<|object_ref_end|><|box_start|>
(x1,y1),(x2,y2)<|box_end|>``): formatting, lenient parsing, stripping and validation for a given token set and
coordinate frame.

The structure is v1's with other tokens: a phrase applies to the boxes that follow it with only whitespace
between (one phrase may name several boxes); a box after other text has no phrase. Consequently a box without a
phrase written right after a named one is read back with that phrase.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from qwenvl_core.errors import PromptError
from qwenvl_core.grounding.geometry import Frame, check_size, read_box, write_box
from qwenvl_core.grounding.types import ImageSize, PixelObject, PixelPoint
from qwenvl_core.grounding.v1_markup import rewrite_v1_markup
from qwenvl_core.models.qwen_vl.grounding import iter_ref_boxes, validate_box_markup

_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_POINT = rf"\({_NUM},{_NUM}\)"
_BOX_COORDS = re.compile(rf"\s*{_POINT}\s*,\s*{_POINT}\s*")
_QUAD_COORDS = re.compile(rf"\s*{_POINT}(?:\s*,\s*{_POINT}){{3}}\s*")


@dataclass(frozen=True)
class TagSet:
    """The opening / closing tokens of a phrase, a box and a quad."""

    ref: tuple[str, str]
    box: tuple[str, str]
    quad: tuple[str, str]


class TagCodec:
    """A ``GroundingCodec`` writing special tokens around phrases and boxes, coordinates in ``frame``."""

    def __init__(self, name: str, tags: TagSet, frame: Frame) -> None:
        self.name, self.tags, self.frame = name, tags, frame
        self.ref_markup = tags.ref
        (ro, rc), (bo, bc), (qo, qc) = ((re.escape(a), re.escape(b)) for a, b in (tags.ref, tags.box, tags.quad))
        body = r"(?:(?!<\|).)*"  # a body never contains another token, so a missing close cannot swallow markup
        self._ref_or_box = re.compile(rf"{ro}(?P<ref>{body}){rc}|{bo}(?P<box>{body}){bc}", re.DOTALL)
        self._spans = re.compile(rf"{bo}{body}{bc}|{qo}{body}{qc}", re.DOTALL)
        self._shaped = re.compile(rf"(?P<open>{bo}|{qo})(?P<body>{body})(?P<close>{bc}|{qc})", re.DOTALL)
        names = {tags.ref[0]: "ref", tags.box[0]: "box", tags.quad[0]: "quad"}
        names.update({tags.ref[1]: "/ref", tags.box[1]: "/box", tags.quad[1]: "/quad"})
        self._token_names = names
        self._tokens = re.compile("|".join(re.escape(t) for t in names))

    def format(self, objects: list[PixelObject | PixelPoint], image_size: ImageSize) -> str:
        """Consecutive objects with the same phrase share one phrase; groups are joined by newlines."""
        check_size(image_size)
        groups: list[str] = []
        previous: PixelObject | None = None
        for obj in objects:
            if not isinstance(obj, PixelObject):
                raise PromptError(f"the {self.name} grounding convention has boxes only, no points")
            if obj.ref is not None and self._tokens.search(obj.ref):
                raise PromptError(f"a grounded phrase cannot contain grounding tokens: {obj.ref!r}")
            x1, y1, x2, y2 = write_box(self.frame, obj.box, image_size)
            box = f"{self.tags.box[0]}({x1},{y1}),({x2},{y2}){self.tags.box[1]}"
            if previous is not None and obj.ref == previous.ref:
                groups[-1] += box
            else:
                groups.append(box if obj.ref is None else f"{self.tags.ref[0]}{obj.ref}{self.tags.ref[1]}{box}")
            previous = obj
        return "\n".join(groups)

    def format_inline(self, objects: list[PixelObject | PixelPoint], image_size: ImageSize) -> str:
        return self.format(objects, image_size)

    def from_v1_markup(self, text: str, image_size: ImageSize) -> str:
        return rewrite_v1_markup(text, image_size, self)

    def parse_points(self, text: str, image_size: ImageSize) -> list[PixelPoint]:
        return []

    def parse(self, text: str, image_size: ImageSize) -> list[PixelObject]:
        if image_size[0] <= 0 or image_size[1] <= 0:
            return []
        return [PixelObject(ref, read_box(self.frame, values, image_size)) for ref, values in self._boxes(text)]

    def _boxes(self, text: str) -> Iterator[tuple[str | None, list[float]]]:
        for ref, body in iter_ref_boxes(self._ref_or_box, text):
            coords = _BOX_COORDS.fullmatch(body)
            if coords is not None:
                yield ref, [float(v) for v in coords.groups()]

    def strip(self, text: str) -> str:
        """Boxes and quads removed, phrase tokens removed, phrase text kept."""
        return self._tokens.sub("", self._spans.sub("", text))

    def validate(self, text: str, image_size: ImageSize | None = None) -> list[str]:
        """Problems of v1 markup (the platform's) and of this token markup, with character positions."""
        problems = validate_box_markup(text) + self._tag_problems(text)
        for match in self._shaped.finditer(text):
            problems += self._coord_problems(match)
        return problems

    def _tag_problems(self, text: str) -> list[str]:
        problems: list[str] = []
        open_tag: tuple[str, int] | None = None
        for token in self._tokens.finditer(text):
            name, pos = self._token_names[token.group(0)], token.start()
            if not name.startswith("/"):
                if open_tag is not None:
                    problems.append(f"'{token.group(0)}' at char {pos} opened before '{open_tag[0]}' was closed")
                open_tag = (token.group(0), pos)
            elif open_tag is None or self._token_names[open_tag[0]] != name[1:]:
                problems.append(f"'{token.group(0)}' at char {pos} has no matching opening token")
                open_tag = None
            else:
                open_tag = None
        if open_tag is not None:
            problems.append(f"'{open_tag[0]}' at char {open_tag[1]} is never closed")
        return problems

    def _coord_problems(self, match: re.Match[str]) -> list[str]:
        is_box = match["open"] == self.tags.box[0]
        if is_box != (match["close"] == self.tags.box[1]):
            return []  # mismatched tokens: reported by _tag_problems
        where = f"{match.group(0)!r} at char {match.start()}"
        coords = (_BOX_COORDS if is_box else _QUAD_COORDS).fullmatch(match["body"])
        if coords is None:
            shape = "(x1,y1),(x2,y2)" if is_box else "four points (x,y)"
            return [f"{where}: malformed coordinates, expected {shape} with integers"]
        values = coords.groups()
        problems = [f"{where}: coordinate {v} is not an integer" for v in values if "." in v]
        numbers = [float(v) for v in values]
        limit = max(self.frame.max_x, self.frame.max_y)
        problems += [f"{where}: coordinate {v:g} outside [0, {limit}] ({self.name} uses a relative 0-{limit} "
                     "grid, not pixels)" for v in numbers if not 0 <= v <= limit]
        if is_box and (numbers[2] < numbers[0] or numbers[3] < numbers[1]):
            problems.append(f"{where}: x2 < x1 or y2 < y1")
        return problems
