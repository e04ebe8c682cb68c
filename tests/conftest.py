"""Shared fixtures: tiny random Qwen-VL model directories built locally (no downloads); and how `make test`'s
xdist workers share the suite out (``pytest_collection_modifyitems``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HF_FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")  # the transformers-native families
# The session's shared Ray clusters (tests.fixtures.ray_head, tests/workflows/conftest.py): every test on one of them
# runs on the same xdist worker, so each cluster starts once
RAY_SESSION_FIXTURES = ("ray_dashboard", "ray_cluster")


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


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``--dist loadgroup`` (``make test`` runs two xdist workers): every test goes into a group that one
    worker runs whole, the tests on one of the session's Ray clusters together (the cluster starts once), every
    other module by itself (its module fixtures are built once). The groups are handed out in item order (``make
    test`` turns xdist's reordering off), so the Ray groups come first, then the modules with slow tests, then the
    rest: the long work starts first and the short modules fill both workers at the end."""
    if not config.getoption("loadgroup", default=False):
        return

    def group(item: pytest.Item) -> str:
        fixtures = getattr(item, "fixturenames", ())
        return next((name for name in RAY_SESSION_FIXTURES if name in fixtures), item.nodeid.split("::")[0])

    groups = {item: group(item) for item in items}
    slow = {groups[item] for item in items if item.get_closest_marker("slow")}
    for item, name in groups.items():
        item.add_marker(pytest.mark.xdist_group(name))
    items.sort(key=lambda item: 0 if groups[item] in RAY_SESSION_FIXTURES else 1 if groups[item] in slow else 2)


pytest_plugins = ["tests.fixtures.s3", "tests.fixtures.postgres", "tests.fixtures.mlflow_server",
                  "tests.fixtures.ray_head"]
