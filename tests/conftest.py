"""Shared fixtures: tiny random Qwen-VL model directories built locally (no downloads); and how `make test`'s
xdist workers share the suite out (``work_unit``, ``pytest_xdist_make_scheduler``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HF_FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")  # the transformers-native families
# The session's shared Ray clusters (tests.fixtures.ray_head, tests/workflows/conftest.py) and the modules whose tests
# use them: under `make test`, one xdist worker runs all of a cluster's modules, so each cluster starts once
# (``work_unit``). Collection checks the list against the fixtures the tests use.
RAY_SESSION_FIXTURES = ("ray_dashboard", "ray_cluster")
SHARED_CLUSTER_MODULES = {
    "tests/security/test_secrets.py": "ray_dashboard",
    "tests/service/test_continued_training.py": "ray_dashboard",
    "tests/service/test_dpo_job.py": "ray_dashboard",
    "tests/service/test_pause_resume.py": "ray_dashboard",
    "tests/service/test_scheduler_ray.py": "ray_dashboard",
    "tests/workflows/test_finetune_ray.py": "ray_cluster",
    "tests/workflows/test_job_restart.py": "ray_cluster",
}


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


def _module(nodeid: str) -> str:
    return nodeid.split("::")[0]


def work_unit(nodeid: str) -> str:
    """What one xdist worker runs whole: a shared cluster's modules together, any other module by itself (its
    module fixtures are built once)."""
    return SHARED_CLUSTER_MODULES.get(_module(nodeid), _module(nodeid))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """Under ``--dist loadscope`` (``make test``): xdist's by-scope scheduling with ``work_unit`` as the scope.
    (``--dist loadgroup`` cannot do it: xdist marks a group in the node id, which pytest 9.2's ids no longer take.)"""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByWorkUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return ByWorkUnit(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Checks ``SHARED_CLUSTER_MODULES`` against the fixtures the tests use, then orders the tests, which orders the
    work units (``make test`` turns xdist's own reordering off): the shared clusters' first, then the modules with
    slow tests, then the rest, so the long work starts first and short modules fill both workers at the end. A
    shared cluster's modules are then next to each other in one process, with or without xdist, and the cluster
    is stopped after the last of them (``pytest_runtest_teardown``)."""
    for item in items:
        module = _module(item.nodeid)
        for fixture in set(RAY_SESSION_FIXTURES) & set(getattr(item, "fixturenames", ())):
            if SHARED_CLUSTER_MODULES.get(module) != fixture:
                raise pytest.UsageError(f"{module} uses the shared Ray cluster {fixture!r}: list it in "
                                        "SHARED_CLUSTER_MODULES (tests/conftest.py), so that one xdist worker runs "
                                        "all of that cluster's tests")
    slow = {work_unit(item.nodeid) for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: 0 if _module(item.nodeid) in SHARED_CLUSTER_MODULES
               else 1 if work_unit(item.nodeid) in slow else 2)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """After the last test of a shared cluster's work unit, that session fixture is finished at once, not at the
    end of the session: an idle Ray cluster kept about a tenth of a core busy (its log monitor, dashboard agent,
    GCS and raylet; measured 2026-12-04: 14 core-minutes of a 45-minute run for the two clusters' three nodes,
    most of it after their tests had ended). A later test asking for it again would get a new one."""
    cluster = SHARED_CLUSTER_MODULES.get(_module(item.nodeid))
    if cluster is None or (nextitem is not None and work_unit(nextitem.nodeid) == work_unit(item.nodeid)):
        return
    # (looked up, not taken from the item's own fixtures: the unit's last test need not use the cluster)
    for fixturedef in item.session._fixturemanager.getfixturedefs(cluster, item) or ():
        fixturedef.finish(item._request)


pytest_plugins = ["tests.fixtures.s3", "tests.fixtures.postgres", "tests.fixtures.mlflow_server",
                  "tests.fixtures.ray_head"]
