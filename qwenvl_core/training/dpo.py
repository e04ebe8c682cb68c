"""Direct Preference Optimization (Rafailov et al., 2023, sigmoid loss) for the training loop, and its evaluation.

For a pair (prompt x, preferred reply y_w, non-preferred reply y_l), with pi the policy (base + adapter) and ref the
reference model:

    loss = -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))

``log pi(y|x)`` is the sum of the reply tokens' log-probabilities (the labelled positions of the row: the reply's
content and its end-of-turn token, ``data.preference``). The implicit rewards are ``beta * (log pi - log ref)``;
the reward margin is chosen - rejected, the reward accuracy the share of pairs with a positive margin.

**Reference = the base model.** The reference log-probabilities come from the same model with the adapter
disabled (peft's ``disable_adapter()``, in eval mode, without gradients): no second copy of the weights, and it
works the same under LoRA, Q-LoRA (the NF4 base) and every strategy (the reference forward runs on every rank,
so ZeRO-3's gathers stay collective). Only the forward contract is used (``model(...).logits`` with the collated
batch), so every family trains with it.

A micro-batch of n pairs is one forward of 2n rows (preferred rows first) for the reference and one for the policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from qwenvl_core.data import IGNORE_INDEX, Collator
from qwenvl_core.data.preference import PreferencePair
from qwenvl_core.training.evaluate import EVAL_BATCH, adapter_disabled
from qwenvl_core.training.objectives import StepOutput


@dataclass
class DpoTerms:
    """Per pair: the loss and the implicit rewards ``beta * (log pi - log ref)`` of both replies."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    @property
    def margins(self) -> torch.Tensor:
        return self.chosen_rewards - self.rejected_rewards


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> DpoTerms:
    """The sigmoid DPO loss of sequence log-probabilities ``[n]`` (module docstring); rewards are detached."""
    logits = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return DpoTerms(-F.logsigmoid(beta * logits), beta * (policy_chosen - ref_chosen).detach(),
                    beta * (policy_rejected - ref_rejected).detach())


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B]``: per row, the summed log-probability of its labelled tokens (next-token targets)."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits  # [B, T, V]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX  # [B, T-1]
    picked = logits[:, :-1][mask].float()  # [N, V]: only the labelled positions
    token_logps = picked.log_softmax(-1).gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)  # [N]
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(mask)[mask]
    return torch.zeros(labels.shape[0], dtype=token_logps.dtype, device=token_logps.device).index_add(
        0, rows, token_logps)


def pair_batch(collator: Collator, pairs: Sequence[PreferencePair]) -> dict[str, torch.Tensor]:
    """One batch of 2n rows: the preferred rows, then the non-preferred ones."""
    return collator([p.chosen for p in pairs] + [p.rejected for p in pairs])


@torch.no_grad()
def reference_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``sequence_logps`` of the base model: adapter disabled, eval mode (no dropout), no gradients."""
    was_training = model.training
    model.eval()
    try:
        with adapter_disabled(model):
            return sequence_logps(model, batch)
    finally:
        model.train(was_training)


class DPOObjective:
    """The loop's objective for ``method: dpo`` (``objectives.Objective``)."""

    metric_keys = ("pairs", "reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward")

    def __init__(self, beta: float, collator: Collator) -> None:
        self.beta, self.collator = beta, collator

    def step(self, engine: Any, rows: Sequence[PreferencePair]) -> StepOutput:
        batch = pair_batch(self.collator, rows)
        n = len(rows)
        ref = reference_logps(engine.module, batch)
        policy = sequence_logps(engine.model, batch)
        terms = dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], self.beta)
        margins = terms.margins
        sums: dict[str, torch.Tensor | float] = {
            "pairs": float(n), "reward_margin": margins.detach().sum(), "reward_accuracy": (margins > 0).sum(),
            "chosen_reward": terms.chosen_rewards.detach().sum(), "rejected_reward": terms.rejected_rewards.detach().sum()}
        return StepOutput(terms.losses.mean(), batch["attention_mask"].sum(), sums)

    def step_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        pairs = max(1.0, sums.get("pairs", 0.0))
        return {k: sums.get(k, 0.0) / pairs for k in self.metric_keys if k != "pairs"}

    def evaluator(self, rows: list[Any]) -> PreferenceEvaluator:
        return PreferenceEvaluator(rows, self.collator, self.beta)


class PreferenceEvaluator:
    """DPO metrics on the validation pairs: ``loss``, ``reward_margin``, ``reward_accuracy`` (share of pairs whose
    implicit reward prefers the preferred reply), ``chosen_reward`` / ``rejected_reward``, and
    ``preference_accuracy``: the share of pairs to which the model itself gives the preferred reply the higher
    log-probability (defined for the base model too, where the rewards are all 0). The reference log-probabilities
    are computed once (the base does not change) on the first call, which must not be inside ``adapter_disabled``
    (``evaluate.base_and_finetuned`` evaluates the fine-tuned model first)."""

    def __init__(self, pairs: list[PreferencePair], collator: Collator, beta: float) -> None:
        self.pairs, self.collator, self.beta = pairs, collator, beta
        self._ref: list[torch.Tensor] | None = None

    def _chunks(self) -> list[dict[str, torch.Tensor]]:
        return [pair_batch(self.collator, self.pairs[i: i + EVAL_BATCH]) for i in range(0, len(self.pairs), EVAL_BATCH)]

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, task: bool = True) -> dict[str, float]:
        chunks = self._chunks()
        if self._ref is None:
            self._ref = [reference_logps(model, batch) for batch in chunks]
        was_training = model.training
        model.eval()
        try:
            policy = [sequence_logps(model, batch) for batch in chunks]
        finally:
            model.train(was_training)
        pol, ref = torch.cat([self._split(p) for p in policy], 1), torch.cat([self._split(r) for r in self._ref], 1)
        terms = dpo_loss(pol[0], pol[1], ref[0], ref[1], self.beta)
        margins = terms.margins
        return {"loss": float(terms.losses.mean()), "reward_margin": float(margins.mean()),
                "reward_accuracy": float((margins > 0).float().mean()),
                "chosen_reward": float(terms.chosen_rewards.mean()),
                "rejected_reward": float(terms.rejected_rewards.mean()),
                "preference_accuracy": float((pol[0] > pol[1]).float().mean())}

    @staticmethod
    def _split(logps: torch.Tensor) -> torch.Tensor:
        """``[2n]`` (preferred rows first) -> ``[2, n]``."""
        return logps.view(2, -1)
