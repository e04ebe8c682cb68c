"""Pretraining recipe of the tiny Qwen-VL: every weight (ViT, adapter, LM) trained on rendered image-text data.

This module owns the recipe (``PretrainConfig``) and its three steps, run by ``pretrain_base``:

0. ``init_for_pretraining``: the ``qwen-vl-tiny-v2`` preset (qwen-vl-tiny's shapes, init std 0.1) with the ViT's
   positional embedding drawn at std 1, so that patch tokens say where they are;
1. ``vision_warmup.warm_up_vision``: the vision tower (ViT + adapter) learns shape, colour and place;
2. ``pretrain``: the LM (and ``lm_head``, embeddings) learns to read it and to answer on the rendered mix
   (captions, VQA, v1 grounding), on the project's own pieces: the model's forward and loss (``loss_only``),
   ``data.encode_sample`` with the official label mask, ``data.Collator``, ``training.optim``'s AdamW groups and
   warm-up + cosine schedule. The tower stays frozen here by default: trained through the LM it loses position.

Plus measuring the result: held-out rendered questions with the platform's evaluation (``evaluate_tasks``), and
LoRA fine-tunes on tasks outside the mix run by the platform's ``Trainer`` (``run_fine_tune``, ``chance``).
It is a plain single-process loop: pretraining the tiny preset takes minutes on one CPU thread, and what it
trains is the whole model (the platform's ``Trainer`` trains LoRA adapters on a frozen base). docs/pretraining.md
has the measurements behind each choice.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwenvl_core.data import Collator, encode_sample
from qwenvl_core.devices import model_device
from qwenvl_core.models.qwen_vl.materialize import TOKENIZER_FILE, write_random_model
from qwenvl_core.models.qwen_vl.modeling import QWenLMHeadModel
from qwenvl_core.models.qwen_vl.processor import QwenVLProcessor
from qwenvl_core.models.registry import detect_family
from qwenvl_core.pretrain.render import PRETRAIN_TASKS, mixture
from qwenvl_core.pretrain.vision_warmup import warm_up_vision
from qwenvl_core.specs import Hyperparameters
from qwenvl_core.training.evaluate import task_items, task_metrics
from qwenvl_core.training.optim import build_optimizer, build_scheduler


@dataclass(frozen=True)
class PretrainConfig:
    """One pretraining run; every field is part of the result's identity (same config, same weights)."""

    preset: str = "qwen-vl-tiny-v2"
    seed: int = 0
    steps: int = 4000
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_ratio: float = 0.03
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    position_init_std: float = 1.0
    vision_warmup_steps: int = 1000
    vision_warmup_targets: tuple[str, ...] = ("shape", "colour", "region")  # plus "box": a corner regression
    vision_warmup_side: tuple[int, int] = (18, 40)  # the warm-up objects' side in pixels
    vision_warmup_pooled: bool = True  # stage 1's readouts see the tokens' mean; False: all tokens side by side
    train_vision_with_lm: bool = False  # stage 2 also trains the tower (measured: it then loses position)
    tasks: tuple[str, ...] = tuple(PRETRAIN_TASKS)
    device: str = "cpu"  # where the model trains ("cuda" on a GPU); the recipe's figures were measured on the CPU

    def hyperparameters(self) -> Hyperparameters:
        return Hyperparameters(max_steps=self.steps, batch_size=self.batch_size,
                               micro_batch_size=self.batch_size, learning_rate=self.learning_rate,
                               weight_decay=self.weight_decay, warmup_ratio=self.warmup_ratio,
                               max_grad_norm=self.max_grad_norm, lr_scheduler="cosine")


@dataclass
class PretrainLog:
    """Mean training loss per logging window, and the wall time of the loop."""

    losses: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    vision_warmup: dict[str, float] = field(default_factory=dict)  # stage 1's held-out readout accuracy


def batch_for(step: int, config: PretrainConfig, processor: QwenVLProcessor, collator: Collator
              ) -> dict[str, torch.Tensor]:
    """The model inputs of optimizer step ``step``: samples ``step * batch .. +batch`` of the task mixture."""
    samples = mixture(config.tasks, config.seed, step * config.batch_size, config.batch_size)
    return collator([encode_sample(s, processor) for s in samples])


def init_for_pretraining(model: QWenLMHeadModel, config: PretrainConfig) -> None:
    """The recipe's starting point on top of the preset's init: the ViT's learned positional embedding drawn with
    ``position_init_std`` instead of width**-0.5 (0.18 at width 32). At width**-0.5 the positions are ~5% of each
    patch token after ``ln_pre`` and do not grow in training, so the tokens the LM reads do not say where they
    came from, and questions about position stay at chance (docs/pretraining.md)."""
    generator = torch.Generator().manual_seed(config.seed)  # drawn on the CPU: the same init on every device
    pos = model.transformer.visual.positional_embedding
    with torch.no_grad():
        pos.copy_(torch.randn(pos.shape, generator=generator, dtype=pos.dtype) * config.position_init_std)


def pretrain(model: QWenLMHeadModel, processor: QwenVLProcessor, config: PretrainConfig,
             log_every: int = 100, on_log: Callable[[int, float], None] | None = None,
             stop_after: int | None = None, tower: torch.nn.Module | None = None) -> PretrainLog:
    """Stage 2: train ``model`` in place on the rendered mix for ``config.steps`` steps with the model's own loss;
    the vision tower stays as stage 1 left it unless ``config.train_vision_with_lm``. Returns the loss curve.
    ``stop_after``: stop after that many steps of the same run (same schedule): an exact prefix of it.
    ``tower``: the vision tower of a model that is not v1's (``family.vision_tower(model)``)."""
    hp = config.hyperparameters()
    torch.manual_seed(config.seed)
    tower = model.transformer.visual if tower is None else tower
    frozen = [] if config.train_vision_with_lm else [p for p in tower.parameters() if p.requires_grad]
    for param in frozen:
        param.requires_grad_(False)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(named, hp)
    scheduler = build_scheduler(optimizer, hp, config.steps)
    collator = Collator(processor.pad_token_id, device=model_device(model))
    log, window, start = PretrainLog(), [], time.monotonic()
    model.train()
    last = config.steps if stop_after is None else min(stop_after, config.steps)
    for step in range(last):
        batch = batch_for(step, config, processor, collator)
        loss = model(**batch, loss_only=True).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        window.append(loss.detach())  # read back once per logging window, not once per step
        if (step + 1) % log_every == 0 or step + 1 == last:
            log.losses.append((step + 1, float(torch.stack(window).mean())))
            window = []
            if on_log is not None:
                on_log(*log.losses[-1])
    model.eval()
    for param in frozen:
        param.requires_grad_(True)
    log.seconds = time.monotonic() - start
    return log


def pretrain_base(out_dir: str | Path, config: PretrainConfig = PretrainConfig(), log_every: int = 100,
                  on_log: Callable[[int, float], None] | None = None,
                  prefix: tuple[int, int] | None = None) -> tuple[Path, PretrainLog]:
    """Materialise ``config.preset`` with ``config.seed``, pretrain it (``init_for_pretraining``, stage 1
    ``warm_up_vision``, stage 2 ``pretrain``) and write the result (config.json, qwen.tiktoken, safetensors) to
    the new directory ``out_dir``. ``prefix`` (warm-up steps, LM steps): stop each stage early, which gives the
    weights of the full run's first steps exactly (the reproducibility check of the shipped base runs one)."""
    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        random_dir = write_random_model(Path(tmp) / "random", preset=config.preset, seed=config.seed)
        family = detect_family(random_dir)
        model = family.load_model(random_dir, device=config.device)
        processor = family.load_processor(random_dir)
        init_for_pretraining(model, config)
        start = time.monotonic()
        warmup_steps = config.vision_warmup_steps if prefix is None else min(prefix[0], config.vision_warmup_steps)
        warmup = warm_up_vision(model.transformer.visual, processor.image_size, warmup_steps, seed=config.seed,
                                targets=tuple(config.vision_warmup_targets), side=tuple(config.vision_warmup_side),
                                pooled=config.vision_warmup_pooled)
        warmup_seconds = time.monotonic() - start
        log = pretrain(model, processor, config, log_every, on_log, stop_after=None if prefix is None else prefix[1])
        log.vision_warmup, log.seconds = warmup, log.seconds + warmup_seconds
        family.save_model(model, out)
        shutil.copyfile(random_dir / TOKENIZER_FILE, out / TOKENIZER_FILE)
    return out, log


def evaluate_tasks(model: torch.nn.Module, processor: QwenVLProcessor, tasks: Sequence[str], seed: int,
                   n_per_task: int, stop_ids: Sequence[int], max_new_tokens: int = 48) -> dict[str, float]:
    """Held-out score per task: exact match, or for grounding tasks the share of boxes with IoU >= 0.5."""
    scores = {}
    for task in tasks:
        samples = mixture((task,), seed, 0, n_per_task)
        metrics = task_metrics(model, task_items(samples, processor, max_new_tokens), processor, max_new_tokens,
                               stop_ids)
        scores[task] = metrics.get("grounding_accuracy", metrics.get("exact_match", 0.0))
    return scores


@dataclass(frozen=True)
class FineTuneCheck:
    """A LoRA fine-tune on a held-out task, run as the platform runs jobs (``training.Trainer``): LoRA on the
    language model only, the vision tower frozen, as the demo does."""

    task: str
    n_train: int = 800
    n_validation: int = 100
    steps: int = 300
    batch_size: int = 8
    learning_rate: float = 1e-3
    lora_r: int = 16
    lora_alpha: float = 32.0
    seed: int = 0


def write_task_files(out_dir: Path, check: FineTuneCheck) -> tuple[Path, Path]:
    """Training and validation files (official format) of ``check.task``, from disjoint seeds."""
    from qwenvl_core.pretrain.render import write_dataset

    train = mixture((check.task,), 100 + check.seed, 0, check.n_train)
    val = mixture((check.task,), 200 + check.seed, 0, check.n_validation)
    return write_dataset(out_dir, train, "train"), write_dataset(out_dir, val, "validation")


def run_fine_tune(base_dir: Path, check: FineTuneCheck, work_dir: Path) -> dict[str, float]:
    """Fine-tune ``base_dir`` on ``check``; returns the Trainer's final metrics (``eval/...`` fine-tuned,
    ``eval_base/...`` the base model) plus ``seconds``."""
    from qwenvl_core.specs import FineTuneJobSpec
    from qwenvl_core.training import Trainer

    train, val = write_task_files(work_dir / "data", check)
    spec = FineTuneJobSpec.model_validate({
        "job_id": f"ft-{check.task}", "base_model": str(base_dir), "train_file": str(train),
        "validation_file": str(val), "output_uri": str(work_dir / "run"), "seed": check.seed,
        "lora": {"r": check.lora_r, "alpha": check.lora_alpha, "dropout": 0.0, "targets": "all-linear"},
        "hyperparameters": {"max_steps": check.steps, "batch_size": check.batch_size,
                            "micro_batch_size": check.batch_size, "learning_rate": check.learning_rate},
        "evaluation": {"max_new_tokens": 48, "max_samples": check.n_validation},
        "checkpoint": {"every_n_steps": 100_000},
    })
    start = time.monotonic()
    result = Trainer(spec, work_dir=work_dir / "run").run()
    return {**result.metrics, "seconds": time.monotonic() - start}


def chance(check: FineTuneCheck) -> float:
    """What a model that ignores the picture scores on ``check``'s validation data: the share of the most
    frequent training answer, or for grounding the share of boxes with IoU >= 0.5 against the mean training box."""
    from collections import Counter

    from qwenvl_core.models.qwen_vl.grounding import parse_grounding
    from qwenvl_core.training.evaluate import iou

    train = [s.messages[-1].text for s in mixture((check.task,), 100 + check.seed, 0, check.n_train)]
    val = [s.messages[-1].text for s in mixture((check.task,), 200 + check.seed, 0, check.n_validation)]
    boxes = [parse_grounding(a) for a in train]
    if all(boxes):
        corners = [tuple(getattr(b[0].box, k) for k in ("x1", "y1", "x2", "y2")) for b in boxes]
        mean = tuple(sum(c[i] for c in corners) / len(corners) for i in range(4))
        val_boxes = [parse_grounding(a)[0].box for a in val]
        return sum(iou((b.x1, b.y1, b.x2, b.y2), mean) >= 0.5 for b in val_boxes) / len(val)
    top = Counter(train).most_common(1)[0][0]
    return sum(a == top for a in val) / len(val)
