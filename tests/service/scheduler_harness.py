"""What the scheduler safety tests share: a launcher that records submissions, the real app on SQLite or the
PostgreSQL fixture, processed files without a validator run, and a way to hold a transaction open at a chosen
statement so two real sessions interleave deterministically.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event, text

from service import repository as repo
from service.context import ServiceContext
from service.main import create_app
from service.models import Job
from service.scheduler import Scheduler
from tests.service.helpers import SAMPLES, auth, jsonl, make_settings

ADMIN_KEY = "admin-key-for-scheduler-tests-0123456789"


class RecordingLauncher:
    """A ``service.launcher.Launcher`` that records submissions instead of running them. A submitted job reports
    RUNNING until the test sets another status; an id never submitted answers None, Ray's "does not exist".
    ``gates[submission_id]``: that submission waits for the event (a slow cluster); ``entered`` is set when a
    submission begins; ``status_delay_s`` makes every status call that slow."""

    def __init__(self) -> None:
        self.submitted: list[str] = []
        self.stopped: list[str] = []
        self.statuses: dict[str, str] = {}
        self.gates: dict[str, threading.Event] = {}
        self.entered = threading.Event()
        self.status_delay_s = 0.0
        self._lock = threading.Lock()

    def submit(self, submission_id: str, spec_uri: str) -> None:
        self.entered.set()
        gate = self.gates.get(submission_id)
        if gate is not None:
            assert gate.wait(60), f"the test never opened the gate of {submission_id}"
        assert Path(spec_uri).is_file(), spec_uri  # the spec is written before the submission
        with self._lock:
            self.submitted.append(submission_id)
            self.statuses[submission_id] = "RUNNING"

    def status(self, submission_id: str) -> str | None:
        time.sleep(self.status_delay_s)
        with self._lock:
            return self.statuses.get(submission_id)

    def stop(self, submission_id: str) -> None:
        with self._lock:
            self.stopped.append(submission_id)
            if submission_id in self.statuses:
                self.statuses[submission_id] = "STOPPED"

    def live_submissions(self) -> set[str]:
        with self._lock:
            return {sid for sid, status in self.statuses.items() if status in ("PENDING", "RUNNING")}


def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """For a fixture parametrized with "sqlite" / "postgresql": a fresh database's URL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    return str(request.getfixturevalue("postgres_database"))


@dataclass
class Stack:
    """One API replica (its own engine and scheduler) on a shared database and storage."""

    client: TestClient
    launcher: RecordingLauncher

    @property
    def ctx(self) -> ServiceContext:
        return self.client.app.state.ctx  # type: ignore[attr-defined,no-any-return]

    @property
    def scheduler(self) -> Scheduler:
        return self.ctx.scheduler

    @property
    def engine(self) -> Engine:
        return self.ctx.engine

    def tenant(self, name: str) -> tuple[str, str]:
        """(tenant id, API key) of a new tenant, made through the admin API."""
        resp = self.client.post("/v1/admin/tenants", json={"name": name}, headers=auth(ADMIN_KEY))
        assert resp.status_code == 201, resp.text
        return resp.json()["tenant"]["id"], resp.json()["key"]["key"]

    def processed_file(self, tenant_id: str, name: str = "train.jsonl") -> str:
        """A stored, already validated upload (the validator is tested elsewhere; here it would only add time)."""
        file_id = repo.new_id("file")
        stored = self.ctx.storage.put(self.ctx.storage.file_key(tenant_id, file_id, name), io.BytesIO(jsonl(SAMPLES)))
        with self.ctx.sessions() as s, s.begin():
            repo.add_file(s, file_id=file_id, tenant_id=tenant_id, filename=name, purpose="fine-tune",
                          size=stored.size, sha256=stored.sha256, storage_key=stored.key, status="processed")
        return file_id

    def create_job(self, key: str, training_file: str, **body: Any) -> str:
        resp = self.client.post("/v1/fine_tuning/jobs", json={"model": "qwen-vl-tiny", "training_file": training_file,
                                                              **body}, headers=auth(key))
        assert resp.status_code == 200, resp.text
        return str(resp.json()["id"])

    def queue_without_launching(self) -> None:
        """One tick of a scheduler without a cluster: validated jobs become queued, nothing is launched."""
        launcher, self.scheduler.launcher = self.scheduler.launcher, None
        try:
            assert self.scheduler.tick()
        finally:
            self.scheduler.launcher = launcher

    def job(self, job_id: str) -> Job:
        with self.ctx.sessions() as s:
            job = repo.job_by_id(s, job_id=job_id)
            assert job is not None
            return job

    def messages(self, job_id: str) -> list[str]:
        with self.ctx.sessions() as s:
            return [e.message for e in repo.list_events(s, job_id=job_id, limit=1000, after=None)[0]]


@contextmanager
def stack(db_url: str, root: Path, model_dir: Path, name: str = "a", launcher: RecordingLauncher | None = None,
          **overrides: Any) -> Iterator[Stack]:
    """A replica named ``name`` on the database ``db_url`` and the storage under ``root`` (shared by replicas)."""
    settings = make_settings(root / f"replica-{name}", model_dir, database_url=db_url, admin_key=ADMIN_KEY,
                             storage_uri=str(root / "objects"), **overrides)
    launcher = launcher or RecordingLauncher()
    with TestClient(create_app(settings, launcher=launcher)) as client:
        yield Stack(client, launcher)


def queued_job(st: Stack, tenant_name: str = "acme") -> tuple[str, str]:
    """(job id, tenant key) of a new tenant's job, queued and not yet launched."""
    tenant_id, key = st.tenant(tenant_name)
    job_id = st.create_job(key, st.processed_file(tenant_id))
    st.queue_without_launching()
    assert st.job(job_id).status == "queued"
    return job_id, key


class HoldAfter:
    """Holds the transaction of the first statement matching ``match(statement, params)`` open right after it ran
    (its locks kept) until ``release()``: a deterministic interleaving point for two real sessions. ``reached`` is
    set once it holds."""

    def __init__(self, engine: Engine, match: Callable[[str, Any], bool]) -> None:
        self.engine, self.match = engine, match
        self.reached, self._release, self._done = threading.Event(), threading.Event(), False
        event.listen(engine, "after_cursor_execute", self._after)

    def _after(self, _conn: Any, _cursor: Any, statement: str, params: Any, _ctx: Any, _many: bool) -> None:
        if self._done or not self.match(statement, params):
            return
        self._done = True
        self.reached.set()
        assert self._release.wait(60), "HoldAfter was never released"

    def release(self) -> None:
        self._release.set()  # the listener stays registered but inert (removing it mid-dispatch is unsafe)


def job_update_to(status: str) -> Callable[[str, Any], bool]:
    """Matches the compare-and-set UPDATE that moves a job to ``status``."""
    def match(statement: str, params: Any) -> bool:
        values = params.values() if isinstance(params, dict) else params or ()
        return statement.lstrip().upper().startswith("UPDATE JOBS SET STATUS") and status in values
    return match


def wait_until_blocked(engine: Engine, started: threading.Event, timeout: float = 30.0) -> None:
    """Return once another session waits for a lock this test holds. PostgreSQL shows it in pg_stat_activity;
    SQLite has no such view, so there: once the other side began its write (``started``), give it a moment (the
    outcome the tests assert is the same whether it already waits or comes after the holder commits)."""
    assert started.wait(timeout), "the other session never started its write"
    if engine.dialect.name != "postgresql":
        time.sleep(0.3)
        return
    deadline = time.monotonic() + timeout
    with engine.connect() as conn:
        while conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")).scalar() == 0:
            assert time.monotonic() < deadline, "no session ever waited for the lock"
            time.sleep(0.05)


def before_write(engine: Engine, thread: threading.Thread | None = None) -> threading.Event:
    """Set when a session (in ``thread`` if given) is about to run an UPDATE or INSERT."""
    seen = threading.Event()

    def _before(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith(("UPDATE", "INSERT")) and (
                thread is None or threading.current_thread() is thread):
            seen.set()

    event.listen(engine, "before_cursor_execute", _before)
    return seen
