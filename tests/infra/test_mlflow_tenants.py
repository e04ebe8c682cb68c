"""Tenant-scoped MLflow tracking UI against a real ``mlflow server --app-name basic-auth`` (no mocks).

Two tenants are created through the real API; a run is logged into each tenant's experiment as the MLflow admin
(as the training workflow does); then each tenant logs in with the MLflow credentials the API returned once and
must see its own run and nothing of the other tenant.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from service.main import create_app
from service.settings import Settings
from tests.fixtures.mlflow_server import MLFLOW_ADMIN
from tests.fixtures.net import free_port

ADMIN_KEY = "admin-key-for-infra-tests-0123456789"
DENIED = "PERMISSION_DENIED|403"


def _client_as(monkeypatch: pytest.MonkeyPatch, uri: str, username: str, password: str) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", username)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    return MlflowClient(uri)


def _create_tenant(client: TestClient, name: str) -> dict:
    response = client.post("/v1/admin/tenants", json={"name": name},
                           headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 201, response.text
    return response.json()


def _log_run(client: MlflowClient, experiment_id: str, job_id: str) -> str:
    run = client.create_run(experiment_id, run_name=job_id, tags={"qwenvl.job_id": job_id})
    client.log_metric(run.info.run_id, "train_loss", 1.0, step=1)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _production(tmp_path: Path, **mlflow: object) -> Settings:
    return Settings(data_dir=tmp_path / "data", mode="production", admin_key=ADMIN_KEY, scheduler_enabled=False,
                    **mlflow)


def test_each_tenant_sees_only_its_own_runs(mlflow_auth_server, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from service.mlflow_tenants import tenant_experiment_name

    uri, admin_password = mlflow_auth_server.uri, mlflow_auth_server.admin_password
    settings = _production(tmp_path, mlflow_tracking_uri=uri, mlflow_admin_username=MLFLOW_ADMIN,
                           mlflow_admin_password=admin_password)
    with TestClient(create_app(settings)) as api:
        created = {name: _create_tenant(api, name) for name in ("team-a", "team-b")}

    access = {name: doc["mlflow"] for name, doc in created.items()}
    for name, doc in created.items():
        tenant_id = doc["tenant"]["id"]
        assert access[name]["username"] == tenant_id
        assert access[name]["experiment_name"] == tenant_experiment_name(tenant_id) == f"{tenant_id}/default"
        assert len(access[name]["password"]) >= 24
    assert access["team-a"]["experiment_id"] != access["team-b"]["experiment_id"]

    admin = _client_as(monkeypatch, uri, MLFLOW_ADMIN, admin_password)
    runs = {name: _log_run(admin, a["experiment_id"], f"ftjob-{name}") for name, a in access.items()}

    for me, other in (("team-a", "team-b"), ("team-b", "team-a")):
        mine = _client_as(monkeypatch, uri, access[me]["username"], access[me]["password"])
        assert [r.info.run_id for r in mine.search_runs([access[me]["experiment_id"]])] == [runs[me]]
        try:
            leaked = mine.search_runs([access[other]["experiment_id"]])
        except MlflowException as exc:
            assert "PERMISSION_DENIED" in str(exc) or "403" in str(exc), exc
        else:
            assert leaked == []
        with pytest.raises(MlflowException, match=DENIED):
            mine.get_run(runs[other])
        visible = {e.experiment_id for e in mine.search_experiments()}
        assert access[me]["experiment_id"] in visible
        assert access[other]["experiment_id"] not in visible
        with pytest.raises(MlflowException, match=DENIED):  # read-only: a tenant cannot log into MLflow
            mine.create_run(access[me]["experiment_id"])

    wrong = httpx.get(f"{uri}/api/2.0/mlflow/experiments/get",
                      params={"experiment_id": access["team-a"]["experiment_id"]},
                      auth=(access["team-a"]["username"], "not-the-password"))
    assert wrong.status_code == 401


def test_without_mlflow_settings_nothing_is_provisioned(tmp_path: Path) -> None:
    with TestClient(create_app(_production(tmp_path))) as api:
        assert _create_tenant(api, "team-c")["mlflow"] is None


def test_mlflow_unreachable_rolls_the_tenant_back(tmp_path: Path) -> None:
    settings = _production(tmp_path, mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}",
                           mlflow_admin_username=MLFLOW_ADMIN, mlflow_admin_password="x" * 24, mlflow_timeout_s=2)
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with TestClient(create_app(settings)) as api:
        response = api.post("/v1/admin/tenants", json={"name": "team-d"}, headers=headers)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "mlflow_unavailable"
        assert api.get("/v1/admin/tenants", headers=headers).json()["data"] == []


def test_mlflow_uri_without_admin_credentials_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="QWENVL_MLFLOW_ADMIN_USERNAME"):
        Settings(data_dir=tmp_path, mlflow_tracking_uri="http://mlflow:5000")
