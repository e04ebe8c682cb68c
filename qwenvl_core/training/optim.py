"""Optimizer and learning-rate schedule of a job: AdamW with the official defaults and warm-up schedules.

AdamW (torch) with the job's betas (0.9, 0.95), epsilon and weight decay 0.1, applied to every trainable
parameter except biases and norms (no decay there, as HF ``Trainer`` does). Schedules: ``cosine`` (to 0),
``linear`` (to 0) or ``constant``, each after a linear warm-up of ``ceil(warmup_ratio * total_steps)`` steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR

from qwenvl_core.specs import Hyperparameters


def param_groups(named: Sequence[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict[str, object]]:
    """Two groups: decayed matrices, and undecayed biases / norm weights (1-D tensors)."""
    decay = [p for n, p in named if p.ndim >= 2 and not n.endswith(".bias")]
    plain = [p for n, p in named if not (p.ndim >= 2 and not n.endswith(".bias"))]
    groups: list[dict[str, object]] = [{"params": decay, "weight_decay": weight_decay}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    return groups


def build_optimizer(named: Sequence[tuple[str, torch.nn.Parameter]], hp: Hyperparameters) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(named, hp.weight_decay), lr=hp.peak_learning_rate,
                             betas=(hp.adam_beta1, hp.adam_beta2), eps=hp.adam_epsilon)


def warmup_steps(hp: Hyperparameters, total_steps: int) -> int:
    return math.ceil(hp.warmup_ratio * total_steps)


def lr_factor(step: int, total_steps: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, hp: Hyperparameters, total_steps: int) -> LambdaLR:
    warmup = warmup_steps(hp, total_steps)
    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup, hp.lr_scheduler))
