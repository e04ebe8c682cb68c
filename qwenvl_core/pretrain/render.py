"""Rendered image-text data for pretraining and probing the tiny Qwen-VL: shapes, colours, positions, counts, glyphs.

This module owns the scenes (``Scene``: objects with a kind, a colour and a pixel box, drawn with PIL on a white
canvas, including letters and digits drawn with PIL's built-in FreeType font), the task kinds built on them
(``TASKS``: a function from a random generator to a ``Sample`` whose single image is an in-memory PIL image) and
writing samples as a dataset in the platform's official (Qwen) format (``write_dataset``).

Two families of tasks:
- ``PRETRAIN_TASKS``, the pretraining mix: captions, shape / colour / position / count questions, reading a
  glyph, and v1-style grounding ``<ref>the red star</ref><box>(x1,y1),(x2,y2)</box>``; ``GROUNDING_TASKS`` adds
  grounding of a lone object of any size (``ground_one``), a candidate mix;
- ``HELD_OUT_TASKS``, never in the pretraining mix, for measuring what a fine-tune on top of the pretrained base
  learns: a new question about known shapes (``corners``), a new visual concept (``line``: is the shape above or
  below a line), and grounding of a new object kind (``ground_arrow``: arrows are never drawn in pretraining).

Every answer is a function of the pixels only (the question text does not reveal it). Everything is a
deterministic function of ``(seed, index)``: sample ``i`` of a stream does not depend on the samples before it.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from qwenvl_core.conversation import ImagePart, Message, TextPart, text_message
from qwenvl_core.data.formats import Sample, to_qwen_record
from qwenvl_core.data.issues import DataError
from qwenvl_core.models.qwen_vl.grounding import format_ref, normalize_box

IMAGE_SIZE = 112
BACKGROUND = (255, 255, 255)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 20),
    "purple": (140, 40, 170), "orange": (245, 130, 20), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "hexagon", "ring")
CORNERS = {"circle": 0, "ring": 0, "triangle": 3, "square": 4, "diamond": 4, "hexagon": 6, "star": 10, "cross": 12}
NOVEL_SHAPES = ("arrow",)  # drawn only by held-out tasks
GLYPHS = "ABCDEFGHKLMNPRSTXYZ23456789"
REGIONS_X = ("left", "center", "right")
REGIONS_Y = ("top", "middle", "bottom")

PixelBox = tuple[int, int, int, int]


@dataclass(frozen=True)
class Thing:
    """One drawn object: ``kind`` is a shape name, a novel shape, or ``glyph:<char>``."""

    kind: str
    colour: str
    box: PixelBox

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"

    @property
    def region(self) -> str:
        """Where the centre lies on a 3 x 3 grid: "top left", ..., "center" (middle row, centre column)."""
        cx, cy = (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2
        col = REGIONS_X[min(2, int(3 * cx / IMAGE_SIZE))]
        row = REGIONS_Y[min(2, int(3 * cy / IMAGE_SIZE))]
        if row == "middle":
            return col
        return row if col == "center" else f"{row} {col}"


def _polygon(kind: str, box: PixelBox) -> list[tuple[float, float]]:
    x1, y1, x2, y2 = box
    cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    if kind == "triangle":
        return [(cx, y1), (x2, y2), (x1, y2)]
    if kind == "diamond":
        return [(cx, y1), (x2, cy), (cx, y2), (x1, cy)]
    if kind == "hexagon":
        return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in (k * math.pi / 3 for k in range(6))]
    if kind == "star":
        return [(cx + r * rx * math.sin(a), cy - r * ry * math.cos(a))
                for k in range(10) for a, r in [(k * math.pi / 5, 1.0 if k % 2 == 0 else 0.45)]]
    if kind == "cross":
        t = 1 / 3
        xs, ys = (x1, x1 + t * 2 * rx, x2 - t * 2 * rx, x2), (y1, y1 + t * 2 * ry, y2 - t * 2 * ry, y2)
        return [(xs[1], ys[0]), (xs[2], ys[0]), (xs[2], ys[1]), (xs[3], ys[1]), (xs[3], ys[2]), (xs[2], ys[2]),
                (xs[2], ys[3]), (xs[1], ys[3]), (xs[1], ys[2]), (xs[0], ys[2]), (xs[0], ys[1]), (xs[1], ys[1])]
    if kind == "arrow":  # pointing right
        return [(x1, cy - ry / 3), (cx, cy - ry / 3), (cx, y1), (x2, cy), (cx, y2), (cx, cy + ry / 3),
                (x1, cy + ry / 3)]
    raise DataError(f"unknown shape kind {kind!r}")


@cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def draw_thing(pen: ImageDraw.ImageDraw, thing: Thing) -> None:
    """Draw ``thing`` filling its box."""
    fill = COLOURS[thing.colour]
    x1, y1, x2, y2 = thing.box
    if thing.kind == "circle":
        pen.ellipse(thing.box, fill=fill)
    elif thing.kind == "square":
        pen.rectangle(thing.box, fill=fill)
    elif thing.kind == "ring":
        pen.ellipse(thing.box, outline=fill, width=max(3, (x2 - x1) // 5))
    elif thing.kind.startswith("glyph:"):
        char, font = thing.kind[6:], _font(round((y2 - y1) * 1.3))
        left, top, right, bottom = pen.textbbox((0, 0), char, font=font)
        pen.text(((x1 + x2 - right - left) / 2, (y1 + y2 - bottom - top) / 2), char, fill=fill, font=font)
    else:
        pen.polygon(_polygon(thing.kind, thing.box), fill=fill)


@dataclass(frozen=True)
class Scene:
    """Objects (non-overlapping boxes) and optional horizontal lines (y coordinates) on a white canvas."""

    things: tuple[Thing, ...]
    lines: tuple[int, ...] = ()

    def image(self, size: int = IMAGE_SIZE) -> Image.Image:
        """The scene drawn as an RGB ``size`` x ``size`` image (boxes are in ``IMAGE_SIZE`` pixels)."""
        image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
        pen = ImageDraw.Draw(image)
        for y in self.lines:
            pen.line([(0, y), (IMAGE_SIZE, y)], fill=(90, 90, 90), width=3)
        for thing in self.things:
            draw_thing(pen, thing)
        return image if size == IMAGE_SIZE else image.resize((size, size), Image.Resampling.BICUBIC)


def _apart(a: PixelBox, b: PixelBox, gap: int = 3) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def place(rng: random.Random, kinds: Sequence[str], colours: Sequence[str], side: tuple[int, int] = (18, 40),
          y_range: tuple[int, int] = (2, IMAGE_SIZE - 2)) -> tuple[Thing, ...]:
    """Non-overlapping things of the given kinds and colours, each a square box of a random side in ``side``,
    inside the rows ``y_range``."""
    placed: list[Thing] = []
    while len(placed) < len(kinds):
        s = rng.randint(*side)
        x, y = rng.randint(2, IMAGE_SIZE - 2 - s), rng.randint(y_range[0], y_range[1] - s)
        box = (x, y, x + s, y + s)
        if all(_apart(box, t.box) for t in placed):
            placed.append(Thing(kinds[len(placed)], colours[len(placed)], box))
        elif rng.random() < 0.05:  # crowded: start again
            placed = []
    return tuple(placed)


def _one(rng: random.Random, kinds: Sequence[str] = SHAPES) -> Thing:
    return place(rng, [rng.choice(kinds)], [rng.choice(list(COLOURS))])[0]


def _distinct(rng: random.Random, n: int, kinds: Sequence[str] = SHAPES) -> tuple[Thing, ...]:
    pairs = rng.sample([(k, c) for k in kinds for c in COLOURS], n)
    return place(rng, [k for k, _ in pairs], [c for _, c in pairs], side=(16, 30))


def _qa(scene: Scene, question: str, answer: str) -> list[Message]:
    return [Message("user", [ImagePart(scene.image()), TextPart(question)]), text_message("assistant", answer)]


def _ref(thing: Thing, text: str) -> str:
    return format_ref(text, normalize_box(thing.box, IMAGE_SIZE, IMAGE_SIZE))


# -- pretraining tasks ----------------------------------------------------------------------------------------


def task_caption(rng: random.Random) -> list[Message]:
    things = _distinct(rng, rng.randint(1, 3))
    text = "; ".join(f"a {t.name} at the {t.region}" for t in things)
    return _qa(Scene(things), "Describe the image.", text + ".")


def task_shape(rng: random.Random) -> list[Message]:
    thing = _one(rng)
    return _qa(Scene((thing,)), f"What shape is the {thing.colour} object?", thing.kind)


def task_colour(rng: random.Random) -> list[Message]:
    thing = _one(rng)
    return _qa(Scene((thing,)), f"What colour is the {thing.kind}?", thing.colour)


def task_region(rng: random.Random) -> list[Message]:
    things = _distinct(rng, rng.randint(1, 2))
    return _qa(Scene(things), f"Where is the {things[0].name}? Answer with a part of the picture.",
               things[0].region)


def task_count(rng: random.Random) -> list[Message]:
    n = rng.randint(1, 5)
    things = place(rng, [rng.choice(SHAPES) for _ in range(n)], [rng.choice(list(COLOURS)) for _ in range(n)],
                   side=(12, 24))
    return _qa(Scene(things), "How many shapes are there?", str(n))


def task_glyph(rng: random.Random) -> list[Message]:
    char = rng.choice(GLYPHS)
    thing = place(rng, [f"glyph:{char}"], [rng.choice([c for c in COLOURS if c != "yellow"])], side=(22, 40))[0]
    return _qa(Scene((thing,)), "What character is written in the picture?", char)


def task_ground(rng: random.Random) -> list[Message]:
    things = _distinct(rng, rng.randint(1, 3))
    target = rng.choice(things)
    return _qa(Scene(things), f"Where is the {target.name}?", _ref(target, f"the {target.name}"))


def task_ground_one(rng: random.Random) -> list[Message]:
    """Grounding of a lone object of any size from small to half the picture (``task_ground``'s are 16-30 px)."""
    thing = place(rng, [rng.choice(SHAPES)], [rng.choice(list(COLOURS))], side=(16, 60))[0]
    return _qa(Scene((thing,)), f"Where is the {thing.name}?", _ref(thing, f"the {thing.name}"))


def task_grounded_caption(rng: random.Random) -> list[Message]:
    things = _distinct(rng, rng.randint(1, 2))
    text = " and ".join(_ref(t, f"a {t.name}") for t in things)
    return _qa(Scene(things), "Generate the caption in English with grounding:", text)


# -- held-out tasks (never in the pretraining mix) --------------------------------------------------------------


def task_corners(rng: random.Random) -> list[Message]:
    thing = _one(rng)
    return _qa(Scene((thing,)), f"How many corners does the {thing.colour} object have?", str(CORNERS[thing.kind]))


def task_line(rng: random.Random) -> list[Message]:
    line = rng.randint(40, 72)
    above = rng.random() < 0.5
    y_range = (2, line - 4) if above else (line + 4, IMAGE_SIZE - 2)
    thing = place(rng, [rng.choice(SHAPES)], [rng.choice(list(COLOURS))], side=(14, 26), y_range=y_range)[0]
    return _qa(Scene((thing,), (line,)), f"Is the {thing.kind} above or below the line?",
               "above" if above else "below")


def task_ground_arrow(rng: random.Random) -> list[Message]:
    others = _distinct(rng, rng.randint(0, 2))
    arrow_colour = rng.choice(list(COLOURS))
    things = place(rng, ["arrow", *(t.kind for t in others)], [arrow_colour, *(t.colour for t in others)],
                   side=(16, 30))
    return _qa(Scene(things), "Where is the arrow?", _ref(things[0], "the arrow"))


Task = Callable[[random.Random], list[Message]]
PRETRAIN_TASKS: dict[str, Task] = {
    "caption": task_caption, "shape": task_shape, "colour": task_colour, "region": task_region,
    "count": task_count, "glyph": task_glyph, "ground": task_ground, "grounded_caption": task_grounded_caption,
}
# A candidate mix with a larger share of grounding, of objects of every size (measured, not shipped:
# docs/pretraining.md section 5; ``bench/pretrain_grounding.py``).
GROUNDING_TASKS: dict[str, Task] = {**PRETRAIN_TASKS, "ground_one": task_ground_one}
HELD_OUT_TASKS: dict[str, Task] = {"corners": task_corners, "line": task_line, "ground_arrow": task_ground_arrow}
TASKS: dict[str, Task] = {**GROUNDING_TASKS, **HELD_OUT_TASKS}


def sample(task: str, seed: int, index: int) -> Sample:
    """Sample ``index`` of ``task``'s stream for ``seed`` (independent of every other index)."""
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    rng = random.Random(f"{seed}:{task}:{index}")
    return Sample(f"{task}-{seed}-{index:06d}", TASKS[task](rng))


def mixture(tasks: Sequence[str], seed: int, start: int, count: int) -> list[Sample]:
    """Samples ``start .. start+count-1`` of a round-robin stream over ``tasks``."""
    return [sample(tasks[i % len(tasks)], seed, i // len(tasks)) for i in range(start, start + count)]


def write_dataset(out_dir: str | Path, samples: Sequence[Sample], name: str = "data") -> Path:
    """Write ``samples`` (in-memory images) as ``images/*.png`` plus ``<name>.json`` in the official format."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for s in samples:
        messages = []
        for m_i, message in enumerate(s.messages):
            parts = []
            for p_i, part in enumerate(message.parts):
                if isinstance(part, ImagePart) and isinstance(part.source, Image.Image):
                    path = out / "images" / f"{s.id}-{m_i}-{p_i}.png"
                    part.source.save(path, format="PNG")
                    part = ImagePart(path)
                parts.append(part)
            messages.append(Message(message.role, parts))
        records.append(to_qwen_record(Sample(s.id, messages), out))
    path = out / f"{name}.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return path
