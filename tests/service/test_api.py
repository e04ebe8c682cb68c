"""Every endpoint through FastAPI's TestClient on SQLite and local storage: behaviour, errors, tenancy, quotas.

The scheduler thread is off here; tests call ``scheduler.tick()`` to advance jobs deterministically. Jobs run
on real Ray in ``test_scheduler_ray.py``.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.main import create_app
from service.settings import Settings
from tests.service.helpers import SAMPLES, auth, jsonl, make_settings, new_tenant, upload, wait_file

MAX_UPLOAD = 256 * 1024


@dataclass
class Api:
    client: TestClient
    admin: str
    key_a: str
    key_b: str
    tenant_a: str
    tenant_b: str
    file_a: str  # a processed training file of tenant A

    def tick(self) -> None:
        self.client.app.state.ctx.scheduler.tick()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Api]:
    data_dir = tmp_path_factory.mktemp("api")
    settings = make_settings(data_dir, tiny_model_dir, admin_key="admin-key-for-tests-0123456789",
                             max_upload_bytes=MAX_UPLOAD, default_max_active_jobs=3, estimate_tokens_per_second=100.0)
    with TestClient(create_app(settings)) as client:
        admin = "admin-key-for-tests-0123456789"
        tenant_a, key_a = new_tenant(client, admin, "alpha")
        tenant_b, key_b = new_tenant(client, admin, "beta")
        file_a = upload(client, key_a)["id"]
        assert wait_file(client, key_a, file_a)["status"] == "processed"
        yield Api(client, admin, key_a, key_b, tenant_a, tenant_b, file_a)


def _job(api: Api, key: str | None = None, **body: object) -> dict:
    resp = api.client.post("/v1/fine_tuning/jobs", json={"model": "qwen-vl-tiny", "training_file": api.file_a, **body},
                           headers=auth(key or api.key_a))
    assert resp.status_code == 200, resp.text
    return resp.json()


def _error(resp: object, status: int) -> dict:
    assert resp.status_code == status, resp.text  # type: ignore[attr-defined]
    err = resp.json()["error"]  # type: ignore[attr-defined]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


# ----- files --------------------------------------------------------------------------------------------------
def test_upload_records_size_checksum_and_a_valid_report(api: Api) -> None:
    import hashlib

    doc = api.client.get(f"/v1/files/{api.file_a}", headers=auth(api.key_a)).json()
    body = jsonl(SAMPLES)
    assert doc["object"] == "file" and doc["purpose"] == "fine-tune" and doc["status"] == "processed"
    assert doc["bytes"] == len(body) and doc["sha256"] == hashlib.sha256(body).hexdigest()
    assert doc["validation"]["ok"] and doc["validation"]["valid_samples"] == 4
    content = api.client.get(f"/v1/files/{api.file_a}/content", headers=auth(api.key_a))
    assert content.status_code == 200 and content.content == body


def test_invalid_file_report_names_the_line_and_fails_its_job(api: Api) -> None:
    bad = upload(api.client, api.key_a, jsonl([SAMPLES[0], '{"messages": 5}', "{not json"]), "bad.jsonl")
    doc = wait_file(api.client, api.key_a, bad["id"])
    assert doc["status"] == "error"
    lines = {e["line"] for e in doc["validation"]["errors"]}
    assert {2, 3} <= lines, doc["validation"]["errors"]
    err = _error(api.client.post("/v1/fine_tuning/jobs", json={"model": "qwen-vl-tiny", "training_file": bad["id"]},
                                 headers=auth(api.key_a)), 400)
    assert err["param"] == "training_file" and "validation" in err["message"]


def test_job_created_before_validation_ends_fails_with_the_file_error(api: Api) -> None:
    bad = upload(api.client, api.key_a, jsonl(['{"messages": []}']), "late.jsonl")
    job = _job(api, training_file=bad["id"])
    assert job["status"] == "validating_files"
    wait_file(api.client, api.key_a, bad["id"])
    api.tick()
    job = api.client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=auth(api.key_a)).json()
    assert job["status"] == "failed" and job["error"]["param"] == "training_file"
    assert "late.jsonl:1" in job["error"]["message"]


def test_list_and_delete_files(api: Api) -> None:
    extra = upload(api.client, api.key_a, name="extra.jsonl")
    listed = api.client.get("/v1/files", headers=auth(api.key_a)).json()
    assert listed["object"] == "list" and listed["data"][0]["id"] == extra["id"]
    assert api.file_a in {f["id"] for f in listed["data"]}
    page = api.client.get("/v1/files", params={"limit": 1}, headers=auth(api.key_a)).json()
    assert len(page["data"]) == 1 and page["has_more"]
    wait_file(api.client, api.key_a, extra["id"])
    gone = api.client.delete(f"/v1/files/{extra['id']}", headers=auth(api.key_a)).json()
    assert gone == {"id": extra["id"], "object": "file", "deleted": True}
    _error(api.client.get(f"/v1/files/{extra['id']}", headers=auth(api.key_a)), 404)


def test_upload_rejections(api: Api) -> None:
    c, h = api.client, auth(api.key_a)
    err = _error(c.post("/v1/files", files={"file": ("t.jsonl", b"{}")}, data={"purpose": "batch"}, headers=h), 400)
    assert err["param"] == "purpose"
    err = _error(c.post("/v1/files", files={"file": ("t.csv", b"a,b")}, data={"purpose": "fine-tune"}, headers=h), 400)
    assert err["param"] == "file" and ".jsonl" in err["message"]
    err = _error(c.post("/v1/files", files={"file": ("t.jsonl", b"{}")}, headers=h), 400)
    assert err["param"] == "purpose"
    big = b"x" * (MAX_UPLOAD + 100_000)
    err = _error(c.post("/v1/files", files={"file": ("big.jsonl", big)}, data={"purpose": "fine-tune"}, headers=h), 413)
    assert "limit" in err["message"]


def test_chunked_oversized_body_is_cut_off(api: Api) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b"y" * 65536

    resp = api.client.post("/v1/fine_tuning/jobs", content=chunks(),
                           headers={**auth(api.key_a), "Content-Type": "application/json"})
    assert _error(resp, 413)["code"] == "payload_too_large"


# ----- jobs ---------------------------------------------------------------------------------------------------
def test_create_get_list_cancel_and_events(api: Api) -> None:
    job = _job(api, suffix="demo", seed=7, metadata={"team": "vision"}, lora={"r": 8, "alpha": 16},
               method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}})
    assert job["object"] == "fine_tuning.job" and job["status"] == "validating_files" and job["seed"] == 7
    # auto values show "auto" until the files are validated (docs/hyperparameters.md; tests/service/test_auto_hparams.py)
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": "auto"}
    assert job["extensions"]["lora"]["r"] == 8 and job["organization_id"] == api.tenant_a
    api.tick()
    got = api.client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=auth(api.key_a)).json()
    assert got["status"] == "queued"  # no launcher in this app: it stays queued
    assert got["hyperparameters"]["n_epochs"] == 2 and got["hyperparameters"]["batch_size"] == 1  # 4 samples
    listed = api.client.get("/v1/fine_tuning/jobs", params={"metadata[team]": "vision"},
                            headers=auth(api.key_a)).json()
    assert [j["id"] for j in listed["data"]] == [job["id"]]
    cancelled = api.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=auth(api.key_a)).json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"]
    err = _error(api.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=auth(api.key_a)), 400)
    assert "already cancelled" in err["message"]
    events = api.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=auth(api.key_a)).json()
    messages = [e["message"] for e in events["data"]]
    assert messages[0] == "Job cancelled" and messages[-1].startswith("Created fine-tuning job")
    assert all(e["object"] == "fine_tuning.job.event" and e["type"] == "message" for e in events["data"])
    page = api.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 1, "after": events["data"][0]["id"]},
                          headers=auth(api.key_a)).json()
    assert page["data"][0]["id"] == events["data"][1]["id"]
    ckpts = api.client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", headers=auth(api.key_a)).json()
    assert ckpts == {"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}


def test_jobs_pagination(api: Api) -> None:
    ids = []
    for _ in range(2):
        job = _job(api)
        ids.append(job["id"])
        api.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=auth(api.key_a))
    first = api.client.get("/v1/fine_tuning/jobs", params={"limit": 1}, headers=auth(api.key_a)).json()
    assert first["data"][0]["id"] == ids[1] and first["has_more"]
    second = api.client.get("/v1/fine_tuning/jobs", params={"limit": 1, "after": ids[1]}, headers=auth(api.key_a)).json()
    assert second["data"][0]["id"] == ids[0]


def test_concurrent_job_quota_answers_429(api: Api) -> None:
    jobs = []
    while True:
        resp = api.client.post("/v1/fine_tuning/jobs", json={"model": "qwen-vl-tiny", "training_file": api.file_a},
                               headers=auth(api.key_a))
        if resp.status_code != 200:
            break
        jobs.append(resp.json()["id"])
        assert len(jobs) <= 3
    err = _error(resp, 429)
    assert err["code"] == "concurrent_jobs_quota_exceeded" and "3 unfinished jobs" in err["message"]
    for job_id in jobs:
        api.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth(api.key_a))
    _job(api)  # cancelling freed the quota
    api.client.post("/v1/fine_tuning/jobs", json={}, headers=auth(api.key_a))


def test_estimate_counts_tokens_with_the_base_tokenizer(api: Api) -> None:
    resp = api.client.post("/v1/fine_tuning/estimate", json={"model": "qwen-vl-tiny", "training_file": api.file_a,
                                                             "n_epochs": 3}, headers=auth(api.key_a))
    assert resp.status_code == 200, resp.text
    est = resp.json()
    assert est["samples"] == 4 and est["total_tokens"] > 0
    assert est["estimated_train_tokens"] == 3 * est["total_tokens"]
    assert est["estimated_seconds"] == pytest.approx(est["estimated_train_tokens"] / 100.0)


@pytest.mark.parametrize(("body", "param", "fragment"), [
    ({"model": "no-such-model"}, "model", "does not exist"),
    ({"training_file": "file-missing"}, "training_file", "file-missing"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}},
     "method.supervised.hyperparameters.n_epochs", "between 1 and 50"),
    ({"method": {"type": "reinforcement"}}, "method.type", "supervised"),
    ({"seed": "abc"}, "seed", "integer"),
    ({"suffix": "x" * 65}, "suffix", "64"),
    ({"lora": {"r": 0}}, "lora.r", "an integer from 1 to 1024 or 'auto', got 0"),
    ({"quantization": "4bit", "compute": {"strategy": "zero3"}}, None, "zero3"),
    ({"micro_batch_size": 3, "method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 8}}}},
     "hyperparameters", "must be a multiple of micro_batch_size (3)"),
    ({"micro_batch_size": 0}, "micro_batch_size", "an integer from 1 to 1024 or 'auto', got 0"),
    ({"unknown_field": 1}, "unknown_field", "Extra inputs"),
    ({"metadata": {str(i): "v" for i in range(17)}}, "metadata", "16"),
])
def test_bad_job_requests_are_4xx_with_a_message(api: Api, body: dict, param: str | None, fragment: str) -> None:
    resp = api.client.post("/v1/fine_tuning/jobs", json={"model": "qwen-vl-tiny", "training_file": api.file_a, **body},
                           headers=auth(api.key_a))
    assert resp.status_code in (400, 404), resp.text
    err = resp.json()["error"]
    assert fragment in err["message"], err
    if param:
        assert err["param"] == param


def test_malformed_json_and_wrong_content(api: Api) -> None:
    h = {**auth(api.key_a), "Content-Type": "application/json"}
    err = _error(api.client.post("/v1/fine_tuning/jobs", content=b"{not json", headers=h), 400)
    assert "JSON" in err["message"]
    _error(api.client.post("/v1/fine_tuning/jobs", content=b"[1, 2]", headers=h), 400)
    _error(api.client.get("/v1/fine_tuning/jobs", params={"limit": "many"}, headers=auth(api.key_a)), 400)
    _error(api.client.get("/v1/no/such/route", headers=auth(api.key_a)), 404)


# ----- models -------------------------------------------------------------------------------------------------
def test_models(api: Api) -> None:
    listed = api.client.get("/v1/models", headers=auth(api.key_a)).json()
    assert {"id": "qwen-vl-tiny", "object": "model", "owned_by": "system"}.items() <= listed["data"][0].items()
    assert api.client.get("/v1/models/qwen-vl-tiny", headers=auth(api.key_a)).json()["kind"] == "base"
    assert _error(api.client.delete("/v1/models/qwen-vl-tiny", headers=auth(api.key_a)), 403)["param"] == "model"
    assert _error(api.client.get("/v1/models/ft:qwen-vl-tiny:alpha::ftjob-x", headers=auth(api.key_a)), 404)[
        "code"] == "model_not_found"


# ----- auth, tenancy ------------------------------------------------------------------------------------------
def test_auth_failures(api: Api) -> None:
    c = api.client
    assert _error(c.get("/v1/files"), 401)["code"] == "missing_api_key"
    assert _error(c.get("/v1/files", headers=auth("sk-qv-000000000000_nope")), 401)["code"] == "invalid_api_key"
    assert _error(c.get("/v1/files", headers=auth(api.admin)), 401)["code"] == "invalid_api_key"
    assert _error(c.get("/v1/admin/tenants", headers=auth(api.key_a)), 401)["code"] == "invalid_admin_key"


def test_key_rotation_and_revocation(api: Api) -> None:
    tenant, first = new_tenant(api.client, api.admin, "gamma")
    rotated = api.client.post(f"/v1/admin/tenants/{tenant}/keys", json={"name": "ci", "revoke_existing": True},
                              headers=auth(api.admin))
    assert rotated.status_code == 201
    second = rotated.json()
    err = _error(api.client.get("/v1/files", headers=auth(first)), 401)
    assert err["code"] == "revoked_api_key" and "revoked" in err["message"]
    assert api.client.get("/v1/files", headers=auth(second["key"])).status_code == 200
    revoked = api.client.delete(f"/v1/admin/keys/{second['id']}", headers=auth(api.admin)).json()
    assert revoked["revoked_at"] is not None
    assert _error(api.client.get("/v1/files", headers=auth(second["key"])), 401)["code"] == "revoked_api_key"
    keys = api.client.get(f"/v1/admin/tenants/{tenant}/keys", headers=auth(api.admin)).json()
    assert len(keys) == 2 and all("key" not in k and k["revoked_at"] for k in keys)
    assert _error(api.client.post("/v1/admin/tenants", json={"name": "gamma"}, headers=auth(api.admin)), 409)
    assert _error(api.client.post("/v1/admin/tenants", json={"name": "Bad Name"}, headers=auth(api.admin)), 400)[
        "param"] == "name"
    _error(api.client.delete("/v1/admin/keys/key-nope", headers=auth(api.admin)), 404)


def test_storage_quota_answers_403(api: Api) -> None:
    _, key = new_tenant(api.client, api.admin, "tiny-quota", max_stored_bytes=300)
    upload(api.client, key, jsonl(SAMPLES[:1]), "one.jsonl")
    err = _error(api.client.post("/v1/files", files={"file": ("two.jsonl", jsonl(SAMPLES))},
                                 data={"purpose": "fine-tune"}, headers=auth(key)), 403)
    assert err["code"] == "storage_quota_exceeded" and "300" in err["message"]


def test_cross_tenant_matrix_every_endpoint_answers_404(api: Api) -> None:
    job = _job(api)
    b = auth(api.key_b)
    requests = [
        ("GET", f"/v1/files/{api.file_a}", None), ("GET", f"/v1/files/{api.file_a}/content", None),
        ("DELETE", f"/v1/files/{api.file_a}", None), ("GET", f"/v1/files?after={api.file_a}", None),
        ("GET", f"/v1/fine_tuning/jobs/{job['id']}", None), ("POST", f"/v1/fine_tuning/jobs/{job['id']}/cancel", None),
        ("GET", f"/v1/fine_tuning/jobs/{job['id']}/events", None),
        ("GET", f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", None),
        ("GET", f"/v1/fine_tuning/jobs?after={job['id']}", None),
        ("POST", "/v1/fine_tuning/jobs", {"model": "qwen-vl-tiny", "training_file": api.file_a}),
        ("POST", "/v1/fine_tuning/jobs", {"model": "qwen-vl-tiny", "training_file": api.file_a,
                                          "validation_file": api.file_a + "x"}),
        ("POST", "/v1/fine_tuning/estimate", {"model": "qwen-vl-tiny", "training_file": api.file_a}),
    ]
    for method, path, body in requests:
        resp = api.client.request(method, path, json=body, headers=b)
        assert resp.status_code == 404, (method, path, resp.text)
        assert resp.json()["error"]["type"] == "invalid_request_error"
    assert api.client.get(f"/v1/files/{api.file_a}", headers=auth(api.key_a)).status_code == 200  # untouched
    api.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=auth(api.key_a))
    assert api.client.get("/v1/fine_tuning/jobs", headers=b).json()["data"] == []
    assert api.client.get("/v1/files", headers=b).json()["data"] == []


def test_health_and_openapi(api: Api) -> None:
    assert api.client.get("/health").json()["status"] == "ok"
    assert api.client.get("/ready").json()["database"] == "ok"
    assert "/v1/fine_tuning/jobs" in api.client.get("/openapi.json").json()["paths"]
    assert api.client.get("/docs").status_code == 200


# ----- settings and local bootstrap ---------------------------------------------------------------------------
def test_local_bootstrap_writes_private_keys_once(tmp_path: Path, tiny_model_dir: Path) -> None:
    settings = make_settings(tmp_path / "local", tiny_model_dir)
    with TestClient(create_app(settings)) as client:
        admin = (tmp_path / "local" / "admin_key").read_text().strip()
        key = (tmp_path / "local" / "api_key").read_text().strip()
        for name in ("admin_key", "api_key"):
            assert stat.S_IMODE(os.stat(tmp_path / "local" / name).st_mode) == 0o600
        assert client.get("/v1/files", headers=auth(key)).status_code == 200
        tenants = client.get("/v1/admin/tenants", headers=auth(admin)).json()["data"]
        assert [t["name"] for t in tenants] == ["default"]
    with TestClient(create_app(settings)) as client:  # second start: same keys, no second tenant
        assert (tmp_path / "local" / "admin_key").read_text().strip() == admin
        assert len(client.get("/v1/admin/tenants", headers=auth(admin)).json()["data"]) == 1


@pytest.mark.parametrize("key", [None, "changethis", "short-key"])
def test_production_refuses_missing_or_placeholder_admin_key(tmp_path: Path, key: str | None) -> None:
    with pytest.raises(ValidationError, match="QWENVL_ADMIN_KEY"):
        Settings(mode="production", data_dir=tmp_path, admin_key=key)


def test_app_does_not_import_torch(tmp_path: Path) -> None:
    import subprocess

    code = ("import sys; from service.main import create_app; from service.settings import Settings; "
            f"create_app(Settings(data_dir={str(tmp_path)!r}, scheduler_enabled=False)); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_jobs_log_to_the_platform_mlflow_with_its_login(tmp_path, tiny_model_dir):
    from service.jobspec import build_spec
    from service.main import job_environment

    settings = make_settings(tmp_path, tiny_model_dir, mlflow_tracking_uri="http://mlflow:5000",
                             mlflow_admin_username="admin", mlflow_admin_password="s3cret-pass",
                             job_env={"AWS_ENDPOINT_URL": "http://minio:9000"})
    env = job_environment(settings)  # the login comes from the Ray nodes' environment, never the job's runtime env
    assert env == {"AWS_ENDPOINT_URL": "http://minio:9000"}
    spec = build_spec(job_id="ftjob-x", tenant_id="t1", base_model_path=str(tiny_model_dir), train_uri="t.jsonl",
                      validation_uri=None, output_uri=str(tmp_path / "run"), seed=1, hyperparameters={}, ext={},
                      tracking_uri=settings.mlflow_tracking_uri)
    assert spec.tracking.tracking_uri == "http://mlflow:5000"
    assert job_environment(make_settings(tmp_path, tiny_model_dir)) == {}


def test_a_created_job_is_committed_before_its_response_is_sent(api: Api) -> None:
    """A client that got the 200 must be able to read the job at once (the scheduler's restart test saw a 404 right
    after a 200: the session used to commit after the response had been sent)."""
    from service import repository as repo

    app = api.client.app
    seen: dict[str, bool] = {}

    async def checking_app(scope: dict, receive: object, send: object) -> None:
        async def checked_send(message: dict) -> None:
            if message["type"] == "http.response.start" and scope["path"] == "/v1/fine_tuning/jobs":
                with app.state.ctx.sessions() as session:  # another connection: sees only committed rows
                    seen["committed"] = repo.count_active_jobs(session, tenant_id=api.tenant_b) > before
            await send(message)  # type: ignore[operator]

        await app(scope, receive, checked_send)  # type: ignore[operator]

    file_b = upload(api.client, api.key_b)["id"]
    assert wait_file(api.client, api.key_b, file_b)["status"] == "processed"
    with app.state.ctx.sessions() as session:
        before = repo.count_active_jobs(session, tenant_id=api.tenant_b)
    client = TestClient(checking_app)
    resp = client.post("/v1/fine_tuning/jobs", json={"model": "qwen-vl-tiny", "training_file": file_b},
                       headers=auth(api.key_b))
    assert resp.status_code == 200, resp.text
    assert seen == {"committed": True}
    api.client.post(f"/v1/fine_tuning/jobs/{resp.json()['id']}/cancel", headers=auth(api.key_b))
