"""What one micro-step optimises: the training objective the loop calls (``Trainer._micro_step``).

An objective turns the rank's rows of one micro-batch into a loss tensor (the loop runs backward and the optimizer
through the strategy's engine), the tokens it processed, and sums of its own metrics, which the loop all-reduces
with the loss at each accumulation boundary (``metric_keys``, the same order on every rank) and turns into
``train/<name>`` metrics (``step_metrics``). ``evaluator`` may supply the method's own validation metrics; None
keeps the loop's SFT evaluator.

- ``SupervisedObjective``: next-token cross-entropy on the labelled tokens (``loss_only``: the LM head runs only
  where supervised), today's SFT.
- ``DPOObjective`` (``qwenvl_core.training.dpo``): Direct Preference Optimization on preference pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from qwenvl_core.data import Collator
from qwenvl_core.specs import FineTuneJobSpec

EvalFn = Callable[..., dict[str, float]]


@dataclass
class StepOutput:
    """One micro-step: the loss to back-propagate, tokens processed, and sums of the objective's metrics. Counts and
    sums computed on the device stay tensors (0-dim): the loop reads them once per optimizer step, not per micro-step."""

    loss: torch.Tensor
    tokens: torch.Tensor | float
    sums: dict[str, torch.Tensor | float] = field(default_factory=dict)


class Objective(Protocol):
    metric_keys: tuple[str, ...]

    def step(self, engine: Any, rows: Sequence[Any]) -> StepOutput:
        """Forward the rank's rows through ``engine.model`` (and whatever else it needs); no backward."""

    def step_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """The optimizer step's metrics from the all-reduced ``sums`` (names without the ``train/`` prefix)."""

    def evaluator(self, rows: list[Any]) -> EvalFn | None:
        """The validation evaluator for ``rows`` (the validation dataset's items), or None for the SFT one."""


class SupervisedObjective:
    """Supervised fine-tuning: mean cross-entropy over the supervised tokens."""

    metric_keys: tuple[str, ...] = ()

    def __init__(self, collator: Collator) -> None:
        self.collator = collator

    def step(self, engine: Any, rows: Sequence[Any]) -> StepOutput:
        batch = self.collator(rows)
        loss = engine.model(**batch, loss_only=True).loss  # LM head only where supervised
        return StepOutput(loss, batch["attention_mask"].sum())

    def step_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {}

    def evaluator(self, rows: list[Any]) -> EvalFn | None:
        return None


def build_objective(spec: FineTuneJobSpec, collator: Collator) -> Objective:
    """The objective of ``spec.method``."""
    if spec.method.type == "dpo":
        from qwenvl_core.training.dpo import DPOObjective

        return DPOObjective(spec.method.dpo.beta, collator)
    return SupervisedObjective(collator)
