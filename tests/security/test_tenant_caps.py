"""Operator caps on what a tenant's job may ask for (global settings, per-tenant overrides through the admin API).

The real app through FastAPI's TestClient on SQLite; the scheduler thread is off (jobs stay where they are).
Every value over its cap must answer 400 ``limit_exceeded`` naming the field, the cap and its value, and create
nothing; a per-tenant override changes that tenant only; the admin tenant API validates what it is given.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.main import create_app
from service.models import Job
from tests.service.helpers import auth, make_settings, new_tenant, upload

ADMIN = "admin-key-for-caps-tests-0123456789"


@dataclass
class Api:
    client: TestClient
    tenant_a: str
    key_a: str
    file_a: str
    tenant_b: str
    key_b: str
    file_b: str

    def post_job(self, key: str, file_id: str, **body: Any) -> Any:
        return self.client.post("/v1/fine_tuning/jobs", json={"model": "qwen-vl-tiny", "training_file": file_id,
                                                               **body}, headers=auth(key))

    def job_ids(self, key: str) -> list[str]:
        return [j["id"] for j in self.client.get("/v1/fine_tuning/jobs", params={"limit": 100},
                                                 headers=auth(key)).json()["data"]]

    def cancel(self, key: str, job_id: str) -> None:
        assert self.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth(key)).status_code == 200

    def patch(self, tenant_id: str, body: Any, key: str = ADMIN) -> Any:
        return self.client.patch(f"/v1/admin/tenants/{tenant_id}", json=body, headers=auth(key))

    def tenant(self, tenant_id: str) -> dict[str, Any]:
        resp = self.client.get(f"/v1/admin/tenants/{tenant_id}", headers=auth(ADMIN))
        assert resp.status_code == 200, resp.text
        return resp.json()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    # Jobs are only submitted here (never trained), so the base model directory need not exist; files may still
    # be validating (such a job waits in validating_files).
    root = tmp_path_factory.mktemp("caps")
    settings = make_settings(root / "data", root / "no-model", admin_key=ADMIN, default_max_active_jobs=100)
    with TestClient(create_app(settings)) as client:
        tenant_a, key_a = new_tenant(client, ADMIN, "caps-a")
        tenant_b, key_b = new_tenant(client, ADMIN, "caps-b")
        file_a, file_b = upload(client, key_a)["id"], upload(client, key_b)["id"]
        yield Api(client, tenant_a, key_a, file_a, tenant_b, key_b, file_b)


def _error(resp: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


OVER_THE_DEFAULT_CAPS = [  # (request fields, param, the cap and its value as the message names them)
    ({"compute": {"num_workers": 9}}, "compute.num_workers", "job_max_workers = 8"),
    ({"compute": {"num_workers": 1024}}, "compute.num_workers", "job_max_workers = 8"),
    ({"compute": {"gpus_per_worker": 16}}, "compute.gpus_per_worker", "job_max_gpus_per_worker = 8.0"),
    ({"compute": {"cpus_per_worker": 64}}, "compute.cpus_per_worker", "job_max_cpus_per_worker = 32.0"),
    ({"compute": {"image_feature_cache_mb": 1 << 20}}, "compute.image_feature_cache_mb",
     "job_max_feature_cache_mb = 8192"),
    ({"max_steps": 10**9}, "max_steps", "job_max_steps = 100000"),
    ({"micro_batch_size": 128, "method": {"type": "supervised", "supervised": {"hyperparameters": {
        "batch_size": 128}}}}, "micro_batch_size", "job_max_micro_batch_size = 64"),
    ({"lora": {"r": 512}}, "lora.r", "job_max_lora_rank = 256"),
    ({"checkpoint": {"keep": None}}, "checkpoint.keep", "job_max_checkpoints_kept is 10"),
    ({"checkpoint": {"keep": 11}}, "checkpoint.keep", "job_max_checkpoints_kept = 10"),
    ({"max_wall_clock_s": 86_401}, "max_wall_clock_s", "job_max_wall_clock_s = 86400"),
]


@pytest.mark.parametrize(("body", "param", "cap"), OVER_THE_DEFAULT_CAPS, ids=[c[1] + "-" + str(i) for i, c in
                                                                                enumerate(OVER_THE_DEFAULT_CAPS)])
def test_each_cap_answers_400_naming_the_field_and_creates_nothing(api: Api, body: dict, param: str,
                                                                   cap: str) -> None:
    before = api.job_ids(api.key_a)
    err = _error(api.post_job(api.key_a, api.file_a, **body), 400, "limit_exceeded")
    assert err["param"] == param and cap in err["message"] and param in err["message"], err
    assert api.job_ids(api.key_a) == before


def test_several_values_over_their_caps_are_all_named(api: Api) -> None:
    err = _error(api.post_job(api.key_a, api.file_a, compute={"num_workers": 64, "gpus_per_worker": 16},
                              max_steps=10**8), 400, "limit_exceeded")
    assert err["param"] == "compute.num_workers"
    assert "compute.gpus_per_worker" in err["message"] and "max_steps" in err["message"]


def test_values_at_the_caps_are_accepted_and_the_wall_clock_limit_is_stored(api: Api) -> None:
    resp = api.post_job(api.key_a, api.file_a, compute={"num_workers": 8, "gpus_per_worker": 8, "cpus_per_worker": 32,
                                                        "image_feature_cache_mb": 8192},
                        max_steps=100_000, lora={"r": 256}, checkpoint={"keep": 10})
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["max_wall_clock_s"] == 86_400  # the cap is also the default
    shorter = api.post_job(api.key_a, api.file_a, max_wall_clock_s=600).json()
    assert shorter["max_wall_clock_s"] == 600
    with api.client.app.state.ctx.sessions() as s:  # type: ignore[attr-defined]
        rows = s.scalars(select(Job).where(Job.id.in_([job["id"], shorter["id"]])))
        stored = {j.id: j.max_wall_clock_s for j in rows}
    assert stored == {job["id"]: 86_400, shorter["id"]: 600}
    warnings = {j: [e["message"] for e in api.client.get(f"/v1/fine_tuning/jobs/{j}/events", headers=auth(api.key_a)
                                                          ).json()["data"] if e["level"] == "warning"]
                for j in (job["id"], shorter["id"])}  # r 256 trains, but the servers hold rank 64 (the default)
    assert warnings == {job["id"]: [warnings[job["id"]][0]], shorter["id"]: []}
    assert "lora.r 256 is above the model servers' max_lora_rank 64" in warnings[job["id"]][0]
    for job_id in (job["id"], shorter["id"]):
        api.cancel(api.key_a, job_id)


def test_a_per_tenant_override_lowers_or_lifts_a_cap_for_that_tenant_only(api: Api) -> None:
    low = api.patch(api.tenant_a, {"limits": {"job_max_workers": 2, "job_max_epochs": 3,
                                              "job_max_wall_clock_s": 3600}})
    assert low.status_code == 200, low.text
    assert low.json()["limits"] == {"job_max_workers": 2, "job_max_epochs": 3, "job_max_wall_clock_s": 3600}
    assert low.json()["caps"]["job_max_workers"] == 2 and low.json()["caps"]["job_max_steps"] == 100_000
    try:
        err = _error(api.post_job(api.key_a, api.file_a, compute={"num_workers": 3}), 400, "limit_exceeded")
        assert err["param"] == "compute.num_workers" and "this tenant's cap job_max_workers = 2" in err["message"]
        err = _error(api.post_job(api.key_a, api.file_a, method={"type": "supervised", "supervised": {
            "hyperparameters": {"n_epochs": 4}}}), 400, "limit_exceeded")
        assert err["param"] == "method.supervised.hyperparameters.n_epochs" and "job_max_epochs = 3" in err["message"]
        err = _error(api.post_job(api.key_a, api.file_a, hyperparameters={"n_epochs": 4}), 400, "limit_exceeded")
        assert err["param"] == "hyperparameters.n_epochs"
        err = _error(api.post_job(api.key_a, api.file_a, hyperparameters={"n_epochs": 4},  # where it was given
                                  method={"type": "supervised"}), 400, "limit_exceeded")
        assert err["param"] == "hyperparameters.n_epochs"
        assert api.post_job(api.key_a, api.file_a).json()["max_wall_clock_s"] == 3600  # the tenant's default
        other = api.post_job(api.key_b, api.file_b, compute={"num_workers": 3})  # tenant B keeps the global cap
        assert other.status_code == 200, other.text
        assert other.json()["max_wall_clock_s"] == 86_400

        high = api.patch(api.tenant_a, {"limits": {"job_max_workers": 16}})  # upward, above the global cap
        assert high.json()["limits"]["job_max_workers"] == 16 and high.json()["limits"]["job_max_epochs"] == 3
        assert api.post_job(api.key_a, api.file_a, compute={"num_workers": 12}).status_code == 200
        err = _error(api.post_job(api.key_b, api.file_b, compute={"num_workers": 12}), 400, "limit_exceeded")
        assert "the cap job_max_workers = 8" in err["message"]
        assert api.tenant(api.tenant_b)["limits"] == {}
    finally:
        reset = api.patch(api.tenant_a, {"limits": {"job_max_workers": None, "job_max_epochs": None,
                                                    "job_max_wall_clock_s": None}})
        for key in (api.key_a, api.key_b):
            for job_id in api.job_ids(key):
                api.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth(key))
    assert reset.json()["limits"] == {} and reset.json()["caps"]["job_max_workers"] == 8  # null drops an override
    _error(api.post_job(api.key_a, api.file_a, compute={"num_workers": 12}), 400, "limit_exceeded")


def test_patch_changes_the_quotas_and_get_shows_them(api: Api) -> None:
    tenant_id, key = new_tenant(api.client, ADMIN, "caps-quota", max_active_jobs=1)
    doc = api.tenant(tenant_id)
    assert doc["max_active_jobs"] == 1 and doc["used_bytes"] == 0 and doc["limits"] == {}
    assert doc["caps"]["job_max_checkpoints_kept"] == 10
    changed = api.patch(tenant_id, {"max_active_jobs": 5, "max_stored_bytes": 123_456}).json()
    assert changed["max_active_jobs"] == 5 and changed["max_stored_bytes"] == 123_456
    assert api.tenant(tenant_id)["max_stored_bytes"] == 123_456
    listed = api.client.get("/v1/admin/tenants", headers=auth(ADMIN)).json()["data"]
    assert {t["id"]: t["max_active_jobs"] for t in listed}[tenant_id] == 5
    with_limits = api.patch(tenant_id, {"limits": {"job_max_steps": 10, "job_max_lora_rank": 8}}).json()
    assert with_limits["limits"] == {"job_max_steps": 10, "job_max_lora_rank": 8}
    cleared = api.patch(tenant_id, {"limits": None}).json()  # null drops every override
    assert cleared["limits"] == {} and cleared["caps"]["job_max_steps"] == 100_000
    assert cleared["max_active_jobs"] == 5  # untouched


def test_create_tenant_accepts_limits(api: Api) -> None:
    resp = api.client.post("/v1/admin/tenants", json={"name": "caps-created", "limits": {"job_max_steps": 50}},
                           headers=auth(ADMIN))
    assert resp.status_code == 201, resp.text
    assert resp.json()["tenant"]["limits"] == {"job_max_steps": 50}
    assert resp.json()["tenant"]["caps"]["job_max_steps"] == 50



def test_admission_limits_set_through_the_admin_api_apply_to_that_tenant_only(api: Api) -> None:
    """The request-rate limits (service.limits) are per-tenant overridable like the job caps."""
    resp = api.client.post("/v1/admin/tenants", json={
        "name": "caps-slow-lane", "limits": {"tenant_requests_per_second": 0.01, "tenant_request_burst": 2}},
        headers=auth(ADMIN))
    assert resp.status_code == 201, resp.text
    assert resp.json()["tenant"]["caps"]["tenant_request_burst"] == 2
    slow_key = resp.json()["key"]["key"]
    codes = [api.client.get("/v1/fine_tuning/jobs", headers=auth(slow_key)).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    assert all(api.client.get("/v1/fine_tuning/jobs", headers=auth(api.key_b)).status_code == 200 for _ in range(5))

@pytest.mark.parametrize(("body", "param", "fragment"), [
    ({"limits": {"job_max_wrokers": 2}}, "limits", "job_max_wrokers"),
    ({"limits": {"job_max_workers": 0}}, "limits.job_max_workers", "greater than or equal to 1"),
    ({"limits": {"job_max_workers": 5000}}, "limits.job_max_workers", "less than or equal to 1024"),
    ({"limits": {"job_max_workers": "many"}}, "limits.job_max_workers", "integer"),
    ({"limits": {"job_max_gpus_per_worker": -1}}, "limits.job_max_gpus_per_worker", "greater than or equal to 0"),
    ({"limits": {"job_max_wall_clock_s": 2.5}}, "limits.job_max_wall_clock_s", "integer"),
    ({"limits": [1, 2]}, "limits", "dictionary"),
    ({"max_stored_bytes": -1}, "max_stored_bytes", "greater than or equal to 0"),
    ({"max_active_jobs": "x"}, "max_active_jobs", "integer"),
    ({"name": "renamed"}, "name", "Extra inputs"),
    ({}, "body", "nothing to update"),
])
def test_bad_patch_bodies_answer_400_naming_the_field(api: Api, body: dict, param: str, fragment: str) -> None:
    before = api.tenant(api.tenant_b)
    err = _error(api.patch(api.tenant_b, body), 400)
    assert err["param"] == param and fragment in err["message"], err
    assert api.tenant(api.tenant_b) == before


def test_bad_limits_on_create_answer_400(api: Api) -> None:
    err = _error(api.client.post("/v1/admin/tenants", json={"name": "caps-bad", "limits": {"cpus": 4}},
                                 headers=auth(ADMIN)), 400)
    assert err["param"] == "limits" and "'cpus'" in err["message"] and "job_max_workers" in err["message"]
    _error(api.patch("tenant-does-not-exist", {"max_active_jobs": 1}), 404)


def test_a_tenant_key_cannot_use_the_admin_tenant_api(api: Api) -> None:
    before = api.tenant(api.tenant_a)
    calls = [("PATCH", f"/v1/admin/tenants/{api.tenant_a}", {"limits": {"job_max_workers": 1024}}),
             ("GET", f"/v1/admin/tenants/{api.tenant_a}", None),
             ("POST", f"/v1/admin/tenants/{api.tenant_a}/usage/reconcile", None),
             ("POST", "/v1/admin/tenants", {"name": "caps-sneaky"})]
    for method, path, body in calls:
        for headers in (auth(api.key_a), {}):
            resp = api.client.request(method, path, json=body, headers=headers)
            assert resp.status_code == 401, (method, path, resp.text)
    assert api.tenant(api.tenant_a) == before
