"""The scheduler enforces a job's wall-clock limit (``jobs.max_wall_clock_s``, resolved at submit time): past it
the job is cancelled (``CANCEL`` written), stopped after ``cancel_grace_s``, and ends ``failed`` with
``wall_clock_limit_exceeded``; a user's own cancel stays ``cancelled``; a run that finished its adapter is kept.
Elapsed time is simulated by moving ``started_at`` back, not by sleeping."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import update

from qwenvl_core.runs import RunDir
from service.models import Job
from tests.service.helpers import auth
from tests.service.scheduler_harness import Stack, stack

LIMIT = 600


@pytest.fixture(scope="module")
def st(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("limits")
    with stack(f"sqlite:///{root / 'db.sqlite'}", root, tiny_model_dir, cancel_grace_s=0.0, max_running_jobs=8) as st:
        yield st


def _running(st: Stack, name: str, elapsed_s: float) -> tuple[str, str, RunDir]:
    """(job id, key, run dir) of a launched job with a wall-clock limit of LIMIT s, started ``elapsed_s`` ago."""
    tenant_id, key = st.tenant(name)
    job_id = st.create_job(key, st.processed_file(tenant_id), max_wall_clock_s=LIMIT)
    assert st.scheduler.tick()
    job = st.job(job_id)
    assert job.status == "running" and job.max_wall_clock_s == LIMIT
    with st.ctx.sessions() as s, s.begin():
        s.execute(update(Job).where(Job.id == job_id).values(started_at=int(time.time() - elapsed_s)))
    return job_id, key, RunDir(job.output_uri)


def test_a_job_past_its_limit_is_cancelled_stopped_and_failed(st: Stack) -> None:
    job_id, _, run = _running(st, "overrunner", LIMIT + 5)
    assert st.scheduler.tick()
    job = st.job(job_id)
    assert job.status == "running" and job.cancel_requested_at is not None and run.cancel_requested()
    assert any(f"Wall-clock limit of {LIMIT} s reached" in m for m in st.messages(job_id))
    assert st.scheduler.tick()  # cancel_grace_s = 0: the run did not stop by itself, so it is stopped
    assert f"{job_id}-a1" in st.launcher.stopped
    assert st.scheduler.tick()  # the cluster reports it stopped, without a result: not re-queued
    job = st.job(job_id)
    assert job.status == "failed" and job.error is not None, job.error
    assert job.error["code"] == "wall_clock_limit_exceeded" and str(LIMIT) in job.error["message"]
    assert st.launcher.submitted.count(f"{job_id}-a2") == 0


def test_a_run_that_honours_the_cancel_ends_failed_too(st: Stack) -> None:
    job_id, _, run = _running(st, "honourer", LIMIT + 5)
    assert st.scheduler.tick() and run.cancel_requested()
    run.write_result({"state": "cancelled"})  # what the workflow writes on CANCEL
    assert st.scheduler.tick()
    job = st.job(job_id)
    assert job.status == "failed" and job.error is not None and job.error["code"] == "wall_clock_limit_exceeded"


def test_within_the_limit_nothing_happens_and_a_user_cancel_stays_cancelled(st: Stack) -> None:
    job_id, key, run = _running(st, "patient", LIMIT - 60)
    assert st.scheduler.tick()
    assert st.job(job_id).cancel_requested_at is None and not run.cancel_requested()
    reply = st.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth(key)).json()
    assert reply["cancel_requested"]
    run.write_result({"state": "cancelled"})
    assert st.scheduler.tick()
    job = st.job(job_id)
    assert job.status == "cancelled" and job.error is None


def test_a_run_that_finished_its_adapter_past_the_limit_is_kept(st: Stack) -> None:
    job_id, _, run = _running(st, "finisher", LIMIT + 5)
    assert st.scheduler.tick() and run.cancel_requested()
    run.write_json("adapter/adapter_config.json", {"peft_type": "LORA", "r": 8})  # it had just finished
    run.write_result({"state": "succeeded", "trained_tokens": 10})
    assert st.scheduler.tick()
    job = st.job(job_id)
    assert job.status == "succeeded" and job.fine_tuned_model and job.fine_tuned_model.endswith(job_id)
