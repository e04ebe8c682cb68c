"""Scheduler leadership is fenced: two replicas on one database (SQLite and PostgreSQL) with a tiny lease TTL.

A leader whose lease ran out mid-tick (its submission hung past the TTL) writes nothing once another replica took
over, and stops the submission it made meanwhile; a long tick renews the lease between jobs and keeps it; event
objects are listed from the last seen key on (local disk and S3); only Ray's explicit "does not exist" makes a
job count as vanished.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import ray
from sqlalchemy import Engine, event, select

from qwenvl_core.runs import RunDir
from qwenvl_core.specs import JobEvent
from qwenvl_core.storage import LocalStore, S3Store
from service import repository as repo
from service.launcher import LauncherUnavailable, RayJobsLauncher
from service.models import Lease
from service.scheduler import LEASE
from tests.fixtures.s3 import S3Server
from tests.service.scheduler_harness import RecordingLauncher, database_url, queued_job, stack

TTL = 1.0


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return database_url(request, tmp_path)


def _wait(cond: Callable[[], bool], what: str, step: Callable[[], Any] | None = None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        if step is not None:
            step()
        time.sleep(0.05)


class CommittedWrites:
    """Rows an engine changed in transactions that committed (the connection's writes, kept until commit)."""

    def __init__(self, engine: Engine) -> None:
        self.committed: list[str] = []
        self._pending: dict[int, list[str]] = {}
        event.listen(engine, "after_cursor_execute", self._write)
        event.listen(engine, "commit", lambda conn: self.committed.extend(self._pending.pop(id(conn), [])))
        event.listen(engine, "rollback", lambda conn: self._pending.pop(id(conn), None))

    def _write(self, conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith(("UPDATE", "INSERT", "DELETE")) and cursor.rowcount > 0:
            self._pending.setdefault(id(conn), []).append(statement.split("\n")[0][:80])


def test_a_leader_that_lost_its_lease_mid_tick_writes_nothing(db_url: str, tmp_path: Path,
                                                               tiny_model_dir: Path) -> None:
    cluster = RecordingLauncher()  # one cluster, seen by both replicas
    with stack(db_url, tmp_path, tiny_model_dir, "a", cluster, lease_ttl_s=TTL, max_job_attempts=3) as a, \
            stack(db_url, tmp_path, tiny_model_dir, "b", cluster, lease_ttl_s=TTL, max_job_attempts=3) as b:
        job_id, _ = queued_job(a)  # a leads
        first, second = f"{job_id}-a1", f"{job_id}-a2"
        gate = cluster.gates[first] = threading.Event()  # a's submission hangs past the lease TTL
        results: list[bool] = []
        a_tick = threading.Thread(target=lambda: results.append(a.scheduler.tick()), daemon=True)
        a_tick.start()
        assert cluster.entered.wait(30)
        writes = CommittedWrites(a.engine)  # from here on a must not write
        _wait(b.scheduler.tick, "b to take the lease over")  # a's lease runs out while it hangs
        # b finds a's submission unknown to the cluster (and unrecorded in the run), re-queues the job and launches
        # the next attempt under the next submission id.
        _wait(lambda: b.job(job_id).submission_id == second, "b to launch the second attempt", b.scheduler.tick)
        gate.set()  # a's submission finally lands
        a_tick.join(30)
        assert results == [False]  # a noticed, at its next renewal, that it no longer leads
        assert writes.committed == []
        assert cluster.submitted == [second, first] and cluster.stopped == [first]  # a stopped its late submission
        job = b.job(job_id)
        assert job.status == "running" and job.submission_id == second and job.attempt == 2
        assert job.unsubmitted_attempts == 1  # a's never reached the cluster before b looked: not counted
        messages = b.messages(job_id)
        assert any(f"Ray job {first} was never submitted" in m for m in messages), messages
        with a.ctx.sessions() as s:
            lease = s.scalar(select(Lease).where(Lease.name == LEASE))
            assert lease is not None and lease.holder == b.scheduler.holder and lease.epoch == 2
        assert not a.scheduler.tick()  # b holds a live lease: a stays a follower


def test_a_long_tick_renews_its_lease_between_jobs(db_url: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    """Reconciling four jobs takes about four lease lifetimes; renewing before each job keeps the lease, so the
    other replica never leads meanwhile (without renewal it took over after the first TTL)."""
    cluster = RecordingLauncher()
    ttl, per_job = 3.0, 1.0
    with stack(db_url, tmp_path, tiny_model_dir, "a", cluster, lease_ttl_s=ttl, max_running_jobs=4) as a, \
            stack(db_url, tmp_path, tiny_model_dir, "b", cluster, lease_ttl_s=ttl) as b:
        jobs = [queued_job(a, f"tenant-{i}")[0] for i in range(4)]
        assert a.scheduler.tick()
        assert all(a.job(j).status == "running" for j in jobs)
        cluster.status_delay_s = per_job
        results: list[bool] = []
        a_tick = threading.Thread(target=lambda: results.append(a.scheduler.tick()), daemon=True)
        a_tick.start()
        b_led = []
        while a_tick.is_alive():
            b_led.append(b.scheduler.tick())
            time.sleep(0.1)
        assert results == [True] and not any(b_led) and len(b_led) > 3


def test_the_lease_epoch_fences_a_returning_holder(db_url: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    """The epoch grows with every change of hands: a holder that lost the lease and got it back cannot write
    with the epoch of its earlier term."""
    with stack(db_url, tmp_path, tiny_model_dir) as st, st.ctx.sessions() as s, s.begin():
        assert repo.take_lease(s, name="t", holder="a", ttl_s=60) == 1
        assert repo.take_lease(s, name="t", holder="a", ttl_s=-1) == 1  # renewal keeps the epoch (and expires)
        assert repo.take_lease(s, name="t", holder="b", ttl_s=-1) == 2  # expired: b takes over (and expires)
        assert repo.take_lease(s, name="t", holder="a", ttl_s=60) == 3  # a is back, in a new term
        assert not repo.renew_lease(s, name="t", holder="a", epoch=1, ttl_s=60)  # its old term is fenced off
        assert repo.take_lease(s, name="t", holder="b", ttl_s=60) is None and repo.lease_holder(s, name="t") == "a"
        assert repo.renew_lease(s, name="t", holder="a", epoch=3, ttl_s=60)
        repo.release_lease(s, name="t", holder="a")  # a graceful stop: free at once, the epoch is kept
        assert repo.lease_holder(s, name="t") is None and not repo.renew_lease(s, name="t", holder="b", epoch=3,
                                                                              ttl_s=60)
        assert repo.take_lease(s, name="t", holder="b", ttl_s=60) == 4


# ----- listing only new events ------------------------------------------------------------------------------
class CountingStore:
    """A real store, counting the keys its listings return."""

    def __init__(self, store: Any) -> None:
        self.store, self.listed = store, 0

    def list_keys(self, prefix: str, *args: Any, **kwargs: Any) -> list[str]:
        keys: list[str] = self.store.list_keys(prefix, *args, **kwargs)
        self.listed += len(keys)
        return keys

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def _event(seq: int) -> JobEvent:
    return JobEvent(seq=seq, created_at=1.0, type="metrics", message=f"step {seq}", data={"step": seq})


def _only_new_keys_are_listed(run: RunDir, total: int) -> None:
    store = CountingStore(run.store)
    run.store = store  # type: ignore[assignment]
    assert [e.seq for e in run.read_events(total - 6)] == list(range(total - 5, total))
    assert store.listed == 5  # not the thousands before them
    run.write_event(_event(total))
    store.listed = 0
    assert [e.seq for e in run.read_events(total - 1)] == [total] and store.listed == 1
    assert len(store.list_keys(run.key("events") + "/")) == total + 1  # the history is all there


def test_read_events_lists_only_new_keys_on_local_disk(tmp_path: Path) -> None:
    run = RunDir(str(tmp_path / "run"))
    run.write_event(_event(0))
    events = tmp_path / "run" / "events"
    for seq in range(1, 3000):  # the same files write_event makes, without its per-file fsync
        (events / f"{seq:08d}.json").write_text(_event(seq).model_dump_json())
    (events / ".00003001.json.tmp").write_text("{}")  # an unfinished write is never listed
    assert isinstance(run.store, LocalStore)
    _only_new_keys_are_listed(run, 3000)


def test_read_events_lists_only_new_keys_on_s3(s3_env: S3Server) -> None:
    client = s3_env.client()
    client.create_bucket(Bucket="events-bucket")
    run = RunDir("s3://events-bucket/runs/job-1")
    assert isinstance(run.store, S3Store)
    run.store.client = client
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda seq: run.write_event(_event(seq)), range(2000)))
    returned: list[int] = []
    client.meta.events.register("after-call.s3.ListObjectsV2",
                                lambda parsed, **_: returned.append(len(parsed.get("Contents", []))))
    _only_new_keys_are_listed(run, 2000)
    assert sum(returned) == 5 + 1 + 2001  # what S3 itself sent: only the new keys (and the history when asked)


# ----- Ray's answer: only "does not exist" means vanished ----------------------------------------------------
class _Dashboard(BaseHTTPRequestHandler):
    """An HTTP endpoint in front of the dashboard (a proxy / ingress) that answers the version check but has no
    route for the jobs API: a 404 "Not Found" that says nothing about any job."""

    def do_GET(self) -> None:
        if self.path == "/api/version":
            body = json.dumps({"version": "4", "ray_version": ray.__version__, "ray_commit": "x",
                               "session_name": "s"}).encode()
            self.send_response(200)
        else:
            body = b"404: Not Found"
            self.send_response(404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def proxy_404() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Dashboard)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_not_found_that_is_not_rays_answer_requeues_nothing(tmp_path: Path, tiny_model_dir: Path,
                                                              proxy_404: str) -> None:
    launcher = RayJobsLauncher(proxy_404, "{python} -m workflows.finetune --spec {spec}", 0.1, {})
    with pytest.raises(LauncherUnavailable, match="Not Found"):
        launcher.status("ftjob-x-a1")
    with stack(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path, tiny_model_dir) as st:
        job_id, _ = queued_job(st)
        assert st.scheduler.tick() and st.job(job_id).status == "running"
        st.scheduler.launcher = launcher  # the cluster answers through the proxy from now on
        for _ in range(3):
            assert st.scheduler.tick()
        job = st.job(job_id)
        assert job.status == "running" and job.submission_id == f"{job_id}-a1" and job.attempt == 1
        assert not any("re-queued" in m for m in st.messages(job_id))
