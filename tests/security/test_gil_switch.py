"""The API process's GIL switch interval (``Settings.gil_switch_interval_s``) and GC freeze (``Settings.gc_freeze``):
set while the app runs, restored after.

A short request (another tenant's job listing) waits for the GIL behind every busy thread of the process (a flood's
handlers, a large body being parsed, an image decoded) up to one switch interval per hand-over; the app shortens it
while it runs (bench/tenant_isolation.py measures the effect) and gives the process its own value back on shutdown.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

from fastapi.testclient import TestClient

from service.main import create_app
from tests.service.helpers import make_settings


def test_the_app_shortens_the_switch_interval_while_it_runs_and_restores_it(tmp_path: Path,
                                                                            tiny_model_dir: Path) -> None:
    before = sys.getswitchinterval()
    settings = make_settings(tmp_path / "a", tiny_model_dir, gil_switch_interval_s=0.0007)
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/chat/ready").status_code in (200, 404, 503)
        assert abs(sys.getswitchinterval() - 0.0007) < 1e-9
    assert sys.getswitchinterval() == before


def test_zero_leaves_python_s_own_interval(tmp_path: Path, tiny_model_dir: Path) -> None:
    before = sys.getswitchinterval()
    with TestClient(create_app(make_settings(tmp_path / "b", tiny_model_dir, gil_switch_interval_s=0))):
        assert sys.getswitchinterval() == before


def test_the_app_freezes_what_start_up_loaded_and_unfreezes_on_shutdown(tmp_path: Path, tiny_model_dir: Path) -> None:
    """``Settings.gc_freeze``: a full collection while the app runs scans only what requests created since start-up
    (one took 185-400 ms with the chat engine in process, every thread stopped meanwhile)."""
    assert gc.get_freeze_count() == 0
    with TestClient(create_app(make_settings(tmp_path / "c", tiny_model_dir))) as client:
        assert client.get("/v1/chat/ready").status_code in (200, 404, 503)
        frozen = gc.get_freeze_count()
        assert frozen > 10_000  # everything the test process had loaded: the libraries, the app
        before = len(gc.get_objects(generation=2))
        gc.collect()
        assert len(gc.get_objects(generation=2)) < frozen  # the full collection saw the unfrozen rest only
        assert before < frozen
    assert gc.get_freeze_count() == 0


def test_gc_freeze_off_leaves_the_collector_alone(tmp_path: Path, tiny_model_dir: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path / "d", tiny_model_dir, gc_freeze=False))):
        assert gc.get_freeze_count() == 0
