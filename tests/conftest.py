"""Shared fixtures: tiny random Qwen-VL model directories built locally (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HF_FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")  # the transformers-native families


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete ``qwen-vl-tiny`` model directory (config, tokenizer, safetensors), seed 0. Read-only."""
    from qwenvl_core.models.qwen_vl.materialize import write_random_model

    return write_random_model(tmp_path_factory.mktemp("models") / "qwen-vl-tiny", preset="qwen-vl-tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{family name: complete <family>-tiny directory (seed 0)}``. Tests must not modify them (copy first)."""
    from qwenvl_core.models.registry import get_family

    root = tmp_path_factory.mktemp("families")
    return {name: get_family(name).materialize(f"{name}-tiny", root / name, seed=0) for name in HF_FAMILIES}


def pytest_configure(config: pytest.Config) -> None:
    """What ``qwenvl up`` and the images give every process, for this process and everything it starts: usage
    telemetry off (``qwenvl_cli.telemetry.TELEMETRY_OFF``; MLflow's client thread races urllib on os.environ)."""
    from qwenvl_cli.telemetry import TELEMETRY_OFF

    for name, value in TELEMETRY_OFF.items():
        os.environ.setdefault(name, value)


pytest_plugins = ["tests.fixtures.s3", "tests.fixtures.postgres", "tests.fixtures.mlflow_server",
                  "tests.fixtures.ray_head"]
