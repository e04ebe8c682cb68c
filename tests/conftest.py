"""Shared fixtures: tiny random Qwen-VL model directories built locally (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete ``qwen-vl-tiny`` model directory (config, tokenizer, safetensors), seed 0. Read-only."""
    from qwenvl_core.models.qwen_vl.materialize import write_random_model

    return write_random_model(tmp_path_factory.mktemp("models") / "qwen-vl-tiny", preset="qwen-vl-tiny", seed=0)


pytest_plugins = ["tests.fixtures.s3", "tests.fixtures.postgres", "tests.fixtures.mlflow_server",
                  "tests.fixtures.ray_head"]
