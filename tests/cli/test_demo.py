"""The demo itself (`make demo` runs `qwenvl demo`), end to end on a fresh QWENVL_HOME with free ports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.conftest import processes_of, qwenvl, stack_env

pytestmark = pytest.mark.slow


def test_demo_fine_tunes_through_the_api_beats_the_base_and_stops_the_stack(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = stack_env(home)
    result = qwenvl(env, "demo", "--report", str(tmp_path / "report.json"), timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    m = report["metrics"]
    assert m["eval/loss"] < m["eval_base/loss"] - 0.3
    assert m["eval/token_accuracy"] > m["eval_base/token_accuracy"] + 0.2
    # Colour questions have six answers (chance 1/6): the adapter must read the picture, not guess.
    assert m["eval/exact_match"] >= 0.4 and m["eval_base/exact_match"] <= 0.2
    assert report["model"].startswith("ft:qwen-vl-tiny:default:demo:")
    assert report["answer"]
    assert "MLflow UI" in result.stdout and "/docs" in result.stdout
    assert report["seconds"] < 600
    assert not (home / "stack.json").exists() and processes_of(home) == []
