"""The API process's GIL switch interval (``Settings.gil_switch_interval_s``): set while the app runs, restored after.

A short request (another tenant's job listing) waits for the GIL behind every busy thread of the process (a flood's
handlers, a large body being parsed, an image decoded) up to one switch interval per hand-over; the app shortens it
while it runs (bench/tenant_isolation.py measures the effect) and gives the process its own value back on shutdown.
"""

from __future__ import annotations

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
