"""Secrets stay where they are needed.

Training workers read tenant data; they get from their driver only the variables they need, by name
(``workflows.finetune.WORKER_ENV``), and every other platform setting or secret the driver has is blanked (a Ray
worker would inherit it from its node). A Ray job's runtime env is shown by the Ray dashboard and by
``JobSubmissionClient.get_job_info``: the service puts no secret there (checked on the real Ray head the service
tests use), and refuses a ``job_env`` that would.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from qwenvl_core.secret_names import looks_secret
from service.launcher import RayJobsLauncher, submission_env
from service.main import job_environment
from service.settings import Settings

# What an API node's environment holds (KubeRay pods load the platform Secret; `qwenvl up` starts Ray with them).
SERVICE_SECRETS = {
    "QWENVL_ADMIN_KEY": "sk-admin-0123456789abcdef0123456789",
    "QWENVL_DATABASE_URL": "postgresql+psycopg2://qwenvl:db-pass-9f8e7d@postgres:5432/qwenvl",
    "QWENVL_MLFLOW_ADMIN_PASSWORD": "mlflow-admin-pass-5a4b3c",
    "QWENVL_STORAGE_URI": "s3://qwenvl/platform",
    "RAY_AUTH_TOKEN": "ray-token-77aa66bb55cc",
    "MLFLOW_AUTH_ADMIN_PASSWORD": "mlflow-auth-pass-1d2e3f",
    "HF_TOKEN": "hf_token_abcdef123456",
    "WANDB_API_KEY": "wandb-key-0f1e2d3c",
}
# What a worker needs: storage access for the run directory, the jobs' MLflow login, caches, scratch, test fault.
WORKER_NEEDS = {
    "AWS_ACCESS_KEY_ID": "AKIA-run-dir-reader", "AWS_SECRET_ACCESS_KEY": "aws-secret-for-runs-4c5d",
    "AWS_SESSION_TOKEN": "aws-session-6e7f", "AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "us-east-1",
    "MLFLOW_TRACKING_URI": "http://mlflow:5000", "MLFLOW_TRACKING_USERNAME": "admin",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-jobs-pass-8g9h", "HF_HOME": "/cache/hf", "TORCH_EXTENSIONS_DIR": "/cache/ext",
    "QWENVL_WORK_DIR": "/scratch", "QWENVL_FAULT": '{"step": 3, "rank": 1, "marker": "/tmp/m"}',
}
HARMLESS = {"PATH": "/usr/bin", "HOME": "/home/ray", "LANG": "C.UTF-8"}
SECRET_VALUES = {name: value for name, value in {**SERVICE_SECRETS, **WORKER_NEEDS}.items() if looks_secret(name)}


def _node_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's environment as an API node's (Ray's token excepted: the Ray head fixture's authenticates us)."""
    for name, value in {**SERVICE_SECRETS, **WORKER_NEEDS}.items():
        if name != "RAY_AUTH_TOKEN":
            monkeypatch.setenv(name, value)


def test_workers_get_only_the_allowlisted_variables() -> None:
    from workflows.finetune import WORKER_ENV, worker_environment

    env = worker_environment({**SERVICE_SECRETS, **WORKER_NEEDS, **HARMLESS})
    passed = {name: value for name, value in env.items() if value}
    assert passed == WORKER_NEEDS
    assert set(passed) <= WORKER_ENV
    for name in ("QWENVL_ADMIN_KEY", "QWENVL_DATABASE_URL", "QWENVL_MLFLOW_ADMIN_PASSWORD", "QWENVL_STORAGE_URI",
                 "MLFLOW_AUTH_ADMIN_PASSWORD", "HF_TOKEN", "WANDB_API_KEY"):
        assert env[name] == "", f"{name} must be blanked: a worker would inherit it from its node"
    assert "RAY_AUTH_TOKEN" not in env  # Ray's own: every Ray process needs it to join the cluster
    assert not set(HARMLESS) & set(env)
    values = "\n".join(env.values())
    for name, secret in SERVICE_SECRETS.items():
        assert secret not in values, name


def test_the_trainer_of_a_job_carries_that_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real ``build_trainer``: its workers' runtime env holds the allowlisted values and no service secret."""
    from service.jobspec import build_spec
    from workflows.finetune import build_trainer

    _node_environment(monkeypatch)
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # local run directory: no S3 filesystem object
    spec = build_spec(job_id="ftjob-secrets", tenant_id="t1", base_model_path=str(tmp_path / "model"),
                      train_uri=str(tmp_path / "train.jsonl"), validation_uri=None, output_uri=str(tmp_path / "run"),
                      seed=1, hyperparameters={}, ext={})
    env = build_trainer(spec).run_config.worker_runtime_env["env_vars"]
    assert env["AWS_SECRET_ACCESS_KEY"] == WORKER_NEEDS["AWS_SECRET_ACCESS_KEY"]
    assert env["MLFLOW_TRACKING_PASSWORD"] == WORKER_NEEDS["MLFLOW_TRACKING_PASSWORD"]
    assert env["QWENVL_WORK_DIR"] == "/scratch"
    values = "\n".join(env.values())
    for name, secret in SERVICE_SECRETS.items():
        assert secret not in values, name
    assert env["QWENVL_ADMIN_KEY"] == ""


def _settings(tmp_path: Path, **overrides: object) -> Settings:
    return Settings(data_dir=tmp_path, scheduler_enabled=False, mlflow_tracking_uri="http://mlflow:5000",
                    mlflow_admin_username="admin", mlflow_admin_password=SERVICE_SECRETS["QWENVL_MLFLOW_ADMIN_PASSWORD"],
                    **overrides)


def test_the_ray_job_runtime_env_holds_no_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(tmp_path, job_env={"FAKE_STEP_S": "0.1", "AWS_ENDPOINT_URL": "http://minio:9000"})
    _node_environment(monkeypatch)  # the API process's own environment holds every secret
    launcher = RayJobsLauncher("http://127.0.0.1:1", settings.job_entrypoint, 0.1, job_environment(settings), "/app")
    assert launcher.env == {"PYTHONPATH": "/app", "FAKE_STEP_S": "0.1", "AWS_ENDPOINT_URL": "http://minio:9000"}


def test_a_secret_in_the_job_env_is_refused_at_start_and_never_submitted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValidationError, match="QWENVL_JOB_ENV: AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_PASSWORD"):
        _settings(tmp_path, job_env={"AWS_SECRET_ACCESS_KEY": "x", "MLFLOW_TRACKING_PASSWORD": "y", "OK": "1"})
    with caplog.at_level(logging.WARNING, logger="service.launcher"):
        env = submission_env({"RAY_AUTH_TOKEN": "t0ken-value", "FAKE_MODE": "crash_once"}, "/app")
    assert env == {"PYTHONPATH": "/app", "FAKE_MODE": "crash_once"}
    assert "RAY_AUTH_TOKEN" in caplog.text and "t0ken-value" not in caplog.text


def test_a_submitted_job_shows_no_secret_on_the_ray_head(ray_dashboard: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end on the real Ray head: submit through the launcher, read the job back with ``get_job_info``."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    settings = _settings(tmp_path, job_env={"FAKE_STEP_S": "0.1"})
    _node_environment(monkeypatch)
    entrypoint = "{python} -c 'import sys; print(sys.argv[-1])' {spec}"
    launcher = RayJobsLauncher(ray_dashboard, entrypoint, 0.1, job_environment(settings))
    submission_id = f"secrets-{time.time_ns()}"
    launcher.submit(submission_id, str(tmp_path / "spec.json"))
    client = JobSubmissionClient(ray_dashboard)
    deadline = time.monotonic() + 120
    while (status := client.get_job_status(submission_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(submission_id)
    info = client.get_job_info(submission_id)
    env_vars = info.runtime_env["env_vars"]
    assert set(env_vars) == {"PYTHONPATH", "FAKE_STEP_S"}
    shown = str(info) + str(client.list_jobs())
    for name, secret in SECRET_VALUES.items():
        assert secret not in shown, name
