"""Tiny random model directories of the transformers-native families, built once per test session (read-only)."""

from __future__ import annotations

from pathlib import Path

import pytest

HF_FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{family name: complete <family>-tiny directory (seed 0)}``. Tests must not modify them (copy first)."""
    from qwenvl_core.models.registry import get_family

    root = tmp_path_factory.mktemp("families")
    return {name: get_family(name).materialize(f"{name}-tiny", root / name, seed=0) for name in HF_FAMILIES}
