"""Synthetic coloured-shape data for demos and tests, in both formats, with train/validation splits.

Every question needs the image: the answer (a colour, a shape, a count, left/right, a box, which picture has
more shapes) is drawn uniformly at random and the question text does not depend on it, so a model that ignores
the pixels cannot beat chance. Grounding answers are ``<ref>the red circle</ref><box>(x1,y1),(x2,y2)</box>``
(``grounding.format_ref`` / ``normalize_box``). The vocabulary is that of the tiny test tokenizer.

``write_synth_dataset`` writes ``images/*.png``, ``train`` and ``validation`` data files (``.json`` list for the
Qwen-VL format, ``.jsonl`` for OpenAI) and, unless disabled, one self-contained ``.zip`` bundle per split.
``generate_count_samples`` makes a counting-only set (equal shapes in one colour per picture), a task other than
colours for checking that a base model's ``auto`` hyperparameters learn more than one kind of question.
Everything is a deterministic function of the seed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from qwenvl_core.conversation import ImagePart, Message, TextPart, text_message
from qwenvl_core.data.bundle import write_bundle
from qwenvl_core.data.formats import DataFormat, Sample, to_openai_record, to_qwen_record
from qwenvl_core.data.issues import DataError
from qwenvl_core.models.qwen_vl.grounding import format_ref, normalize_box

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220),
    "yellow": (240, 210, 20), "purple": (140, 40, 170), "orange": (245, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (255, 255, 255)

PixelBox = tuple[int, int, int, int]
# The image side in pixels: the shapes of a smaller picture may never fit side by side apart (placing them would
# not end), and a larger one only costs memory
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 4096


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    box: PixelBox  # x1, y1, x2, y2 in pixels

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class SynthResult:
    """Paths written by ``write_synth_dataset``."""

    train: Path
    validation: Path
    train_bundle: Path | None
    validation_bundle: Path | None
    samples: int
    images: int


class _Scene:
    """Draws shapes on one canvas without overlap and saves it as the next numbered PNG."""

    def __init__(self, rng: random.Random, size: int, lone_size: tuple[float, float] | None = None) -> None:
        self.rng, self.size, self.lone_size = rng, size, lone_size

    def place(self, n: int, colours: list[str], shapes: list[str]) -> list[Shape]:
        placed: list[Shape] = []
        # Several shapes keep the standard size, so that they fit side by side.
        low, high = (self.size // 6, self.size // 4) if n > 1 or self.lone_size is None else (
            round(self.size * self.lone_size[0]), round(self.size * self.lone_size[1]))
        while len(placed) < n:
            side = self.rng.randint(low, high)
            x, y = self.rng.randint(2, self.size - side - 2), self.rng.randint(2, self.size - side - 2)
            box = (x, y, x + side, y + side)
            if all(_apart(box, s.box) for s in placed):
                placed.append(Shape(colours[len(placed)], shapes[len(placed)], box))
        return placed

    def side_by_side(self, left: tuple[str, str], right: tuple[str, str]) -> list[Shape]:
        side = self.size // 4
        y = self.rng.randint(2, self.size - side - 2)
        x_left = self.rng.randint(2, self.size // 2 - side - 2)
        x_right = self.rng.randint(self.size // 2 + 2, self.size - side - 2)
        return [Shape(*left, (x_left, y, x_left + side, y + side)),
                Shape(*right, (x_right, y, x_right + side, y + side))]


def _apart(a: PixelBox, b: PixelBox, gap: int = 3) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def draw(shapes: list[Shape], size: int) -> Image.Image:
    """An RGB ``size`` x ``size`` image with ``shapes`` drawn on a white background."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    pen = ImageDraw.Draw(image)
    for s in shapes:
        x1, y1, x2, y2 = s.box
        fill = COLOURS[s.colour]
        if s.shape == "circle":
            pen.ellipse(s.box, fill=fill)
        elif s.shape == "square":
            pen.rectangle(s.box, fill=fill)
        else:
            pen.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=fill)
    return image


class _Generator:
    """Makes one sample at a time; images go to ``image_dir`` with sequential names."""

    def __init__(self, rng: random.Random, image_dir: Path, size: int,
                 lone_size: tuple[float, float] | None) -> None:
        self.rng, self.image_dir, self.size = rng, image_dir, size
        self.scene = _Scene(rng, size, lone_size)
        self.images = 0

    def image(self, shapes: list[Shape]) -> ImagePart:
        path = self.image_dir / f"{self.images:06d}.png"
        draw(shapes, self.size).save(path, format="PNG")
        self.images += 1
        return ImagePart(path)

    def distinct(self, n: int) -> list[tuple[str, str]]:
        pairs = [(c, s) for c in COLOURS for s in SHAPES]
        return self.rng.sample(pairs, n)

    def colour(self) -> list[Message]:
        shape = self.scene.place(1, [self.rng.choice(list(COLOURS))], [self.rng.choice(SHAPES)])[0]
        return _qa(self.image([shape]), f"What colour is the {shape.shape}?", shape.colour)

    def shape(self) -> list[Message]:
        shape = self.scene.place(1, [self.rng.choice(list(COLOURS))], [self.rng.choice(SHAPES)])[0]
        return _qa(self.image([shape]), f"What shape is the {shape.colour} object?", shape.shape)

    def count(self) -> list[Message]:
        n = self.rng.randint(1, 4)
        shapes = self.scene.place(n, [self.rng.choice(list(COLOURS)) for _ in range(n)],
                                  [self.rng.choice(SHAPES) for _ in range(n)])
        return _qa(self.image(shapes), "How many shapes are there?", str(n))

    def position(self) -> list[Message]:
        a, b = self.distinct(2)
        shapes = self.scene.side_by_side(a, b) if self.rng.random() < 0.5 else self.scene.side_by_side(b, a)
        answer = "left" if shapes[0].name == f"{a[0]} {a[1]}" else "right"
        return _qa(self.image(shapes), f"Is the {a[0]} {a[1]} on the left or the right?", answer)

    def grounding(self) -> list[Message]:
        pairs = self.distinct(self.rng.randint(1, 3))
        shapes = self.scene.place(len(pairs), [p[0] for p in pairs], [p[1] for p in pairs])
        target = self.rng.choice(shapes)
        box = normalize_box(target.box, self.size, self.size)
        return _qa(self.image(shapes), f"Where is the {target.name}?", format_ref(f"the {target.name}", box))

    def compare(self) -> list[Message]:
        first, second = self.rng.sample(range(1, 5), 2)
        images = []
        for n in (first, second):
            shapes = self.scene.place(n, [self.rng.choice(list(COLOURS)) for _ in range(n)],
                                      [self.rng.choice(SHAPES) for _ in range(n)])
            images.append(self.image(shapes))
        more = "the first" if first > second else "the second"
        return [
            Message("user", [images[0], images[1], TextPart("How many shapes are in the first picture?")]),
            text_message("assistant", str(first)),
            text_message("user", "Which picture has more shapes?"),
            text_message("assistant", more),
        ]


def _check_image_size(image_size: int) -> None:
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise DataError(f"image_size must be {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels, got {image_size}")


def _qa(image: ImagePart, question: str, answer: str) -> list[Message]:
    return [Message("user", [image, TextPart(question)]), text_message("assistant", answer)]


def generate_samples(n: int, seed: int, image_dir: Path, image_size: int = 112,
                     lone_size: tuple[float, float] | None = None) -> list[Sample]:
    """``n`` samples cycling through the question kinds; their images are written to ``image_dir``.

    ``lone_size``: the side of a shape drawn alone (colour, shape and grounding questions) as (min, max) fractions
    of the image side; None, and scenes with several shapes, use 1/6 to 1/4.
    """
    _check_image_size(image_size)
    if lone_size is not None and not 0 < lone_size[0] <= lone_size[1] <= 0.8:
        raise DataError(f"lone_size must satisfy 0 < min <= max <= 0.8, got {lone_size}")
    image_dir.mkdir(parents=True, exist_ok=True)
    gen = _Generator(random.Random(seed), image_dir, image_size, lone_size)
    kinds: list[Callable[[], list[Message]]] = [
        gen.colour, gen.shape, gen.count, gen.position, gen.grounding, gen.compare,
    ]
    return [Sample(f"synth-{seed}-{i:06d}", kinds[i % len(kinds)]()) for i in range(n)]


def generate_count_samples(n: int, seed: int, image_dir: Path, image_size: int = 112, max_count: int = 4,
                           side: float = 1 / 4) -> list[Sample]:
    """``n`` counting questions ("How many shapes are there?", answer 1 to ``max_count``, uniform: chance
    1 / ``max_count``): equal shapes (side ``side`` of the picture's), one colour per picture, kinds mixed. The
    count is the only thing the answer depends on; a model can read it from how much of the picture is covered."""
    _check_image_size(image_size)
    if not 1 <= max_count <= 6 or not 0 < side <= 0.3:
        raise DataError(f"need 1 <= max_count <= 6 and 0 < side <= 0.3, got {max_count}, {side}")
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    gen = _Generator(rng, image_dir, image_size, None)
    px = round(image_size * side)
    samples = []
    for i in range(n):
        count, colour = rng.randint(1, max_count), rng.choice(list(COLOURS))
        boxes: list[PixelBox] = []
        while len(boxes) < count:
            x, y = rng.randint(2, image_size - px - 2), rng.randint(2, image_size - px - 2)
            box = (x, y, x + px, y + px)
            if all(_apart(box, b) for b in boxes):
                boxes.append(box)
        shapes = [Shape(colour, rng.choice(SHAPES), b) for b in boxes]
        samples.append(Sample(f"count-{seed}-{i:06d}", _qa(gen.image(shapes), "How many shapes are there?",
                                                          str(count))))
    return samples


def write_synth_dataset(out_dir: str | Path, fmt: DataFormat = DataFormat.QWEN, n: int = 120, seed: int = 0,
                        val_fraction: float = 0.1, image_size: int = 112, bundles: bool = True) -> SynthResult:
    """Write a synthetic dataset (see the module docstring) into the new or empty directory ``out_dir``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory; choose a new output directory")
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: directory exists and is not empty; choose a new output directory")
    if n < 2 or not 0 < val_fraction < 1:
        raise DataError(f"need n >= 2 and 0 < val_fraction < 1, got n={n}, val_fraction={val_fraction}")
    _check_image_size(image_size)
    samples = generate_samples(n, seed, out / "images", image_size)
    n_val = max(1, round(n * val_fraction))
    splits = {"train": samples[n_val:], "validation": samples[:n_val]}
    paths = {name: _write_split(out, name, part, fmt) for name, part in splits.items()}
    archives = {name: write_bundle(path, out / f"{name}.zip", _image_paths(splits[name])) if bundles else None
                for name, path in paths.items()}
    images = sum(len(m.images) for s in samples for m in s.messages)
    return SynthResult(paths["train"], paths["validation"], archives["train"], archives["validation"], n, images)


def _write_split(out: Path, name: str, samples: list[Sample], fmt: DataFormat) -> Path:
    if fmt is DataFormat.QWEN:
        path = out / f"{name}.json"
        records = [to_qwen_record(s, out) for s in samples]
        path.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        return path
    path = out / f"{name}.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i, s in enumerate(samples):
            record = to_openai_record(s, out)
            if fmt is DataFormat.PREFERENCE:
                record = _preference_record(record, samples, i)
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def _preference_record(record: dict[str, Any], samples: list[Sample], i: int) -> dict[str, Any]:
    """The OpenAI record of ``samples[i]`` as a preference pair (DPO): its answer is preferred, the next sample's
    different answer (of another question: a wrong one here) is not."""
    answer = samples[i].messages[-1].text
    others = [samples[(i + k) % len(samples)].messages[-1].text for k in range(1, len(samples))]
    wrong = next((text for text in others if text != answer), answer + " (wrong)")
    return {"id": record["id"], "input": {"messages": record["messages"][:-1]},
            "preferred_output": [record["messages"][-1]],
            "non_preferred_output": [{"role": "assistant", "content": wrong}]}


def _image_paths(samples: list[Sample]) -> list[Path]:
    return [Path(str(img.source)) for s in samples for m in s.messages for img in m.images]
