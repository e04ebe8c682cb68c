"""The job state machine (``service.job_states``) and the cancel / launch race, on SQLite and PostgreSQL.

The races run the real cancel route (through the app) against the real scheduler in two threads, each with its
own database session; ``HoldAfter`` keeps one side's transaction open right after its compare-and-set so the other
side meets it in the database, in a fixed order.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import event, update

from qwenvl_core.runs import RunDir
from service import job_states
from service import repository as repo
from service.launcher import LauncherUnavailable
from service.models import Job
from tests.service.helpers import auth
from tests.service.scheduler_harness import (
    HoldAfter,
    RecordingLauncher,
    Stack,
    before_write,
    database_url,
    job_update_to,
    queued_job,
    stack,
    wait_until_blocked,
)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return database_url(request, tmp_path)


@pytest.fixture
def st(db_url: str, tmp_path: Path, tiny_model_dir: Path) -> Iterator[Stack]:
    with stack(db_url, tmp_path, tiny_model_dir, cancel_grace_s=0.0) as st:
        yield st


def _thread(target: object) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)  # type: ignore[arg-type]
    thread.start()
    return thread


def test_the_table_allows_exactly_the_documented_moves() -> None:
    legal = {("validating_files", "queued"), ("validating_files", "failed"), ("validating_files", "cancelled"),
             ("queued", "running"), ("queued", "cancelled"), ("queued", "failed"),
             ("running", "succeeded"), ("running", "failed"), ("running", "cancelled"), ("running", "queued"),
             ("validating_files", "paused"), ("queued", "paused"), ("running", "paused"),
             ("paused", "validating_files"), ("paused", "queued"), ("paused", "cancelled")}
    assert job_states.TERMINAL == {"succeeded", "failed", "cancelled"}
    for source, target in itertools.product(sorted(job_states.STATES), repeat=2):
        if (source, target) in legal:
            job_states.check(source, target)
        else:
            with pytest.raises(job_states.IllegalTransition):
                job_states.check(source, target)
    with pytest.raises(job_states.IllegalTransition, match="unknown"):
        job_states.check("queued", "launching")


def test_a_move_is_a_compare_and_set(st: Stack) -> None:
    job_id, _ = queued_job(st)
    with st.ctx.sessions() as s, s.begin():
        stale = repo.job_by_id(s, job_id=job_id)
        assert stale is not None and stale.status == "queued"
        with st.ctx.sessions() as other, other.begin():  # another writer moves the row on and commits
            assert job_states.transition(other, repo.job_by_id(other, job_id=job_id), "cancelled")  # type: ignore[arg-type]
        assert not job_states.transition(s, stale, "running")  # the row moved: this writer loses, writes nothing
        assert not job_states.request_cancel(s, stale)  # not running: no cancel flag either
        with pytest.raises(job_states.IllegalTransition):
            job_states.transition(s, stale, "succeeded")  # queued -> succeeded is never legal
    job = st.job(job_id)
    assert job.status == "cancelled" and job.finished_at is not None and job.cancel_requested_at is None
    with st.ctx.sessions() as s, s.begin():  # a terminal job stays terminal
        with pytest.raises(job_states.IllegalTransition):
            job_states.transition(s, repo.job_by_id(s, job_id=job_id), "queued")  # type: ignore[arg-type]


def test_cancel_that_wins_the_race_means_nothing_is_submitted(st: Stack) -> None:
    """The cancel's compare-and-set holds the row when the launch arrives: the launch loses and submits nothing."""
    job_id, key = queued_job(st)
    hold = HoldAfter(st.engine, job_update_to("cancelled"))
    replies: list[dict] = []
    canceller = _thread(lambda: replies.append(
        st.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth(key)).json()))
    assert hold.reached.wait(30)
    ticks: list[bool] = []
    launcher = threading.Thread(target=lambda: ticks.append(st.scheduler.tick()), daemon=True)
    started = before_write(st.engine, launcher)
    launcher.start()
    wait_until_blocked(st.engine, started)  # the launch waits for the cancel's lock
    hold.release()
    canceller.join(30)
    launcher.join(30)
    assert replies and replies[0]["status"] == "cancelled", replies
    assert ticks == [True]
    assert st.launcher.submitted == []  # never submitted to the cluster
    job = st.job(job_id)
    assert job.status == "cancelled" and job.submission_id is None and job.attempt == 0


def test_cancel_that_loses_to_the_launch_writes_cancel(st: Stack) -> None:
    """The launch's compare-and-set holds the row when the cancel arrives: the cancel re-reads, finds the job
    running and writes CANCEL; the job is never cancelled-and-running."""
    job_id, key = queued_job(st)
    hold = HoldAfter(st.engine, job_update_to("running"))
    launcher = _thread(st.scheduler.tick)
    assert hold.reached.wait(30)
    started = before_write(st.engine)  # the scheduler is parked: the next write is the cancel's
    replies: list[dict] = []
    canceller = _thread(lambda: replies.append(
        st.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth(key)).json()))
    wait_until_blocked(st.engine, started)
    hold.release()
    canceller.join(30)
    launcher.join(30)
    assert replies and replies[0]["status"] == "running" and replies[0]["cancel_requested"], replies
    job = st.job(job_id)
    assert RunDir(job.output_uri).cancel_requested() and job.cancel_requested_at is not None
    # Either the launch saw the cancel before submitting (cancelled, nothing submitted) or it had submitted
    # already and the run finds CANCEL; never a cancelled job on the cluster.
    if st.launcher.submitted:
        assert job.status == "running" and st.launcher.submitted == [f"{job_id}-a1"]
    else:
        assert job.status == "cancelled"
    assert not (job.status == "cancelled" and st.launcher.submitted)


def test_cancel_during_submission_is_honoured(st: Stack) -> None:
    """A cancel arriving while the submission is under way finds the job running, writes CANCEL; the run ends
    cancelled and the Ray job is stopped after the grace period."""
    job_id, key = queued_job(st)
    gate = st.launcher.gates[f"{job_id}-a1"] = threading.Event()
    launcher = _thread(st.scheduler.tick)
    assert st.launcher.entered.wait(30)
    reply = st.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth(key)).json()
    assert reply["status"] == "running" and reply["cancel_requested"], reply
    gate.set()
    launcher.join(30)
    assert st.launcher.submitted == [f"{job_id}-a1"]
    run = RunDir(st.job(job_id).output_uri)
    assert run.cancel_requested()
    assert st.scheduler.tick()  # cancel_grace_s = 0: the Ray job is stopped
    assert st.launcher.stopped == [f"{job_id}-a1"]
    run.write_result({"state": "cancelled"})  # what the workflow writes when it sees CANCEL
    assert st.scheduler.tick()
    assert st.job(job_id).status == "cancelled"
    again = st.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth(key))
    assert again.status_code == 400 and again.json()["error"]["code"] == "job_not_cancellable"


def test_cancel_retries_when_the_row_moves_under_it(st: Stack) -> None:
    """The route re-reads after a lost compare-and-set: a job the scheduler moved from validating to queued between
    the route's read and its write is still cancelled."""
    tenant_id, key = st.tenant("movers")
    job_id = st.create_job(key, st.processed_file(tenant_id))

    def validated_meanwhile(_conn: object, _cursor: object, statement: str, params: object, *_: object) -> None:
        if job_update_to("cancelled")(statement, params) and not moved:
            moved.append(True)
            with st.engine.connect() as conn:  # another session commits validating_files -> queued first
                conn.execute(update(Job).where(Job.id == job_id).values(status="queued"))
                conn.commit()

    moved: list[bool] = []
    event.listen(st.engine, "before_cursor_execute", validated_meanwhile)
    try:
        reply = st.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth(key)).json()
    finally:
        event.remove(st.engine, "before_cursor_execute", validated_meanwhile)
    assert moved and reply["status"] == "cancelled", reply


class RefusingOnce(RecordingLauncher):
    """A cluster that refuses the first submission (unreachable for a moment), then accepts."""

    def __init__(self) -> None:
        super().__init__()
        self.refused: list[str] = []

    def submit(self, submission_id: str, spec_uri: str) -> None:
        if not self.refused:
            self.refused.append(submission_id)
            raise LauncherUnavailable("Ray dashboard unreachable")
        super().submit(submission_id, spec_uri)


def test_a_refused_submission_moves_the_job_back_to_queued(db_url: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    with stack(db_url, tmp_path, tiny_model_dir, launcher=RefusingOnce()) as st:
        job_id, _ = queued_job(st)
        assert st.scheduler.tick()
        job = st.job(job_id)
        assert job.status == "queued" and job.submission_id is None and job.attempt == 0  # no attempt used up
        assert any(f"Submitting {job_id}-a1 failed" in m and "re-queued" in m for m in st.messages(job_id))
        assert st.scheduler.tick()
        job = st.job(job_id)
        assert job.status == "running" and job.submission_id == f"{job_id}-a1" and job.attempt == 1
        assert st.launcher.submitted == [f"{job_id}-a1"]
