"""The tiny bases of the transformers-native families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), pretrained as v1's is.

This module owns what differs from v1's recipe (``recipe.py``) for those families, and nothing else:

- ``RECIPES``: each family's ``PretrainConfig`` (its ``...-tiny-v2`` preset: the family's tiny shapes with init
  std 0.1, as ``qwen-vl-tiny-v2`` is v1's) and ``SEEING``, the name its result ships under;
- ``FamilyTower``: how stage 1 (``vision_warmup.warm_up_vision``, the same linear readouts of shape, colour and
  place on the mean of the tower's output tokens, or on all of them side by side where the recipe says
  ``vision_warmup_pooled=False``) feeds rendered images to the family's vision tower: through the family's own
  processor (``vision_inputs``), reading the merger's output tokens (what the LM reads);
- ``pretrain_family_base``: materialise the preset, stage 1, then stage 2 (``recipe.pretrain``: the same rendered
  mix, encoded by ``data.encode_sample`` with the family's processor, so v1's ``<ref>/<box>`` grounding is
  rewritten into the family's convention; the family's forward contract and loss), and write the directory.

v1's recipe, tasks and weights are untouched. ``ship.py --family NAME`` builds and checks the shipped directories.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from qwenvl_core.conversation import ImagePart
from qwenvl_core.errors import ConfigError
from qwenvl_core.models.processing import FamilyProcessor
from qwenvl_core.models.registry import get_family
from qwenvl_core.pretrain.recipe import PretrainConfig, PretrainLog, pretrain
from qwenvl_core.pretrain.render import IMAGE_SIZE, PRETRAIN_TASKS
from qwenvl_core.pretrain.vision_warmup import warm_up_vision

# Family name -> the recipe of its tiny base. Shorter than v1's 1,000 + 4,000 steps: a family's step costs more
# (longer sequences: JSON grounding, the chat template's system turn), and the base must build in minutes on one
# CPU thread (docs/pretraining.md, "The other families' tiny bases").
RECIPES: dict[str, PretrainConfig] = {
    "qwen2.5-vl": PretrainConfig(preset="qwen2.5-vl-tiny-v2", steps=1500, vision_warmup_steps=400,
                                 tasks=tuple(PRETRAIN_TASKS)),
    "qwen2-vl": PretrainConfig(preset="qwen2-vl-tiny-v2", steps=1500, vision_warmup_steps=400,
                               tasks=tuple(PRETRAIN_TASKS)),
    # Qwen3-VL's stage 1 keeps position (``vision_warmup_pooled=False``: the readouts see every merged token, so the
    # tower must say which token holds the object) and regresses the box: region 0.94 held-out vs 0.18 pooled
    # (docs/pretraining.md section 7). Qwen2(.5)-VL's shipped bases were built pooled.
    "qwen3-vl": PretrainConfig(preset="qwen3-vl-tiny-v2", steps=1500, vision_warmup_steps=400,
                               vision_warmup_targets=("shape", "colour", "region", "box"), vision_warmup_pooled=False,
                               tasks=tuple(PRETRAIN_TASKS)),
}
# Family name -> the shipped directory (and preset) of its pretrained tiny base.
SEEING: dict[str, str] = {name: f"{name}-tiny-seeing" for name in RECIPES}


def recipe_of(family: str) -> PretrainConfig:
    """The recipe of ``family``'s tiny base; ``ConfigError`` naming the families that have one."""
    if family not in RECIPES:
        raise ConfigError(f"--family: no tiny-base recipe for {family!r}; known: {', '.join(RECIPES)}")
    return RECIPES[family]


class FamilyTower:
    """``vision_warmup.TowerReader`` of a transformers family's tower (ViT + merger), fed by the family's processor.

    ``pixels``: the processor's ``pixel_values`` ``[P, D]`` of same-sized images as ``[N, P / N, D]`` (one row per
    image, so the warm-up can slice it); ``tokens``: the merger's output (``pooler_output``) as ``[N, Q, D_lm]``."""

    def __init__(self, tower: torch.nn.Module, processor: FamilyProcessor) -> None:
        self.tower, self.processor = tower, processor
        self.grid: torch.Tensor | None = None  # [1, 3]: the (same) grid of every image

    def pixels(self, images: Sequence[Any]) -> torch.Tensor:
        vision = self.processor.vision_inputs([ImagePart(image) for image in images])
        values, grid = vision.tensors["pixel_values"], vision.tensors["image_grid_thw"]
        if not bool((grid == grid[:1]).all()):
            raise ConfigError(f"the warm-up needs images of one size; the processor made grids {grid.tolist()}")
        self.grid = grid[:1]
        return values.view(len(images), -1, values.shape[-1])

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.grid is None:
            raise ConfigError("FamilyTower.tokens before pixels: the image grid is unknown")
        n = pixels.shape[0]
        out = self.tower(pixels.flatten(0, 1), grid_thw=self.grid.to(pixels.device).repeat(n, 1)).pooler_output
        return out.view(n, -1, out.shape[-1])


def pretrain_family_base(family_name: str, out_dir: str | Path, config: PretrainConfig | None = None,
                         log_every: int = 100, on_log: Callable[[int, float], None] | None = None,
                         prefix: tuple[int, int] | None = None) -> tuple[Path, PretrainLog]:
    """``recipe.pretrain_base`` for a transformers family: materialise ``config.preset`` (default: the family's
    ``RECIPES`` entry) with ``config.seed``, stage 1 ``warm_up_vision`` through ``FamilyTower``, stage 2
    ``pretrain`` with the family's processor and forward contract, and write the complete model directory (the
    preset's tokenizer, chat template and processor files with the trained weights) to the new ``out_dir``.
    ``prefix`` (warm-up steps, LM steps): the exact first steps of the full run."""
    config = recipe_of(family_name) if config is None else config
    family = get_family(family_name)
    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        random_dir = family.materialize(config.preset, Path(tmp) / "random", seed=config.seed)
        model = family.forward_contract(family.load_model(random_dir, device=config.device))
        processor = family.load_processor(random_dir)
        tower = family.vision_tower(model)
        start = time.monotonic()
        warmup_steps = config.vision_warmup_steps if prefix is None else min(prefix[0], config.vision_warmup_steps)
        warmup = warm_up_vision(tower, IMAGE_SIZE, warmup_steps, seed=config.seed,
                                targets=tuple(config.vision_warmup_targets), side=tuple(config.vision_warmup_side),
                                pooled=config.vision_warmup_pooled, reader=FamilyTower(tower, processor))
        warmup_seconds = time.monotonic() - start
        log = pretrain(model, processor, config, log_every, on_log, stop_after=None if prefix is None else prefix[1],
                       tower=tower)
        log.vision_warmup, log.seconds = warmup, log.seconds + warmup_seconds
        family.save_model(model, out)
        for file in sorted(random_dir.iterdir()):  # tokenizer, chat template, processor configs
            if file.is_file() and not (out / file.name).exists():
                shutil.copyfile(file, out / file.name)
    return out, log
