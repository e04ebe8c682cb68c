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

import torch
import torch.nn.functional as F

from qwenvl_core.models.qwen_vl.images import preprocess_image
from qwenvl_core.pretrain.render import COLOURS, SHAPES, Scene, Thing, place

REGIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
LABELS: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": tuple(COLOURS), "region": REGIONS}


def single_things(n: int, seed: str) -> list[Thing]:
    """``n`` single objects (a random shape and colour, side 18-40 px, anywhere), a function of ``seed``."""
    things = []
    for i in range(n):
        rng = random.Random(f"{seed}:{i}")
        things.append(place(rng, [rng.choice(SHAPES)], [rng.choice(list(COLOURS))])[0])
    return things


def labels(things: Sequence[Thing]) -> dict[str, torch.Tensor]:
    """Class indices [N] per label name of ``LABELS``."""
    values = {"shape": [t.kind for t in things], "colour": [t.colour for t in things],
              "region": [t.region for t in things]}
    return {k: torch.tensor([LABELS[k].index(v) for v in vs]) for k, vs in values.items()}


def _batch(tag: str, n: int, image_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    things = single_things(n, tag)
    pixels = torch.stack([preprocess_image(Scene((t,)).image(image_size), image_size) for t in things])
    return pixels, labels(things)  # [N, 3, S, S]


def warm_up_vision(visual: torch.nn.Module, image_size: int, steps: int, *, lr: float = 1e-3,
                   batch_size: int = 32, pooled: bool = True, targets: Sequence[str] = ("shape", "colour", "region"),
                   seed: int = 0) -> dict[str, float]:
    """Train ``visual`` in place with linear readouts of ``targets``; returns their held-out accuracy.

    ``pooled``: the readouts see the mean of the output tokens (the recipe); False: all tokens side by side,
    so a readout also knows which token carries what (an upper bound, for the probe study).
    """
    def features(pixels: torch.Tensor) -> torch.Tensor:
        out = visual(pixels)  # [N, Q, D]
        return out.mean(1) if pooled else out.flatten(1)

    device = next(visual.parameters()).device  # batches and readouts go where the tower is

    def batch(tag: str, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pixels, y = _batch(tag, n, image_size)
        return pixels.to(device), {k: v.to(device) for k, v in y.items()}

    torch.manual_seed(seed)
    test_x, test_y = batch(f"warmup-test-{seed}", 400)
    with torch.no_grad():
        width = features(test_x[:1]).size(1)
    heads = {k: torch.nn.Linear(width, len(LABELS[k]), device=device) for k in targets}
    params = list(visual.parameters()) + [p for h in heads.values() for p in h.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    visual.train()
    for step in range(steps):
        pixels, y = batch(f"warmup-{seed}-{step}", batch_size)
        f = features(pixels)
        loss = sum(F.cross_entropy(head(f), y[k]) for k, head in heads.items())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    visual.eval()
    with torch.no_grad():
        f = features(test_x)
        return {k: float((head(f).argmax(-1) == test_y[k]).float().mean()) for k, head in heads.items()}
