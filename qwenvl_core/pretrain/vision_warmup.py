"""Stage 1 of the tiny pretraining recipe: the vision tower (ViT + adapter) learns to see before the LM reads it.

This module owns that stage: single rendered objects (``render``: a shape in a colour, size and place), their
labels (shape, colour, region of a 3 x 3 grid) and training the tower with one linear readout per label on the
*mean* of the tower's output tokens, which is all a language model attending uniformly to the image gets.

Why a separate stage (docs/pretraining.md, bench/probe_tiny_vision.py): trained end to end through the random
LM, the tower learns colour (visible in every token) but never where or what shape an object is -- the LM does
not read the image tokens selectively yet, so it sends back no useful gradient, and the tokens never carry the
information that would teach it to read them. With the tower warmed up this way (a few hundred steps), the LM
learns to read position and shape in a few hundred more. The full-size recipe has the same order: Qwen-VL starts
from a vision tower that was pretrained on its own (OpenCLIP ViT-bigG).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from qwenvl_core.models.qwen_vl.images import preprocess_image
from qwenvl_core.pretrain.render import COLOURS, IMAGE_SIZE, SHAPES, Scene, Thing, place

REGIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
LABELS: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": tuple(COLOURS), "region": REGIONS}
BOX = "box"  # the regression target: the object's corners as fractions of the picture's side
BOX_WEIGHT = 10.0  # its squared error (~0.1 at the start) weighted to the size of the classification losses


def single_things(n: int, seed: str, side: tuple[int, int] = (18, 40)) -> list[Thing]:
    """``n`` single objects (a random shape and colour, side ``side`` px, anywhere), a function of ``seed``."""
    things = []
    for i in range(n):
        rng = random.Random(f"{seed}:{i}")
        things.append(place(rng, [rng.choice(SHAPES)], [rng.choice(list(COLOURS))], side=side)[0])
    return things


def labels(things: Sequence[Thing]) -> dict[str, torch.Tensor]:
    """Class indices [N] per label name of ``LABELS``."""
    values = {"shape": [t.kind for t in things], "colour": [t.colour for t in things],
              "region": [t.region for t in things]}
    return {k: torch.tensor([LABELS[k].index(v) for v in vs]) for k, vs in values.items()}


def boxes(things: Sequence[Thing]) -> torch.Tensor:
    """The objects' corners [N, 4] (x1, y1, x2, y2) as fractions of the picture's side: the ``box`` target."""
    return torch.tensor([t.box for t in things], dtype=torch.float32) / IMAGE_SIZE


class TowerReader(Protocol):
    """How the warm-up feeds a vision tower other than v1's (``pretrain.families``: the transformers families)."""

    def pixels(self, images: Sequence[Any]) -> torch.Tensor:
        """The tower's input for PIL ``images``, one row per image along dim 0 (so it slices per image)."""

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """The tower's output tokens ``[N, Q, D]`` (after the adapter / merger: what the LM reads)."""


def _batch(tag: str, n: int, image_size: int, side: tuple[int, int] = (18, 40), reader: TowerReader | None = None
           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    things = single_things(n, tag, side)
    if reader is not None:
        return reader.pixels([Scene((t,)).image(image_size) for t in things]), {**labels(things), BOX: boxes(things)}
    pixels = torch.stack([preprocess_image(Scene((t,)).image(image_size), image_size) for t in things])
    return pixels, {**labels(things), BOX: boxes(things)}  # [N, 3, S, S]


def box_hits(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row: whether the predicted box (fractions, [N, 4]) overlaps the target with IoU >= 0.5."""
    p, t = predicted.clamp(0, 1), target
    w = (torch.minimum(p[:, 2], t[:, 2]) - torch.maximum(p[:, 0], t[:, 0])).clamp(min=0)
    h = (torch.minimum(p[:, 3], t[:, 3]) - torch.maximum(p[:, 1], t[:, 1])).clamp(min=0)
    area = lambda b: (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)  # noqa: E731
    inter = w * h
    return inter / (area(p) + area(t) - inter).clamp(min=1e-9) >= 0.5


def warm_up_vision(visual: torch.nn.Module, image_size: int, steps: int, *, lr: float = 1e-3,
                   batch_size: int = 32, pooled: bool = True, targets: Sequence[str] = ("shape", "colour", "region"),
                   seed: int = 0, side: tuple[int, int] = (18, 40), reader: TowerReader | None = None,
                   n_test: int = 400) -> dict[str, float]:
    """Train ``visual`` in place with linear readouts of ``targets``; returns their held-out accuracy.

    ``pooled``: the readouts see the mean of the output tokens (the recipe); False: all tokens side by side,
    so a readout also knows which token carries what (an upper bound, for the probe study). ``targets`` may
    include ``box``: a linear regression of the object's corners (``BOX_WEIGHT`` x mean squared error; its held-out
    score is the share of boxes with IoU >= 0.5), which makes the tokens say where the object's edges are, not only
    its 3 x 3 cell. ``side``: the objects' side in pixels; ``n_test``: held-out objects. ``reader``: how images
    reach a tower that is not v1's (``visual`` is then the module whose parameters train).
    """
    def features(pixels: torch.Tensor) -> torch.Tensor:
        out = visual(pixels) if reader is None else reader.tokens(pixels)  # [N, Q, D]
        return out.mean(1) if pooled else out.flatten(1)

    device = next(visual.parameters()).device  # batches and readouts go where the tower is

    def batch(tag: str, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pixels, y = _batch(tag, n, image_size, side, reader)
        return pixels.to(device), {k: v.to(device) for k, v in y.items()}

    torch.manual_seed(seed)
    test_x, test_y = batch(f"warmup-test-{seed}", n_test)
    with torch.no_grad():
        width = features(test_x[:1]).size(1)
    heads = {k: torch.nn.Linear(width, 4 if k == BOX else len(LABELS[k]), device=device) for k in targets}
    params = list(visual.parameters()) + [p for h in heads.values() for p in h.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    visual.train()
    for step in range(steps):
        pixels, y = batch(f"warmup-{seed}-{step}", batch_size)
        f = features(pixels)
        loss = sum(BOX_WEIGHT * F.mse_loss(head(f), y[k]) if k == BOX else F.cross_entropy(head(f), y[k])
                   for k, head in heads.items())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    visual.eval()
    with torch.no_grad():
        f = features(test_x)
        return {k: float((box_hits(head(f), test_y[k]) if k == BOX else head(f).argmax(-1) == test_y[k])
                         .float().mean()) for k, head in heads.items()}
