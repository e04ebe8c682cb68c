"""Storage accounting: uploads and run outputs are charged to ``used_bytes``, the quota holds under concurrency.

- The race: concurrent uploads that each fit but not together, against the API under uvicorn (real threads,
  real requests) on SQLite and on PostgreSQL: exactly one is stored, the others get 403.
- Run outputs: a job launched by a real local-process launcher (``LocalProcessLauncher``: the ``Launcher``
  protocol without a Ray cluster) writes a checkpoint; once the scheduler ingests its checkpoint event the run
  directory's bytes are charged, and the tenant, now over its quota, gets 403 on uploads and jobs.
- Deleting releases; a failed upload releases its reservation; reconciliation repairs drift and sweeps orphans;
  the adapter download leaves no temporary file behind on any path; migration 0002 backfills ``used_bytes``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from alembic.config import Config
from fastapi.testclient import TestClient
from sqlalchemy import text

import service.db
from service import repository as repo
from service.db import make_engine, migrate
from service.main import create_app
from service.models import Job, Tenant
from tests.service.conftest import ApiServer, server_env
from tests.service.helpers import auth, make_settings, new_tenant, upload, wait_file, wait_for

ADMIN = "admin-key-for-quota-tests-0123456789"
ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = Path(__file__).with_name("checkpointing_workflow.py")
CKPT_BYTES = 170_000


class LocalProcessLauncher:
    """Runs each submission as a local process (``python checkpointing_workflow.py --spec URI``)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def submit(self, submission_id: str, spec_uri: str) -> None:
        self.procs[submission_id] = subprocess.Popen([sys.executable, str(WORKFLOW), "--spec", spec_uri],
                                                     env={**os.environ, "PYTHONPATH": str(ROOT), **self.env})

    def status(self, submission_id: str) -> str | None:
        proc = self.procs.get(submission_id)
        if proc is None:
            return None
        if proc.poll() is None:
            return "RUNNING"
        return "SUCCEEDED" if proc.returncode == 0 else "FAILED"

    def stop(self, submission_id: str) -> None:
        proc = self.procs.get(submission_id)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def live_submissions(self) -> set[str]:
        return {submission_id for submission_id, proc in self.procs.items() if proc.poll() is None}

    def close(self) -> None:
        for submission_id in list(self.procs):
            self.stop(submission_id)


@dataclass
class Api:
    client: TestClient
    objects: Path  # the storage root

    def tick(self) -> None:
        self.client.app.state.ctx.scheduler.tick()  # type: ignore[attr-defined]

    def sessions(self) -> Any:
        return self.client.app.state.ctx.sessions()  # type: ignore[attr-defined]

    def used(self, tenant_id: str) -> int:
        resp = self.client.get(f"/v1/admin/tenants/{tenant_id}", headers=auth(ADMIN))
        assert resp.status_code == 200, resp.text
        return int(resp.json()["used_bytes"])

    def post_file(self, key: str, content: bytes, name: str = "data.jsonl") -> Any:
        return self.client.post("/v1/files", files={"file": (name, content)}, data={"purpose": "fine-tune"},
                                headers=auth(key))

    def post_job(self, key: str, file_id: str) -> Any:
        return self.client.post("/v1/fine_tuning/jobs", json={"model": "qwen-vl-tiny", "training_file": file_id},
                                headers=auth(key))

    def job(self, key: str, job_id: str) -> dict[str, Any]:
        return self.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth(key)).json()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    root = tmp_path_factory.mktemp("quota")
    launcher = LocalProcessLauncher({"CKPT_BYTES": str(CKPT_BYTES)})
    settings = make_settings(root / "data", root / "no-model", admin_key=ADMIN, default_max_active_jobs=5)
    app = create_app(settings, launcher=launcher)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:  # a 500 is an answer, as from a server
            yield Api(client, Path(settings.resolved_storage_uri))
    finally:
        launcher.close()


def _error(resp: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    if code is not None:
        assert err["code"] == code, err
    return err


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))


# ----- run outputs ----------------------------------------------------------------------------------------------
def test_run_outputs_are_charged_and_a_tenant_over_its_quota_gets_403(api: Api) -> None:
    quota = 200_000
    tenant, key = new_tenant(api.client, ADMIN, "runs-quota", max_stored_bytes=quota)
    train = upload(api.client, key)
    extra = upload(api.client, key, b"x" * 40_000, "extra.jsonl")
    assert api.used(tenant) == train["bytes"] + extra["bytes"]
    wait_file(api.client, key, train["id"])
    job = api.post_job(key, train["id"]).json()
    run_dir = api.objects / "tenants" / tenant / "runs" / job["id"]

    # the workflow wrote its checkpoint and its checkpoint event, and waits: the ingested event charged the run
    uploads = train["bytes"] + extra["bytes"]
    wait_for(lambda: {"used": api.used(tenant)}, lambda d: d["used"] > uploads, timeout=60, step=api.tick)
    charged = api.used(tenant)
    assert api.job(key, job["id"])["status"] == "running"
    assert charged == uploads + _tree_bytes(run_dir) and charged > quota
    with api.sessions() as s:
        assert s.query(Job).filter(Job.id == job["id"]).one().stored_bytes == _tree_bytes(run_dir) > CKPT_BYTES

    err = _error(api.post_file(key, b"{}\n", "tiny.jsonl"), 403, "storage_quota_exceeded")
    assert f"{charged} of {quota} bytes used" in err["message"]
    err = _error(api.post_job(key, train["id"]), 403, "storage_quota_exceeded")
    assert f"{charged} of {quota}" in err["message"]
    assert api.used(tenant) == charged  # refusals charge nothing

    assert api.client.delete(f"/v1/files/{extra['id']}", headers=auth(key)).status_code == 200
    assert api.used(tenant) == charged - extra["bytes"] < quota
    small = upload(api.client, key, b"y" * 1000, "small.jsonl")  # room again
    assert api.used(tenant) == charged - extra["bytes"] + small["bytes"]

    (run_dir / "RELEASE").write_text("go")  # the job finishes: adapter and result.json are charged too
    done = wait_for(lambda: api.job(key, job["id"]), lambda d: d["status"] not in ("running", "queued"),
                    timeout=60, step=api.tick)
    assert done["status"] == "succeeded", done
    assert api.used(tenant) == train["bytes"] + small["bytes"] + _tree_bytes(run_dir)  # result file counted once

    report = api.client.post(f"/v1/admin/tenants/{tenant}/usage/reconcile", headers=auth(ADMIN)).json()
    assert report["used_bytes"] == report["used_bytes_before"] == api.used(tenant)
    assert report["run_bytes"] == _tree_bytes(run_dir) and report["orphans_removed"] == []

    # deleting the model hides it but keeps its run (and the job's record): the bytes stay charged
    before = api.used(tenant)
    assert api.client.delete(f"/v1/models/{done['fine_tuned_model']}", headers=auth(key)).status_code == 200
    assert api.used(tenant) == before and (run_dir / "adapter").is_dir()


# ----- uploads and deletes -------------------------------------------------------------------------------------
def test_delete_releases_the_bytes_and_removes_the_object_once(api: Api) -> None:
    tenant, key = new_tenant(api.client, ADMIN, "delete-quota", max_stored_bytes=10_000)
    kept = upload(api.client, key, b"k" * 3000, "kept.jsonl")
    gone = upload(api.client, key, b"g" * 5000, "gone.jsonl")
    assert api.used(tenant) == 8000
    codes: list[int] = []
    barrier = threading.Barrier(2)

    def delete() -> None:
        barrier.wait()
        codes.append(api.client.delete(f"/v1/files/{gone['id']}", headers=auth(key)).status_code)

    threads = [threading.Thread(target=delete) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [200, 404] and api.used(tenant) == kept["bytes"]  # released exactly once
    assert not list((api.objects / "tenants" / tenant / "files").glob(f"{gone['id']}/*"))
    assert api.client.get(f"/v1/files/{kept['id']}/content", headers=auth(key)).content == b"k" * 3000
    assert api.post_file(key, b"z" * 7000).status_code == 200  # the released bytes are usable again


def test_a_failed_upload_gives_its_reservation_back(api: Api) -> None:
    tenant, key = new_tenant(api.client, ADMIN, "failing-store", max_stored_bytes=10_000)
    blocker = api.objects / "tenants" / tenant / "files"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the uploads directory should be: the object write fails")
    _error(api.post_file(key, b"a" * 6000), 500)
    assert api.used(tenant) == 0
    blocker.unlink()
    assert api.post_file(key, b"b" * 6000).status_code == 200 and api.used(tenant) == 6000
    assert api.client.get("/v1/files", headers=auth(key)).json()["data"][0]["bytes"] == 6000


def test_reconcile_repairs_drift_and_sweeps_only_old_orphans(api: Api) -> None:
    tenant, key = new_tenant(api.client, ADMIN, "reconcile-quota", max_stored_bytes=100_000)
    kept = upload(api.client, key, b"k" * 2000, "kept.jsonl")
    files = api.objects / "tenants" / tenant / "files"
    old = files / "file-crashed-long-ago" / "old.jsonl"  # an object whose row never came (crash) or went
    young = files / "file-in-flight" / "young.jsonl"  # an upload about to insert its row
    for path, size in ((old, 700), (young, 300)):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"o" * size)
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    with api.sessions() as s, s.begin():
        s.execute(text("UPDATE tenants SET used_bytes = 999999 WHERE id = :t"), {"t": tenant})  # drift

    resp = api.client.post(f"/v1/admin/tenants/{tenant}/usage/reconcile", headers=auth(ADMIN))
    assert resp.status_code == 200, resp.text
    report = resp.json()
    assert report["used_bytes_before"] == 999_999 and report["used_bytes"] == kept["bytes"] + 300
    assert report["uploaded_bytes"] == kept["bytes"] and report["run_bytes"] == 0
    assert report["orphans_removed"] == [f"tenants/{tenant}/files/file-crashed-long-ago/old.jsonl"]
    assert not old.exists() and young.exists() and api.used(tenant) == kept["bytes"] + 300
    assert api.client.get(f"/v1/files/{kept['id']}/content", headers=auth(key)).status_code == 200
    _error(api.client.post("/v1/admin/tenants/tenant-nope/usage/reconcile", headers=auth(ADMIN)), 404)


# ----- adapter download ----------------------------------------------------------------------------------------
def test_adapter_download_leaves_no_temporary_file(api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                   ) -> None:
    tenant, key = new_tenant(api.client, ADMIN, "download-tmp")
    adapter = api.objects / "tenants" / tenant / "runs" / "ftjob-dl" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\2" * 10_000)
    with api.sessions() as s, s.begin():
        repo.add_model(s, model_id="ft:qwen-vl-tiny:download-tmp::ftjob-dl", tenant_id=tenant, base_model="qwen-vl-tiny",
                       job_id="ftjob-dl", adapter_uri=str(adapter))
        repo.add_model(s, model_id="ft:qwen-vl-tiny:download-tmp::ftjob-moved", tenant_id=tenant,
                       base_model="qwen-vl-tiny", job_id="ftjob-moved", adapter_uri="/elsewhere/not/in/the/store")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the API process puts temporary files

    resp = api.client.get("/v1/models/ft:qwen-vl-tiny:download-tmp::ftjob-dl/content", headers=auth(key))
    assert resp.status_code == 200 and resp.headers["content-length"] == str(len(resp.content))
    with tarfile.open(fileobj=BytesIO(resp.content), mode="r:gz") as tar:
        assert sorted(tar.getnames()) == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors"]
    assert list(scratch.iterdir()) == []

    failed = api.client.get("/v1/models/ft:qwen-vl-tiny:download-tmp::ftjob-moved/content", headers=auth(key))
    assert failed.status_code == 500
    assert list(scratch.iterdir()) == []  # the archive being written is removed on the error path too


# ----- the race, under uvicorn ---------------------------------------------------------------------------------
@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_concurrent_uploads_cannot_both_take_the_last_bytes(database: str, request: pytest.FixtureRequest,
                                                            tmp_path: Path) -> None:
    extra = {"QWENVL_ADMIN_KEY": ADMIN, "QWENVL_SCHEDULER_ENABLED": "false"}
    if database == "postgresql":
        extra["QWENVL_DATABASE_URL"] = request.getfixturevalue("postgres_database")
    server = ApiServer(server_env(tmp_path / "data", tmp_path / "no-model", None, **extra), tmp_path / "api.log")
    size, racers = 2_000_000, 4  # large enough that the bodies arrive together
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as admin:
            for round_ in range(3):
                tenant, key = new_tenant(admin, ADMIN, f"race-{round_}", max_stored_bytes=size * 3 // 2)
                codes = _race(server.url, key, size, racers)
                assert sorted(codes) == [200] + [403] * (racers - 1), (round_, codes, server.log_tail())
                doc = admin.get(f"/v1/admin/tenants/{tenant}", headers=auth(ADMIN)).json()
                assert doc["used_bytes"] == size
                listed = admin.get("/v1/files", headers=auth(key)).json()["data"]
                assert [f["bytes"] for f in listed] == [size]
    finally:
        server.stop()


def _race(url: str, key: str, size: int, racers: int) -> list[int]:
    barrier, codes = threading.Barrier(racers), []
    body = b"r" * size

    def one(i: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            barrier.wait()
            resp = client.post("/v1/files", files={"file": (f"race-{i}.jsonl", body)}, data={"purpose": "fine-tune"},
                               headers=auth(key))
            if resp.status_code == 403:
                assert resp.json()["error"]["code"] == "storage_quota_exceeded"
            codes.append(resp.status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(racers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return codes


# ----- migration -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_migration_0002_starts_used_bytes_at_the_uploaded_bytes(database: str, request: pytest.FixtureRequest,
                                                                tmp_path: Path) -> None:
    url = (f"sqlite:///{tmp_path / 'db.sqlite'}" if database == "sqlite"
           else request.getfixturevalue("postgres_database"))
    engine = make_engine(url)
    config = Config()
    config.set_main_option("script_location", str(Path(service.db.__file__).parent / "migrations"))

    def alembic(step: Any, revision: str) -> None:
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            step(config, revision)

    alembic(command.upgrade, "0001")
    with engine.begin() as conn:
        for tid in ("t-a", "t-b"):
            conn.execute(text("INSERT INTO tenants (id, name, created_at, max_active_jobs, max_stored_bytes) "
                              "VALUES (:id, :id, 1, 1, 1000)"), {"id": tid})
        for i, (purpose, size) in enumerate([("fine-tune", 100), ("fine-tune", 50), ("fine-tune-results", 70)]):
            conn.execute(text("INSERT INTO files (id, tenant_id, filename, purpose, bytes, sha256, storage_key, status, "
                              "created_at) VALUES (:id, 't-a', 'f', :p, :b, '', 'k', 'processed', 1)"),
                         {"id": f"file-{i}", "p": purpose, "b": size})
    migrate(engine)
    with engine.connect() as conn:
        used = dict(conn.execute(text("SELECT id, used_bytes FROM tenants")).all())
        limits = conn.execute(text("SELECT limits FROM tenants")).scalars().all()
    assert used == {"t-a": 150, "t-b": 0} and limits == [None, None]  # results are charged with their run
    with service.db.session_factory(engine)() as s, s.begin():
        assert repo.reserve_bytes(s, tenant_id="t-a", size=850) and not repo.reserve_bytes(s, tenant_id="t-a", size=1)
        assert s.get(Tenant, "t-a").used_bytes == 1000
    alembic(command.downgrade, "0001")  # plain DROP COLUMN: no table copy cascading to the tenants' rows
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM files")).scalar() == 3
    migrate(engine)
    engine.dispose()


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_migration_0006_keeps_stored_event_ids_and_gives_new_events_random_ones(
        database: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Events stored before 0006 keep the ids clients hold (``ftevent-{pk}``, ``ftckpt-{pk}``: their ``ref`` is the
    pk); events after it get random ones, which say nothing of how many events other tenants' jobs wrote."""
    url = (f"sqlite:///{tmp_path / 'db.sqlite'}" if database == "sqlite"
           else request.getfixturevalue("postgres_database"))
    engine = make_engine(url)
    config = Config()
    config.set_main_option("script_location", str(Path(service.db.__file__).parent / "migrations"))
    migrate(engine)
    sessions = service.db.session_factory(engine)
    event = {"created_at": 1, "level": "info", "type": "checkpoint", "message": "checkpoint", "data": {"step": 2}}
    with sessions() as s, s.begin():
        tenant = repo.create_tenant(s, name="events-co", max_active_jobs=2, max_stored_bytes=1000).id
        repo.add_job(s, id="ftjob-e", tenant_id=tenant, model="m", training_file="file-x", validation_file=None,
                     suffix=None, seed=1, meta={}, request={}, output_uri="/tmp/x")
        repo.add_events(s, job_id="ftjob-e", events=[dict(event, seq=0), dict(event, seq=1)])
    with engine.begin() as conn:  # back to before 0006 (the column goes), and up again: the stored rows' ids
        config.attributes["connection"] = conn
        command.downgrade(config, "0005")
    migrate(engine)
    with sessions() as s, s.begin():
        repo.add_events(s, job_id="ftjob-e", events=[dict(event, seq=2)])
    with sessions() as s:
        rows, _ = repo.list_events(s, job_id="ftjob-e", limit=10, after=None)
        old, new = rows[1:], rows[0]
        assert [r.ref for r in old] == [str(r.pk) for r in old]
        assert len(new.ref) == 24 and new.ref != str(new.pk)
        assert [r.seq for r in repo.list_events(s, job_id="ftjob-e", limit=10, after=f"ftevent-{old[0].pk}")[0]] == [0]
        assert repo.checkpoint_event(s, ref=str(old[1].pk)).seq == 0
        assert repo.checkpoint_event(s, ref=new.ref).seq == 2
    engine.dispose()
