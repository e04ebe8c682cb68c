"""The demo itself (`make demo` runs `qwenvl demo`), end to end on a fresh QWENVL_HOME with free ports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwenvl_cli.stack import BASE_MODEL
from tests.cli.conftest import processes_of, qwenvl, stack_env

pytestmark = pytest.mark.slow


def test_demo_fine_tunes_the_pretrained_base_with_auto_settings_and_stops_the_stack(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = stack_env(home)
    result = qwenvl(env, "demo", "--report", str(tmp_path / "report.json"), timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    # The demo sends only the model, the files and where to run: every hyperparameter is `auto`, and the job shows
    # the values the platform resolved from the pretrained base's training defaults and the data.
    hp = report["hyperparameters"]
    assert all(isinstance(hp[k], int | float) for k in ("n_epochs", "batch_size", "learning_rate_multiplier")), hp
    m = report["metrics"]
    # The pretrained base reads colour from the picture (six answers, chance 1/6) and the fine-tune keeps it.
    assert m["eval/exact_match"] >= 0.9
    # Grounding is learnt, measured on 96 held-out boxes against chance (the mean training box: what a model that
    # ignores the picture would learn, 2 of 96): a model at chance reaches p < 1e-3 (8 or more boxes) less than once
    # in 1,000 runs; the measured fine-tune drew 14 (p ~1e-8; base 3: docs/hyperparameters.md).
    g = report["grounding"]
    assert g["boxes"] >= 96 and 0 < g["chance"] < 0.1, g
    assert g["p_value"] < 1e-3 and g["hits"] > g["base_hits"], g
    assert g["hits"] == round(m["eval/grounding_accuracy"] * g["boxes"])
    assert f"{g['hits']} of {g['boxes']} held-out boxes" in result.stdout
    assert report["model"].startswith(f"ft:{BASE_MODEL}:default:demo:")
    assert report["answer"]
    assert "MLflow UI" in result.stdout and "/docs" in result.stdout
    assert not (home / "stack.json").exists() and processes_of(home) == []
    # the stack it started (and stopped) served only the base it fine-tuned: the only one it materialised
    assert [p.name for p in (home / "models").iterdir()] == [BASE_MODEL]
