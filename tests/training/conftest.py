"""Synthetic data and job specs shared by the training tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from qwenvl_core.data import SynthResult, write_synth_dataset
from qwenvl_core.specs import FineTuneJobSpec


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> SynthResult:
    """128 coloured-shape samples: 96 train, 32 validation (Qwen-VL format)."""
    return write_synth_dataset(tmp_path_factory.mktemp("synth") / "data", n=128, seed=0, val_fraction=0.25,
                               bundles=False)


def make_spec(model_dir: Path, data: SynthResult, out: Path, **overrides: Any) -> FineTuneJobSpec:
    """A small, fast job that learns: LoRA r 8, lr 1e-2, batch 4 (2 x 2 accumulation), 12 steps."""
    fields: dict[str, Any] = {
        "job_id": "job", "base_model": str(model_dir), "train_file": str(data.train),
        "validation_file": str(data.validation), "output_uri": str(out),
        "lora": {"r": 8, "alpha": 16}, "evaluation": {"max_new_tokens": 4},
        "hyperparameters": {"max_steps": 12, "batch_size": 4, "micro_batch_size": 2, "learning_rate": 1e-2,
                            "warmup_ratio": 0.1},
        "checkpoint": {"every_n_steps": 4},
    }
    for key, value in overrides.items():
        fields[key] = {**fields[key], **value} if isinstance(value, dict) and key in fields else value
    return FineTuneJobSpec.model_validate(fields)
