"""A run's metrics in OpenAI's shapes: the ``metrics`` of a checkpoint and the job's ``results.csv``.

OpenAI's fine-tuning reports a checkpoint's ``train_loss`` and ``valid_loss`` / ``valid_mean_token_accuracy``, and
gives each job a results file, a CSV with one row per step: ``step,train_loss,train_accuracy,valid_loss,
valid_mean_token_accuracy``. Here ``valid_*`` come from the fine-tuned model's evaluations on the validation file
(periodic, ``evaluation.every_n_steps``, and the final one), in the steps they ran; other steps leave them empty.
``train_accuracy`` is always empty: the training step computes no token accuracy (a full argmax over the
vocabulary per step would cost time for a column few read). An objective's other evaluation metrics (DPO's reward
margin, ...) appear as ``valid_<metric>`` in a checkpoint's metrics; the CSV keeps OpenAI's columns.
"""

from __future__ import annotations

import csv
import io

from qwenvl_core.runs import RESULTS_CSV
from qwenvl_core.training.checkpoint import TrainState

__all__ = ["COLUMNS", "RESULTS_CSV", "results_csv", "valid_metrics"]
COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")


def valid_metrics(evaluated: dict[str, float]) -> dict[str, float]:
    """An evaluation's ``eval/*`` metrics under OpenAI's names: ``valid_loss``, ``valid_mean_token_accuracy``,
    ``valid_<metric>`` for the rest (the base model's ``eval_base/*`` are not the fine-tuned model's: left out)."""
    named = {}
    for key, value in evaluated.items():
        if not key.startswith("eval/"):
            continue
        name = key.removeprefix("eval/")
        named["valid_mean_token_accuracy" if name == "token_accuracy" else f"valid_{name}"] = value
    return named


def results_csv(state: TrainState) -> str:
    """The run's ``results.csv``: a row per optimizer step of ``state.losses``, with the evaluations of that step."""
    valid = {step: valid_metrics(metrics) for step, metrics in state.evaluations}
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for step, loss in state.losses:
        row = {"step": step, "train_loss": loss, **valid.get(step, {})}
        writer.writerow(["" if row.get(column) is None else row[column] for column in COLUMNS])
    return out.getvalue()
