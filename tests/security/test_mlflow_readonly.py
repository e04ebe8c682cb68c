"""Tenant MLflow logins are read-only, against a real ``mlflow server --app-name basic-auth`` configured as the
platform configures it (``service.mlflow_tenants.basic_auth_ini``).

MLflow's basic-auth app alone lets any authenticated user create experiments and registered models (its create
checks look only for an explicit DENY grant), so a tenant could store unlimited artifacts outside every quota.
Tenants are created through the real API; each then logs in with the MLflow password the API returned once.
"""

from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from service.settings import Settings

ADMIN_KEY = "admin-key-for-security-tests-0123456789"
API = "/api/2.0/mlflow"


@pytest.fixture(scope="module")
def world(mlflow_auth_server, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two tenants with their MLflow logins, and one run logged by the platform (the admin) into each one's
    experiment."""
    server = mlflow_auth_server
    settings = Settings(data_dir=tmp_path_factory.mktemp("api"), mode="production", admin_key=ADMIN_KEY,
                        scheduler_enabled=False, mlflow_tracking_uri=server.uri,
                        mlflow_admin_username=server.admin_username, mlflow_admin_password=server.admin_password)
    with TestClient(create_app(settings)) as api:
        access = {}
        for name in ("ro-a", "ro-b"):
            response = api.post("/v1/admin/tenants", json={"name": name},
                                headers={"Authorization": f"Bearer {ADMIN_KEY}"})
            assert response.status_code == 201, response.text
            access[name] = response.json()["mlflow"]
    admin = httpx.Client(base_url=server.uri, auth=(server.admin_username, server.admin_password), timeout=30)
    runs = {}
    for name, login in access.items():
        created = admin.post(f"{API}/runs/create", json={"experiment_id": login["experiment_id"]})
        assert created.status_code == 200, created.text
        runs[name] = created.json()["run"]["info"]["run_id"]
        logged = admin.post(f"{API}/runs/log-metric", json={"run_id": runs[name], "key": "loss", "value": 1.0,
                                                            "timestamp": 0, "step": 1})
        assert logged.status_code == 200, logged.text
    yield {"access": access, "runs": runs, "admin": admin, "uri": server.uri}
    admin.close()


def _as(world: dict, name: str) -> httpx.Client:
    login = world["access"][name]
    return httpx.Client(base_url=world["uri"], auth=(login["username"], login["password"]), timeout=30)


def test_a_tenant_cannot_create_experiments_or_registered_models(world: dict) -> None:
    with _as(world, "ro-a") as tenant:
        experiment = tenant.post(f"{API}/experiments/create", json={"name": "ro-a-own-experiment"})
        assert experiment.status_code == 403 and "read-only" in experiment.text, experiment.text
        model = tenant.post(f"{API}/registered-models/create", json={"name": "ro-a-model"})
        assert model.status_code == 403, model.text
        prompt = tenant.post(f"{API}/registered-models/create",
                             json={"name": "ro-a-prompt", "tags": [{"key": "mlflow.prompt.is_prompt", "value": "true"}]})
        assert prompt.status_code == 403, prompt.text
        dataset = tenant.post("/api/3.0/mlflow/datasets/create",
                              json={"name": "ro-a-data", "experiment_ids": [world["access"]["ro-a"]["experiment_id"]]})
        assert dataset.status_code == 403, dataset.text
        webhook = tenant.post(f"{API}/webhooks", json={"name": "w", "url": "https://example.com/hook",
                                                       "events": [{"entity": "registered_model", "action": "created"}]})
        assert webhook.status_code == 403, webhook.text
        upload = tenant.put(f"/api/2.0/mlflow-artifacts/artifacts/{world['access']['ro-a']['experiment_id']}/x.bin",
                            content=b"\0" * 1024)
        assert upload.status_code == 403, upload.text
        otel = tenant.post("/v1/traces", content=b"", headers={"Content-Type": "application/x-protobuf",
                                                               "x-mlflow-experiment-id": world["access"]["ro-a"]["experiment_id"]})
        assert otel.status_code == 403 and "read-only" in otel.text, otel.text  # a FastAPI route: same rule
    names = {e["name"] for e in world["admin"].post(f"{API}/experiments/search",
                                                     json={"max_results": 1000}).json()["experiments"]}
    assert "ro-a-own-experiment" not in names
    assert world["admin"].get(f"{API}/registered-models/get", params={"name": "ro-a-model"}).status_code == 404


def test_a_tenant_cannot_write_into_any_experiment_or_run(world: dict) -> None:
    mine, other = world["access"]["ro-a"]["experiment_id"], world["access"]["ro-b"]["experiment_id"]
    with _as(world, "ro-a") as tenant:
        for experiment_id in (other, mine):
            response = tenant.post(f"{API}/runs/create", json={"experiment_id": experiment_id})
            assert response.status_code == 403, response.text
        for run_id in (world["runs"]["ro-b"], world["runs"]["ro-a"]):
            response = tenant.post(f"{API}/runs/log-metric", json={"run_id": run_id, "key": "loss", "value": 0.0,
                                                                   "timestamp": 0, "step": 2})
            assert response.status_code == 403, response.text
        renamed = tenant.post(f"{API}/experiments/update", json={"experiment_id": mine, "new_name": "x"})
        assert renamed.status_code == 403, renamed.text
    history = world["admin"].get(f"{API}/metrics/get-history", params={"run_id": world["runs"]["ro-b"],
                                                                         "metric_key": "loss"}).json()["metrics"]
    assert [m["step"] for m in history] == [1]


def test_a_tenant_still_reads_its_own_experiment_and_nothing_else(world: dict) -> None:
    mine, other = world["access"]["ro-a"], world["access"]["ro-b"]
    with _as(world, "ro-a") as tenant:
        run = tenant.get(f"{API}/runs/get", params={"run_id": world["runs"]["ro-a"]})
        assert run.status_code == 200, run.text
        assert run.json()["run"]["data"]["metrics"][0]["key"] == "loss"
        found = tenant.post(f"{API}/runs/search", json={"experiment_ids": [mine["experiment_id"]]})
        assert found.status_code == 200 and [r["info"]["run_id"] for r in found.json()["runs"]] == \
            [world["runs"]["ro-a"]]
        visible = tenant.post(f"{API}/experiments/search", json={"max_results": 1000})
        assert visible.status_code == 200
        assert {e["experiment_id"] for e in visible.json()["experiments"]} == {mine["experiment_id"]}
        assert tenant.get(f"{API}/runs/get", params={"run_id": world["runs"]["ro-b"]}).status_code == 403
        assert tenant.get(f"{API}/experiments/get", params={"experiment_id": other["experiment_id"]}
                          ).status_code == 403


def test_the_platform_admin_still_writes(world: dict) -> None:
    """The read-only rule is for tenant logins: provisioning and training jobs (the MLflow admin) keep working."""
    created = world["admin"].post(f"{API}/experiments/create", json={"name": "platform-made-experiment"})
    assert created.status_code == 200, created.text
    model = world["admin"].post(f"{API}/registered-models/create", json={"name": "platform-made-model"})
    assert model.status_code == 200, model.text


def test_a_wrong_password_is_still_401(world: dict) -> None:
    login = world["access"]["ro-a"]
    response = httpx.post(f"{world['uri']}{API}/experiments/create", json={"name": "nope"},
                          auth=(login["username"], "not-the-password"))
    assert response.status_code == 401


def test_tenant_may_allows_only_reads() -> None:
    from service.mlflow_auth import tenant_may

    assert tenant_may("GET", "/ajax-api/2.0/mlflow/runs/get")
    assert tenant_may("POST", "/ajax-api/2.0/mlflow/runs/search")
    assert tenant_may("POST", "/mlflow/api/2.0/mlflow/experiments/search/")
    assert not tenant_may("POST", "/api/2.0/mlflow/experiments/create")
    assert not tenant_may("DELETE", "/api/2.0/mlflow/registered-models/delete")
    assert not tenant_may("PUT", "/api/2.0/mlflow-artifacts/artifacts/1/a")
    assert not tenant_may("PATCH", "/api/2.0/mlflow/registered-models/update")
    assert tenant_may("PATCH", "/api/2.0/mlflow/users/update-password")
