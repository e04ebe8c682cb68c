"""A restart that stops a validation worker (SIGTERM to the API's process group, as a process manager sends) leaves
the upload ``uploaded`` to be validated again, not marked invalid for good; a worker that crashes on its own is still
a verdict (``error``). The real app and the real worker in its child process."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.main import create_app
from tests.service.helpers import auth, make_settings, new_tenant, upload, wait_file

ADMIN = "admin-key-for-interrupted-validation-0123"


def _worker_pid(timeout: float = 60.0) -> int:
    """The validation worker this process started (found by its command line)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat[1]) == os.getpid() and b"service.validation_worker" in cmdline:
                return int(entry.name)
        time.sleep(0.02)
    raise AssertionError("no validation worker started")


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, "uploaded"), (signal.SIGKILL, "error")])
def test_a_worker_stopped_by_a_restart_gives_no_verdict(tmp_path, tiny_model_dir, sig, status):
    app = create_app(make_settings(tmp_path / "data", tiny_model_dir, admin_key=ADMIN))
    with TestClient(app) as client:
        _, key = new_tenant(client, ADMIN, "restarting")
        file_id = upload(client, key)["id"]
        os.kill(_worker_pid(), sig)
        validator = app.state.ctx.validator
        deadline = time.monotonic() + 60
        while validator.in_flight(file_id) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not validator.in_flight(file_id)
        row = client.get(f"/v1/files/{file_id}", headers=auth(key)).json()
        assert row["status"] == status, row
        if status == "uploaded":  # what the scheduler's sweep of stale uploads (or the next start) does
            validator.submit(file_id, _tenant_of(app, file_id))
            assert wait_file(client, key, file_id, timeout=180)["status"] == "processed"
        else:
            assert "validation worker failed" in row["validation"]["errors"][0]["message"], row


def _tenant_of(app: FastAPI, file_id: str) -> str:
    from service import repository as repo

    with app.state.ctx.sessions() as s:
        return repo.file_by_id(s, file_id=file_id).tenant_id
