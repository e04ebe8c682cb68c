"""The demo's dataset: a colour / grounding subset of the synthetic coloured-shapes data (``qwenvl_core.data.synth``).

The full synthetic mix (colours, shapes, counts, positions, boxes, two-picture comparisons) is more than the tiny
random model can learn in the demo's few minutes on two CPU cores. The demo keeps two question kinds: "What colour
is the <shape>?" (six colours, chance 1/6, scored by exact match) and "Where is the <colour> <shape>?" (a grounding
box, scored by IoU >= 0.5). The lone shape of these questions is drawn large (a third to a half of the picture's
side, instead of a sixth to a quarter): the frozen vision tower of a random model passes colour on only as a small
shift of its mostly image-independent output, and a small shape makes that shift too faint to learn in the demo's
budget (measured: exact match stayed at chance after 1,000 steps with small shapes, 0.92 with large ones).
It also gives grounding's chance level (``mean_box_chance``: the mean training box), which the demo reports its
held-out boxes against. Everything is a deterministic function of the seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qwenvl_core.data.bundle import write_bundle
from qwenvl_core.data.formats import Sample, to_qwen_record
from qwenvl_core.data.synth import generate_count_samples, generate_samples
from qwenvl_core.grounding import PixelBox, codec_for
from qwenvl_core.grounding.geometry import iou

# generate_samples cycles through: colour, shape, count, position, grounding, compare.
_KINDS = ("colour", "shape", "count", "position", "grounding", "compare")
LONE_SHAPE_SIZE = (1 / 3, 1 / 2)  # side of the one shape in a picture, as fractions of the picture's side
# Held-out questions: half of them boxes (96), enough to tell a grounding rate of ~0.15 from chance (~0.04) with a
# binomial test (48 questions, 24 boxes, could not); evaluating them is seconds of the demo's minutes.
N_VALIDATION = 192


@dataclass(frozen=True)
class DemoData:
    """The demo dataset's bundles (data file + images) and what they hold."""

    train_bundle: Path
    validation_bundle: Path
    train_samples: int
    validation_samples: int
    grounding_image: Path | None  # a held-out image with a grounding question (None without grounding)
    grounding_question: str | None
    validation_boxes: int = 0  # held-out grounding questions
    grounding_chance: float | None = None  # ``mean_box_chance``: what a model that ignores the picture scores


def _box(sample: Sample) -> PixelBox | None:
    """The first box of the answer (the dataset's v1 markup), on its 0-1000 grid (a 1000 x 1000 frame)."""
    objects = codec_for("qwen-vl").parse(sample.messages[-1].text, (1000, 1000))
    return objects[0].box if objects else None


def mean_box_chance(train: list[Sample], validation: list[Sample]) -> float:
    """Chance for grounding: the share of held-out boxes that the mean training box (the best constant answer a
    model can learn without looking) overlaps with IoU >= 0.5 (0-1000 grid: IoU does not depend on the frame)."""
    train_boxes = [b for b in map(_box, train) if b is not None]
    val_boxes = [b for b in map(_box, validation) if b is not None]
    if not train_boxes or not val_boxes:
        return 0.0
    mean = [sum(b[i] for b in train_boxes) / len(train_boxes) for i in range(4)]
    return sum(iou(b, mean) >= 0.5 for b in val_boxes) / len(val_boxes)


def _select(samples: list[Sample], kinds: tuple[str, ...]) -> list[Sample]:
    keep = {_KINDS.index(k) for k in kinds}
    return [s for i, s in enumerate(samples) if i % len(_KINDS) in keep]


def _write(out: Path, name: str, samples: list[Sample]) -> Path:
    path = out / f"{name}.json"
    path.write_text(json.dumps([to_qwen_record(s, out) for s in samples], indent=1) + "\n", encoding="utf-8")
    images = [Path(str(img.source)) for s in samples for m in s.messages for img in m.images]
    return write_bundle(path, out / f"{name}.zip", images)


def _rendered_bundle(data_file: Path, out: Path) -> Path:
    """``render.write_dataset``'s data file and its ``images/`` as one bundle."""
    return write_bundle(data_file, out, sorted((data_file.parent / "images").glob("*.png")))


def write_demo_dataset(out_dir: Path, *, n_train: int = 600, n_validation: int = N_VALIDATION, seed: int = 0,
                       kinds: tuple[str, ...] = ("colour", "grounding"), task: str = "colours") -> DemoData:
    """Write ``train.zip`` and ``validation.zip`` (held-out images and questions) into ``out_dir``.

    ``task``: ``colours`` (the ``kinds`` above), ``counting`` (``synth.generate_count_samples``: "How many shapes
    are there?", 1 to 4, chance 1/4; no grounding question) or ``line`` (``pretrain.render.task_line``: "Is the
    hexagon above or below the line?", a visual concept never in the pretrained base's mix, chance 1/2)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if task == "line":
        from qwenvl_core.pretrain.render import mixture, write_dataset

        # Training and held-out pictures from disjoint seeds (as ``pretrain.recipe.write_task_files``).
        train, val = mixture((task,), 100 + seed, 0, n_train), mixture((task,), 200 + seed, 0, n_validation)
        bundles = [_rendered_bundle(write_dataset(out_dir / name, samples, name), out_dir / f"{name}.zip")
                   for name, samples in (("train", train), ("validation", val))]
        return DemoData(bundles[0], bundles[1], len(train), len(val), None, None)
    if task == "counting":
        train = generate_count_samples(n_train, seed, out_dir / "images-train")
        val = generate_count_samples(n_validation, seed + 1, out_dir / "images-val")
        return DemoData(_write(out_dir, "train", train), _write(out_dir, "validation", val), len(train), len(val),
                        None, None)
    if task != "colours":
        raise ValueError(f"unknown demo task {task!r}; known: colours, counting, line")
    per_cycle = len(kinds)
    cycles_train = -(-n_train // per_cycle)
    cycles_val = -(-n_validation // per_cycle)
    train = _select(generate_samples(cycles_train * len(_KINDS), seed, out_dir / "images-train",
                                     lone_size=LONE_SHAPE_SIZE), kinds)[:n_train]
    val = _select(generate_samples(cycles_val * len(_KINDS), seed + 1, out_dir / "images-val",
                                   lone_size=LONE_SHAPE_SIZE), kinds)[:n_validation]
    grounding = next((s for s in val if s.messages[-1].text.startswith("<ref>")), None)
    question = grounding.messages[0].text if grounding else None
    image = Path(str(grounding.messages[0].images[0].source)) if grounding else None
    boxes = sum(_box(s) is not None for s in val)
    return DemoData(_write(out_dir, "train", train), _write(out_dir, "validation", val), len(train), len(val),
                    image, question, boxes, mean_box_chance(train, val) if boxes else None)
