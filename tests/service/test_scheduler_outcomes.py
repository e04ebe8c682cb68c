"""What the scheduler makes of a run's directory when the driver dies at the worst moments: a run that finished
training (``outcome.json`` says succeeded, the adapter is uploaded) before its driver died is recorded as succeeded,
on any attempt, not failed or trained again; and the events a driver writes just before its ``result.json`` are
ingested even when they land between the scheduler's reads; a scheduler that died while submitting neither uses up
the job's attempt nor, when its submission lands late, leaves two drivers on the run. Real app, recording launcher
(no cluster)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qwenvl_core.runs import OUTCOME_FILE, RunDir
from qwenvl_core.specs import JobState
from qwenvl_core.training import RunDirEvents
from service.launcher import job_of_submission, submission_id
from service.models import Job
from tests.service.helpers import auth
from tests.service.scheduler_harness import Stack, stack


@pytest.fixture(scope="module")
def st(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("outcomes")
    with stack(f"sqlite:///{root / 'db.sqlite'}", root, tiny_model_dir, max_running_jobs=8, max_job_attempts=1,
               stray_check_interval_s=0.001) as st:
        yield st


def _running(st: Stack, name: str) -> tuple[str, RunDir, str]:
    """(job id, run directory, the tenant's key) of a launched job."""
    tenant_id, key = st.tenant(name)
    job_id = st.create_job(key, st.processed_file(tenant_id))
    assert st.scheduler.tick()
    job = st.job(job_id)
    assert job.status == "running"
    return job_id, RunDir(job.output_uri), key


class _SchedulerDied(BaseException):
    """The scheduler's process ending at that point: nothing after it runs (not an error it could handle)."""


def _relaunched_after_a_leader_died_while_submitting(st: Stack, tenant: str, monkeypatch: pytest.MonkeyPatch
                                                     ) -> tuple[str, Job, str]:
    """A job whose first launch died between committing it ``running`` and submitting it, launched again by the next
    ticks: (job id, the job, its second submission id)."""
    tenant_id, key = st.tenant(tenant)
    job_id = st.create_job(key, st.processed_file(tenant_id))

    submit = st.launcher.submit

    def dies(submission_id: str, spec_uri: str) -> None:  # at this job's submission (the stack has other jobs)
        if submission_id.startswith(job_id):
            raise _SchedulerDied
        submit(submission_id, spec_uri)

    with monkeypatch.context() as patch:
        patch.setattr(st.launcher, "submit", dies)
        with pytest.raises(_SchedulerDied):
            st.scheduler.tick()
    job = st.job(job_id)
    assert job.status == "running" and job.submission_id == f"{job_id}-a1"
    assert f"{job_id}-a1" not in st.launcher.submitted and st.launcher.status(f"{job_id}-a1") is None
    assert st.scheduler.tick()  # the restarted scheduler: Ray has no such job, and the run no record of it
    assert st.scheduler.tick()
    job, second = st.job(job_id), f"{job_id}-a2"
    assert job.status == "running" and job.submission_id == second and job.unsubmitted_attempts == 1, \
        st.messages(job_id)
    return job_id, job, second


def test_a_driver_that_died_after_its_run_finished_leaves_a_succeeded_job(st: Stack) -> None:
    job_id, run, _ = _running(st, "finished-then-died")
    run.write_json("adapter/adapter_config.json", {"peft_type": "LORA", "r": 8})  # rank 0 uploaded the adapter,
    run.write_json(OUTCOME_FILE, {"state": "succeeded", "metrics": {"train/loss": 0.5}, "summary": {}})  # then this
    st.launcher.statuses[f"{job_id}-a1"] = "FAILED"  # and the driver died before result.json
    assert st.scheduler.tick()
    job = st.job(job_id)
    assert job.status == "succeeded" and job.fine_tuned_model and job.fine_tuned_model.endswith(job_id), job.error
    assert st.launcher.submitted.count(f"{job_id}-a2") == 0  # its last attempt: not failed, not run again


def test_a_driver_that_died_mid_run_on_its_last_attempt_still_fails(st: Stack) -> None:
    job_id, run, _ = _running(st, "died-mid-run")
    run.write_json(OUTCOME_FILE, {"state": "failed", "metrics": {}, "summary": {}})
    st.launcher.statuses[f"{job_id}-a1"] = "FAILED"
    assert st.scheduler.tick()
    job = st.job(job_id)
    assert job.status == "failed" and job.error is not None and job.error["code"] == "job_died"


def test_events_written_just_before_the_result_are_ingested(st: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    job_id, run, _ = _running(st, "last-words")
    events = RunDirEvents(run)
    events.state(JobState.RUNNING, "started")
    read_events = RunDir.read_events

    def driver_finishes_meanwhile(self: RunDir, after: int = -1):  # the driver's last event and its result land
        found = read_events(self, after)  # right after this read
        if self.uri == run.uri and not self.exists("result.json"):
            events.state(JobState.SUCCEEDED, "job succeeded")
            run.write_json("adapter/adapter_config.json", {"peft_type": "LORA", "r": 8})
            run.write_result({"state": "succeeded"})
        return found

    monkeypatch.setattr(RunDir, "read_events", driver_finishes_meanwhile)
    for _ in range(3):
        assert st.scheduler.tick()
        if st.job(job_id).status == "succeeded":
            break
    assert st.job(job_id).status == "succeeded"
    assert "job succeeded" in st.messages(job_id)


def test_a_run_stopped_by_a_pause_whose_commit_was_lost_is_paused_not_failed(st: Stack) -> None:
    """The pause route writes ``PAUSE`` and then commits the job's flag; when that commit is lost (the API died, the
    database refused), the run still stops on ``PAUSE``: the job is paused (and resumes), not re-run into it again
    until its attempts are spent."""
    job_id, run, key = _running(st, "pause-lost")
    run.request_pause()
    assert st.job(job_id).pause_requested_at is None
    st.launcher.statuses[f"{job_id}-a1"] = "SUCCEEDED"  # the driver recorded the pause and ended, no result.json
    assert st.scheduler.tick()
    assert st.job(job_id).status == "paused"
    resumed = st.client.post(f"/v1/fine_tuning/jobs/{job_id}/resume", headers=auth(key))
    assert resumed.status_code == 200 and resumed.json()["status"] == "queued", resumed.text
    assert not run.pause_requested()  # the relaunched run will not stop on it again


def test_a_scheduler_that_died_before_submitting_a_job_does_not_use_up_its_attempt(
        st: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The job is committed ``running`` before Ray gets it; a scheduler that dies in between leaves a job Ray says
    does not exist. It never ran: it is launched again, under the next submission id (the dead scheduler's may still
    land), its one attempt not spent (before: failed, ``job_died``). A job Ray accepted and then lost is told apart
    by the run's submission record and still counts."""
    job_id, job, second = _relaunched_after_a_leader_died_while_submitting(st, "died-before-submit", monkeypatch)
    assert f"{job_id}-a1" not in st.launcher.submitted and st.launcher.submitted.count(second) == 1
    assert any("was never submitted" in m for m in st.messages(job_id))
    assert RunDir(job.output_uri).exists(f"submissions/{second}.json")

    del st.launcher.statuses[second]  # now Ray loses the job it accepted: that attempt ran, and was the last
    assert st.scheduler.tick()
    job = st.job(job_id)
    assert job.status == "failed" and job.error is not None and job.error["code"] == "job_died", st.messages(job_id)
    assert "after 1 attempt(s)" in job.error["message"]


def test_a_late_submission_of_a_leader_that_died_while_submitting_is_stopped(
        st: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """As above, and then the dead leader's submission lands after all (its request was on its way): two drivers
    would train in one run directory. The scheduler stops that one and says so on the job; the current submission,
    a job this database does not know (another deployment's, on a shared cluster) and an id not named like ours
    are left alone."""
    job_id, _, second = _relaunched_after_a_leader_died_while_submitting(st, "late-submission", monkeypatch)
    late, foreign, other = f"{job_id}-a1", "ftjob-" + "0" * 24 + "-a1", "raysubmit_0123456789"
    st.launcher.statuses.update(dict.fromkeys((late, foreign, other), "RUNNING"))
    assert st.scheduler.tick()
    assert late in st.launcher.stopped and not {second, foreign, other} & set(st.launcher.stopped)
    assert st.launcher.statuses[second] == "RUNNING" and st.job(job_id).status == "running"
    assert any(f"Stopped Ray job {late}" in m and second in m for m in st.messages(job_id)), st.messages(job_id)
    st.launcher.statuses[late] = "RUNNING"  # Ray is slow to stop it: stopped again, and said once
    assert st.scheduler.tick()
    assert st.launcher.stopped.count(late) == 2
    assert sum(f"Stopped Ray job {late}" in m for m in st.messages(job_id)) == 1


@pytest.mark.parametrize("name, job", [(submission_id("ftjob-0a1b", 3), "ftjob-0a1b"), ("ftjob-0a1b-a12", "ftjob-0a1b"),
                                       ("ftjob-0a1b-a0", None), ("ftjob-0a1b-a", None), ("ftjob-0A1B-a1", None),
                                       ("raysubmit_0123456789", None), ("x-ftjob-0a1b-a1", None)])
def test_a_ray_job_id_names_its_job_only_in_the_form_the_scheduler_submits(name: str, job: str | None) -> None:
    assert job_of_submission(name) == job
