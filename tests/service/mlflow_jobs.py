"""Jobs tracked in a real MLflow server, shared by the integration tests and the browser test.

``tracked_app``: the real API wired to ``mlflow_auth_server`` (tenants get their read-only MLflow login) with a
launcher that records submissions. ``track_job`` is the cheapest honest finished run: the scheduler launches the
job (so the spec it runs is the one the service writes: integration, lineage tags, dataset inputs), then the
workflow's own ``MlflowTracker`` logs it exactly as rank 0 of a job does (start, per-step metrics in batches,
finish with the loss plot), without the minutes of a Ray Train run.
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from qwenvl_core.runs import RunDir
from qwenvl_core.specs import FineTuneJobSpec, JobState
from service import repository as repo
from service.context import ServiceContext
from service.main import create_app
from tests.fixtures.mlflow_server import MlflowAuthServer
from tests.service.helpers import SAMPLES, auth, jsonl, make_settings
from tests.service.scheduler_harness import RecordingLauncher

ADMIN_KEY = "admin-key-for-mlflow-job-tests-0123456789"
STEPS = 12


def tracked_app(root: Path, model_dir: Path, server: MlflowAuthServer) -> FastAPI:
    settings = make_settings(root, model_dir, admin_key=ADMIN_KEY, mlflow_tracking_uri=server.uri,
                             mlflow_admin_username=server.admin_username,
                             mlflow_admin_password=server.admin_password)
    return create_app(settings, launcher=RecordingLauncher())


def new_tenant(client: TestClient | httpx.Client, name: str) -> dict[str, Any]:
    """The admin API's answer for a new tenant: ``tenant``, ``key`` and its ``mlflow`` login."""
    response = client.post("/v1/admin/tenants", json={"name": name}, headers=auth(ADMIN_KEY))
    assert response.status_code == 201, response.text
    return response.json()


def processed_file(ctx: ServiceContext, tenant_id: str, name: str, records: list[Any] = SAMPLES) -> str:
    """A stored, already validated upload (validation is tested elsewhere; here it would only add time)."""
    file_id = repo.new_id("file")
    stored = ctx.storage.put(ctx.storage.file_key(tenant_id, file_id, name), io.BytesIO(jsonl(records)))
    with ctx.sessions() as s, s.begin():
        repo.add_file(s, file_id=file_id, tenant_id=tenant_id, filename=name, purpose="fine-tune", size=stored.size,
                      sha256=stored.sha256, storage_key=stored.key, status="processed")
    return file_id


def launched_spec(ctx: ServiceContext, job_id: str, timeout: float = 120.0) -> FineTuneJobSpec:
    """Scheduler ticks until the job is launched; the spec the scheduler wrote for it."""
    deadline = time.monotonic() + timeout
    while True:
        ctx.scheduler.tick()
        with ctx.sessions() as s:
            job = repo.job_by_id(s, job_id=job_id)
            assert job is not None and job.status not in ("failed", "cancelled"), job.error if job else job_id
            if job.status == "running":
                return FineTuneJobSpec.model_validate(RunDir(job.output_uri).read_json("spec.json"))
        assert time.monotonic() < deadline, f"job {job_id} was not launched; status {job.status}"
        time.sleep(0.1)


def losses() -> list[tuple[int, float]]:
    """A falling loss curve (what a learning job reports)."""
    return [(step, 2.5 * math.exp(-step / 5) + 0.2) for step in range(1, STEPS + 1)]


def track_job(ctx: ServiceContext, job_id: str, server: MlflowAuthServer) -> tuple[FineTuneJobSpec, str]:
    """Launch ``job_id`` and log its run as the job's rank 0 does (as the platform's MLflow login, like jobs);
    (spec, MLflow run id)."""
    from workflows.tracking import MlflowTracker

    spec = launched_spec(ctx, job_id)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_USERNAME", server.admin_username)
        env.setenv("MLFLOW_TRACKING_PASSWORD", server.admin_password)
        tracker = MlflowTracker(spec, system_metrics=False)
        tracker.on_start({"params": {"hp.learning_rate": spec.hyperparameters.learning_rate, "lora.r": spec.lora.r,
                                     "base_model": spec.base_model},
                          "config": spec.model_dump(mode="json"), "data_reports": {}})
        for step, loss in losses():
            tracker.log_metrics({"train/loss": loss}, step)
        tracker.log_metrics({"eval/loss": losses()[-1][1] + 0.1}, STEPS)
        tracker.finish(JobState.SUCCEEDED, None, losses())
    assert tracker.run_id is not None
    return spec, tracker.run_id
