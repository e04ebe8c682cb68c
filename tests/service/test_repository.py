"""Repository and migrations on both databases: SQLite (WAL) and a real PostgreSQL the fixture starts."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Connection, Engine, event, inspect, text
from sqlalchemy.orm import Session, sessionmaker

from service import repository as repo
from service.db import SQLITE_POOL_SIZE, make_engine, migrate, session_factory
from service.errors import Conflict, NotFound
from service.settings import Settings


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = (f"sqlite:///{tmp_path / 'db.sqlite'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres_database"))
    engine = make_engine(url)
    migrate(engine)
    migrate(engine)  # idempotent: a second replica starting finds the schema current
    yield session_factory(engine)
    engine.dispose()


def _connects_over_bursts(engine: Engine, threads: int, hold: Callable[[Connection], None]) -> int:
    """Connections ``engine`` opens while ``threads`` requests at once, three bursts, each ``hold`` their own."""
    connects: list[object] = []
    event.listen(engine, "connect", lambda conn, _record: connects.append(conn))
    errors: list[BaseException] = []

    def request() -> None:
        try:
            with engine.connect() as conn:
                hold(conn)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    for _burst in range(3):
        workers = [threading.Thread(target=request) for _ in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
    engine.dispose()
    assert not errors, errors
    return len(connects)


def test_sqlite_keeps_a_connection_per_api_thread_instead_of_reconnecting(tmp_path: Path) -> None:
    """Requests on many API threads at once reuse pooled SQLite connections: later bursts connect nothing new.
    QueuePool's default kept 5, opened and closed one for every request above that (pragmas and all), and made the
    16th request at once wait for a connection."""
    at_once = min(SQLITE_POOL_SIZE, 24)
    barrier = threading.Barrier(at_once)

    def hold(conn: Connection) -> None:
        conn.execute(text("SELECT 1"))
        barrier.wait(timeout=10)  # every thread holds its connection at the same time

    assert _connects_over_bursts(make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}"), at_once, hold) == at_once


def test_postgres_opens_at_most_its_pool_and_reuses_it(postgres_database: str) -> None:
    """40 requests at once (the API's threads) on a pool of 30, three bursts: at most 30 connections are opened, once,
    and the other requests wait for one. The old pool (10 kept, 20 overflow) started and stopped a PostgreSQL backend
    for each request above 10 at once: 70 here, and 661-807 during the control-plane bench's 6,400 requests."""
    pool = Settings.model_fields["database_pool_size"].default
    opened = _connects_over_bursts(make_engine(postgres_database), pool + 10,
                                   lambda conn: conn.execute(text("SELECT pg_sleep(0.2)")))
    assert 10 < opened <= pool  # more than the old pool kept were in use at once, and none was opened twice


def _tenant(s: Session, name: str) -> str:
    return repo.create_tenant(s, name=name, max_active_jobs=2, max_stored_bytes=1000).id


def test_schema_is_complete_and_sqlite_uses_wal(sessions: sessionmaker[Session]) -> None:
    engine = sessions.kw["bind"]
    tables = set(inspect(engine).get_table_names())
    assert {"tenants", "api_keys", "files", "jobs", "job_events", "models", "leases", "alembic_version"} <= tables
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"


def test_tenants_keys_and_revocation(sessions: sessionmaker[Session]) -> None:
    with sessions() as s, s.begin():
        tid = _tenant(s, "acme")
        repo.add_key(s, key_id="key-000000000001", tenant_id=tid, key_hash="h" * 64)
        with pytest.raises(Conflict, match="already exists"):
            with s.begin_nested():
                _tenant(s, "acme")
    with sessions() as s, s.begin():
        assert repo.revoke_key(s, key_id="key-000000000001").revoked_at is not None
        with pytest.raises(NotFound):
            repo.revoke_key(s, key_id="key-missing")
        assert repo.key_with_tenant(s, key_id="key-000000000001")[0].revoked_at is not None


def test_files_are_tenant_scoped_paginated_and_counted(sessions: sessionmaker[Session]) -> None:
    with sessions() as s, s.begin():
        a, b = _tenant(s, "a-co"), _tenant(s, "b-co")
        ids = [repo.add_file(s, file_id=f"file-{i}", tenant_id=a, filename="x.jsonl", purpose="fine-tune", size=10 * i,
                             sha256="0", storage_key=f"k{i}").id for i in range(5)]
    with sessions() as s:
        page, more = repo.list_files(s, tenant_id=a, purpose=None, limit=2, after=None)
        assert [f.id for f in page] == [ids[4], ids[3]] and more
        page, more = repo.list_files(s, tenant_id=a, purpose=None, limit=10, after=ids[3])
        assert [f.id for f in page] == [ids[2], ids[1], ids[0]] and not more
        assert repo.stored_bytes(s, tenant_id=a) == 100 and repo.stored_bytes(s, tenant_id=b) == 0
        with pytest.raises(NotFound):
            repo.get_file(s, tenant_id=b, file_id=ids[0])
        with pytest.raises(NotFound):
            repo.list_files(s, tenant_id=b, purpose=None, limit=2, after=ids[0])


def test_jobs_events_idempotent_and_ordered(sessions: sessionmaker[Session]) -> None:
    with sessions() as s, s.begin():
        t = _tenant(s, "jobs-co")
        job = repo.add_job(s, id="ftjob-1", tenant_id=t, model="m", training_file="file-x", validation_file=None,
                           suffix=None, seed=1, meta={"team": "vision"}, request={"hyperparameters": {}},
                           output_uri="/tmp/x")
        events = [{"seq": i, "created_at": 1, "level": "info", "type": "metrics", "message": f"step {i}",
                   "data": {"step": i}} for i in range(3)]
        assert repo.add_events(s, job_id=job.id, events=events) == 3
        assert repo.add_events(s, job_id=job.id, events=events + [dict(events[0], seq=3)]) == 1
        assert repo.next_service_seq(s, job_id=job.id) == -1
    with sessions() as s:
        rows, more = repo.list_events(s, job_id="ftjob-1", limit=3, after=None)
        assert [r.seq for r in rows] == [3, 2, 1] and more
        rest, more = repo.list_events(s, job_id="ftjob-1", limit=3, after=f"ftevent-{rows[-1].ref}")
        assert [r.seq for r in rest] == [0] and not more
        refs = [r.ref for r in (*rows, *rest)]  # public ids: random, not the table's global counter
        assert len(set(refs)) == 4 and all(len(ref) == 24 and int(ref, 16) >= 0 for ref in refs)
        assert not {str(r.pk) for r in (*rows, *rest)} & set(refs)
        assert repo.count_active_jobs(s, tenant_id=t) == 1
        assert [j.id for j in repo.list_jobs(s, tenant_id=t, limit=5, after=None, metadata={"team": "vision"})[0]] == [
            "ftjob-1"]
        assert repo.list_jobs(s, tenant_id=t, limit=5, after=None, metadata={"team": "nlp"})[0] == []


def test_checkpoints_list_each_step_once_after_a_restart(sessions: sessionmaker[Session]) -> None:
    """A job that restarted from step 2 saves step 4 again: the checkpoint list shows its newest save of each step;
    the event log keeps both."""
    with sessions() as s, s.begin():
        t = _tenant(s, "restart-co")
        job = repo.add_job(s, id="ftjob-2", tenant_id=t, model="m", training_file="file-x", validation_file=None,
                           suffix=None, seed=1, meta={}, request={"hyperparameters": {}}, output_uri="/tmp/x")
        saves = [2, 4, 4, 6]  # seq order: step 4 saved, the driver died, resumed from 2, step 4 saved again
        repo.add_events(s, job_id=job.id, events=[
            {"seq": i, "created_at": 1, "level": "info", "type": "checkpoint", "message": f"checkpoint at step {step}",
             "data": {"step": step}} for i, step in enumerate(saves)] + [
            {"seq": 9, "created_at": 1, "level": "info", "type": "metrics", "message": "step 4", "data": {"step": 4}}])
    with sessions() as s:
        rows, more = repo.list_events(s, job_id="ftjob-2", limit=10, after=None, types=["checkpoint"],
                                      latest_per_step=True)
        assert [(r.data["step"], r.seq) for r in rows] == [(6, 3), (4, 2), (2, 0)] and not more
        first, more = repo.list_events(s, job_id="ftjob-2", limit=2, after=None, types=["checkpoint"],
                                       latest_per_step=True)
        rest, _ = repo.list_events(s, job_id="ftjob-2", limit=2, after=f"ftevent-{first[-1].ref}",
                                   types=["checkpoint"], latest_per_step=True)
        assert more and [r.seq for r in first + rest] == [3, 2, 0]
        assert len(repo.list_events(s, job_id="ftjob-2", limit=10, after=None, types=["checkpoint"])[0]) == 4


def test_lease_has_one_holder_until_it_expires(sessions: sessionmaker[Session]) -> None:
    winners: list[str] = []

    def contend(holder: str) -> None:
        with sessions() as s, s.begin():
            if repo.acquire_lease(s, name="scheduler", holder=holder, ttl_s=60):
                winners.append(holder)

    threads = [threading.Thread(target=contend, args=(f"h{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1
    with sessions() as s, s.begin():
        assert repo.acquire_lease(s, name="scheduler", holder=winners[0], ttl_s=-1)  # renew, then expire at once
    with sessions() as s, s.begin():
        assert repo.acquire_lease(s, name="scheduler", holder="newcomer", ttl_s=60)
        assert repo.lease_holder(s, name="scheduler") == "newcomer"
