"""Pause and resume of fine-tuning jobs (``POST /v1/fine_tuning/jobs/{id}/pause`` and ``.../resume``).

The API side runs the real app with the scheduler ticked by the test and a launcher that records submissions
(``scheduler_harness``), driven by the official ``openai`` client where the endpoints are exercised: a running job's
pause frees its cluster slot for the next queued job, resume relaunches it as a new attempt that does not use up
``max_job_attempts``; queued and validating jobs pause at once; the refusals are 400s naming the state, another
tenant's job is 404; a paused job can be cancelled, and stays paused across a restart of the service.

The end-to-end test runs the real workflow (``python -m workflows.finetune``) through the scheduler on the real
local Ray head: a tiny job is paused mid-run (its run checkpoints the step it stopped at), resumed, and ends with
the same adapter tensors as an uninterrupted job with the same seed and data.
"""

from __future__ import annotations

import csv
import io
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load, load_file
from sqlalchemy import update

from qwenvl_core.runs import RunDir
from qwenvl_core.specs import FineTuneJobSpec, JobEvent
from qwenvl_core.training import Hooks, Trainer
from service import repository as repo
from service.launcher import LauncherUnavailable
from service.main import create_app
from service.models import Job
from tests.service.helpers import auth, make_settings, upload, wait_file, wait_for
from tests.service.scheduler_harness import RecordingLauncher, Stack, queued_job, stack


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'shared.db'}"


@pytest.fixture
def st(db_url: str, tmp_path: Path, tiny_model_dir: Path) -> Iterator[Stack]:
    with stack(db_url, tmp_path, tiny_model_dir, max_running_jobs=1, max_job_attempts=2) as st:
        yield st


def _openai(st: Stack, key: str) -> openai.OpenAI:
    """The official client, unchanged, sending its requests into the app in-process."""
    return openai.OpenAI(api_key=key, base_url="http://testserver/v1", http_client=st.client, max_retries=0)


def _tick(st: Stack, times: int = 1) -> None:
    for _ in range(times):
        assert st.scheduler.tick()


def _checkpoint_event(st: Stack, job_id: str, step: int) -> None:
    """What the trainer writes when it stops for the pause: the checkpoint event of the step it stopped at."""
    run = RunDir(st.job(job_id).output_uri)
    run.write_event(JobEvent(seq=run.last_event_seq() + 1, created_at=time.time(), type="checkpoint",
                             message=f"checkpoint at step {step}", data={"step": step}))


def _error(response: Any) -> dict[str, Any]:
    return response.json()["error"]  # type: ignore[no-any-return]


def test_pausing_a_running_job_frees_its_slot_and_resume_relaunches_it(st: Stack) -> None:
    a, key = queued_job(st)
    tenant_id = st.job(a).tenant_id
    b = st.create_job(key, st.processed_file(tenant_id))
    st.queue_without_launching()
    _tick(st)
    assert st.launcher.submitted == [f"{a}-a1"] and st.job(b).status == "queued"  # one slot: b waits
    client = _openai(st, key)

    paused = client.fine_tuning.jobs.pause(a)
    assert paused.status == "running" and paused.model_extra["pause_requested"] is True  # pending until it stops
    run = RunDir(st.job(a).output_uri)
    assert run.pause_requested() and not run.cancel_requested()
    assert client.fine_tuning.jobs.pause(a).status == "running"  # asked again: nothing changes
    _tick(st)
    assert st.job(a).status == "running" and st.job(b).status == "queued"  # still running: still holds the slot

    _checkpoint_event(st, a, 3)
    st.launcher.statuses[f"{a}-a1"] = "SUCCEEDED"  # the driver recorded the pause and exited, without a result
    _tick(st)
    job_a = st.job(a)
    assert job_a.status == "paused" and job_a.submission_id is None and job_a.pauses == 1
    assert client.fine_tuning.jobs.retrieve(a).status == "paused"
    assert st.launcher.submitted == [f"{a}-a1", f"{b}-a1"]  # the freed slot went to the queued job
    assert any("Job paused" in m and "checkpoint of step 3" in m for m in st.messages(a)), st.messages(a)

    resumed = client.fine_tuning.jobs.resume(a)
    assert resumed.status == "queued" and not run.pause_requested()
    assert any(m.startswith("Job resumed") for m in st.messages(a))
    events = client.fine_tuning.jobs.list_events(a, limit=20).data
    assert [e.message.split(":")[0].split(";")[0] for e in events[:3]] == [
        f"Job resumed after {events[0].message.split()[3]} s paused", "Job paused", "checkpoint at step 3"]

    client.fine_tuning.jobs.pause(b)  # b's run stops too: a gets the slot back, as its second attempt
    st.launcher.statuses[f"{b}-a1"] = "SUCCEEDED"
    _tick(st)
    assert st.job(b).status == "paused" and st.launcher.submitted[-1] == f"{a}-a2"
    assert st.job(a).status == "running" and st.job(a).attempt == 2
    st.launcher.statuses[f"{a}-a2"] = "FAILED"  # a crash now: the pause did not use up an attempt
    _tick(st)
    assert any("re-queued (attempt 1 of 2)" in m for m in st.messages(a)), st.messages(a)
    assert st.launcher.submitted[-1] == f"{a}-a3"  # relaunched at once (the slot is free)


def test_a_pause_not_honoured_within_the_grace_stops_the_ray_job(db_url: str, tmp_path: Path,
                                                                 tiny_model_dir: Path) -> None:
    with stack(db_url, tmp_path, tiny_model_dir, pause_grace_s=0.0) as st:
        job_id, key = queued_job(st)
        _tick(st)
        assert st.client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=auth(key)).status_code == 200
        time.sleep(0.05)
        _tick(st)  # past the grace: stop_job; Ray then reports it STOPPED
        assert st.launcher.stopped == [f"{job_id}-a1"]
        _tick(st)
        assert st.job(job_id).status == "paused"
        assert any("had no checkpoint yet, resume starts it from step 0" in m for m in st.messages(job_id))


def test_queued_and_validating_jobs_pause_at_once_and_resume_where_they_were(st: Stack) -> None:
    job_id, key = queued_job(st)
    client = _openai(st, key)
    assert client.fine_tuning.jobs.pause(job_id).status == "paused"
    _tick(st, 2)
    assert st.launcher.submitted == []  # paused: never launched
    assert client.fine_tuning.jobs.pause(job_id).status == "paused"  # idempotent
    training_file = st.job(job_id).training_file  # a paused job is unfinished: it will need its files again
    resp = st.client.delete(f"/v1/files/{training_file}", headers=auth(key))
    assert resp.status_code == 409 and _error(resp)["code"] == "file_in_use" and job_id in _error(resp)["message"]
    assert client.fine_tuning.jobs.resume(job_id).status == "queued"
    _tick(st)
    assert st.launcher.submitted == [f"{job_id}-a1"]

    validating = st.create_job(key, st.processed_file(st.job(job_id).tenant_id))
    assert client.fine_tuning.jobs.pause(validating).status == "paused"
    _tick(st)
    assert st.job(validating).status == "paused"  # its files are valid, yet it does not queue while paused
    assert client.fine_tuning.jobs.resume(validating).status == "validating_files"
    _tick(st)
    assert st.job(validating).status == "queued"


def test_refusals_name_the_state_and_other_tenants_get_404(st: Stack) -> None:
    job_id, key = queued_job(st)
    url = f"/v1/fine_tuning/jobs/{job_id}"
    resp = st.client.post(f"{url}/resume", headers=auth(key))
    assert resp.status_code == 400 and _error(resp)["code"] == "job_not_paused"
    assert _error(resp)["param"] == "fine_tuning_job_id" and "is queued, not paused" in _error(resp)["message"]

    _, other_key = st.tenant("other")
    for action in ("pause", "resume"):
        resp = st.client.post(f"{url}/{action}", headers=auth(other_key))
        assert resp.status_code == 404 and _error(resp)["param"] == "fine_tuning_job_id", resp.text
    assert st.job(job_id).status == "queued"

    _tick(st)  # running
    assert st.client.post(f"{url}/pause", headers=auth(key)).json()["pause_requested"] is True
    resp = st.client.post(f"{url}/resume", headers=auth(key))
    assert resp.status_code == 400 and "running (its pause is still in progress)" in _error(resp)["message"]
    assert st.client.post(f"{url}/cancel", headers=auth(key)).json()["cancel_requested"] is True
    resp = st.client.post(f"{url}/pause", headers=auth(key))
    assert resp.status_code == 400 and _error(resp)["code"] == "job_not_pausable"
    assert "is being cancelled" in _error(resp)["message"]
    st.launcher.statuses[f"{job_id}-a1"] = "STOPPED"
    _tick(st)
    assert st.job(job_id).status == "cancelled"  # cancel wins over the pending pause
    assert st.job(job_id).pause_requested_at is None


def test_a_paused_job_can_be_cancelled_and_a_finished_one_cannot_be_paused(st: Stack) -> None:
    job_id, key = queued_job(st)
    client = _openai(st, key)
    client.fine_tuning.jobs.pause(job_id)
    assert client.fine_tuning.jobs.cancel(job_id).status == "cancelled"
    for action in (client.fine_tuning.jobs.pause, client.fine_tuning.jobs.resume):
        with pytest.raises(openai.BadRequestError) as err:
            action(job_id)
        assert "is cancelled" in err.value.message and err.value.body["param"] == "fine_tuning_job_id"  # type: ignore[index]
    assert err.value.code == "job_not_paused"


def test_a_paused_job_stays_paused_across_a_restart(db_url: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    with stack(db_url, tmp_path, tiny_model_dir) as st:
        job_id, key = queued_job(st)
        assert st.client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=auth(key)).json()["status"] == "paused"
        st.scheduler.stop()  # this process shuts down and hands the scheduler lease back
    with stack(db_url, tmp_path, tiny_model_dir) as st:  # a new process on the same database and storage
        _tick(st, 2)
        assert st.job(job_id).status == "paused" and st.launcher.submitted == []
        assert st.client.post(f"/v1/fine_tuning/jobs/{job_id}/resume", headers=auth(key)).json()["status"] == "queued"
        _tick(st)
        assert st.launcher.submitted == [f"{job_id}-a1"]


def _adapter(client: TestClient, key: str, model: str) -> dict[str, torch.Tensor]:
    """The adapter tensors of ``model`` as a user downloads them (``GET /v1/models/{id}/content``)."""
    archive = client.get(f"/v1/models/{model}/content", headers=auth(key))
    assert archive.status_code == 200, archive.text
    member = tarfile.open(fileobj=io.BytesIO(archive.content)).extractfile("adapter/adapter_model.safetensors")
    assert member is not None
    return load(member.read())


def _result(client: TestClient, key: str, job: dict[str, Any]) -> dict[str, Any]:
    """The job's ``result.json`` (the last of its result files; OpenAI's ``results.csv`` comes first)."""
    return client.get(f"/v1/files/{job['result_files'][-1]}/content", headers=auth(key)).json()  # type: ignore[no-any-return]


def _reference_run(spec_uri: str, out: Path) -> tuple[dict[str, torch.Tensor], list[tuple[int, float]]]:
    """The uninterrupted run of the job's own spec (the one the scheduler wrote), by the same trainer in this
    process: same seed, data and hyperparameters, one worker like the job's, never stopped."""
    spec = FineTuneJobSpec.model_validate_json(Path(spec_uri).read_text())
    spec = spec.model_copy(update={"job_id": "uninterrupted", "output_uri": str(out / "run")})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = Trainer(spec, Hooks(), out / "work").run()
    finally:
        torch.set_num_threads(threads)
    assert result.adapter_dir is not None and result.train_state.resumed_from_step is None
    return load_file(result.adapter_dir / "adapter_model.safetensors"), result.train_state.losses


@pytest.mark.slow
def test_a_paused_and_resumed_job_trains_the_same_adapter(tmp_path: Path, tiny_model_dir: Path,
                                                         ray_dashboard: str) -> None:
    """The real workflow on the real Ray head through the scheduler. The job is paused as soon as its driver has
    started, so its run stops at its first optimizer step with a checkpoint (periodic checkpoints are every 100 steps:
    it is the pause's own); paused, resumed, it finishes with the adapter of an uninterrupted run of the same spec."""
    t0 = time.monotonic()
    settings = make_settings(tmp_path / "data", tiny_model_dir, scheduler_enabled=True, ray_address=ray_dashboard,
                             job_env={"QWENVL_WORK_DIR": str(tmp_path)})
    extensions = {"max_steps": 6, "checkpoint": {"every_n_steps": 100},
                  "compute": {"num_workers": 1, "cpus_per_worker": 0.5}}
    with TestClient(create_app(settings)) as http:
        key = (tmp_path / "data" / "api_key").read_text().strip()
        client = openai.OpenAI(api_key=key, base_url="http://testserver/v1", http_client=http, max_retries=0)
        file_id = upload(http, key)["id"]
        assert wait_file(http, key, file_id)["status"] == "processed"
        job = client.fine_tuning.jobs.create(model="qwen-vl-tiny", training_file=file_id, seed=11, extra_body=extensions,
                                             hyperparameters={"n_epochs": 2, "batch_size": 1,
                                                              "learning_rate_multiplier": 1.0})
        url = f"/v1/fine_tuning/jobs/{job.id}"

        def messages() -> list[str]:
            return [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=200).data]

        wait_for(lambda: {"started": any("started on Ray Train" in m for m in messages()),
                          **http.get(url, headers=auth(key)).json()},
                 lambda d: d["started"] or d["status"] in ("succeeded", "failed", "cancelled"), timeout=600)
        started_s = time.monotonic() - t0
        pausing = client.fine_tuning.jobs.pause(job.id)  # the driver runs: Ray Train is still starting
        assert pausing.status == "running" and pausing.model_extra["pause_requested"] is True
        expected, losses = _reference_run(_spec_uri(http.app, job.id), tmp_path / "reference")  # meanwhile, here

        paused = wait_for(lambda: http.get(url, headers=auth(key)).json(),
                          lambda d: d["status"] not in ("running", "queued"), timeout=600)
        assert paused["status"] == "paused" and not paused["pause_requested"], paused
        paused_s = time.monotonic() - t0
        stop = next((m for m in messages() if "paused at step" in m), None)
        assert stop is not None, messages()
        step = int(stop.split("paused at step ")[1].split(":")[0])
        assert 1 <= step < 6, stop  # mid-run
        assert f"checkpoint at step {step}" in messages() and any("Job paused" in m for m in messages())

        assert client.fine_tuning.jobs.resume(job.id).status == "queued"
        done = wait_for(lambda: http.get(url, headers=auth(key)).json(),
                        lambda d: d["status"] in ("succeeded", "failed", "cancelled"), timeout=600)
        assert done["status"] == "succeeded", done
        assert any(f"restarted on Ray Train after a pause; resuming from the checkpoint of step {step}" in m
                   for m in messages()), messages()
        assert f"resumed from step {step}" in messages()
        summary = _result(http, key, done)["summary"]
        assert summary["resumed_from_step"] == step and summary["steps"] == 6
        # OpenAI's results.csv, first of the result files: every step, across the pause, with the uninterrupted
        # run's losses; no validation file, so no valid_* values
        results = client.files.retrieve(done["result_files"][0])
        assert (results.filename, results.purpose) == ("results.csv", "fine-tune-results")
        rows = list(csv.DictReader(io.StringIO(client.files.content(results.id).text)))
        assert list(rows[0]) == ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
        assert [(int(r["step"]), r["valid_loss"]) for r in rows] == [(n, "") for n in range(1, 7)]
        torch.testing.assert_close([float(r["train_loss"]) for r in rows], [loss for _, loss in losses],
                                   atol=1e-5, rtol=1e-4)
        got = _adapter(http, key, done["fine_tuned_model"])
        assert got.keys() == expected.keys() and got
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4)
    print(f"pause/resume end-to-end: {time.monotonic() - t0:.1f} s (driver started {started_s:.1f} s, paused at "
          f"step {step} {paused_s:.1f} s)")


def _spec_uri(app: Any, job_id: str) -> str:
    """The spec the scheduler wrote for the job's launch (``spec.json`` in its run directory)."""
    with app.state.ctx.sessions() as s:
        job = repo.job_by_id(s, job_id=job_id)
        assert job is not None
        return RunDir(job.output_uri).uri_of("spec.json")


def test_time_spent_paused_does_not_count_against_the_wall_clock_limit(st: Stack) -> None:
    """A job with a 600 s limit, started 100 s ago, then paused for 1000 s (simulated by moving the clocks back)
    and resumed: it runs on, not cancelled; its next 500 s of running still end it."""
    tenant_id, key = st.tenant("clock")
    job_id = st.create_job(key, st.processed_file(tenant_id), max_wall_clock_s=600)
    _tick(st)
    assert st.client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=auth(key)).status_code == 200
    st.launcher.statuses[f"{job_id}-a1"] = "SUCCEEDED"
    _tick(st)
    now = time.time()
    with st.ctx.sessions() as s, s.begin():
        s.execute(update(Job).where(Job.id == job_id).values(started_at=int(now - 1100), paused_at=now - 1000))
    assert st.client.post(f"/v1/fine_tuning/jobs/{job_id}/resume", headers=auth(key)).status_code == 200
    assert st.job(job_id).paused_s == pytest.approx(1000, abs=5)
    _tick(st, 2)
    job = st.job(job_id)
    assert job.status == "running" and job.cancel_requested_at is None and job.submission_id == f"{job_id}-a2"
    with st.ctx.sessions() as s, s.begin():  # 600 s of running in all: now the limit is reached
        s.execute(update(Job).where(Job.id == job_id).values(started_at=int(now - 1600)))
    _tick(st)
    assert st.job(job_id).cancel_requested_at is not None


class _RefusingAfterGate(RecordingLauncher):
    """A cluster whose first submission hangs until the test opens ``gate``, then is refused (unreachable)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.refused = threading.Event(), False

    def submit(self, submission_id: str, spec_uri: str) -> None:
        if not self.refused:
            self.refused = True
            self.entered.set()
            assert self.gate.wait(60)
            raise LauncherUnavailable("Ray dashboard unreachable")
        super().submit(submission_id, spec_uri)


def test_a_pause_during_a_refused_submission_pauses_the_job(db_url: str, tmp_path: Path,
                                                           tiny_model_dir: Path) -> None:
    """Paused while its submission is under way (running, not yet on the cluster), and the cluster refuses it: the
    job is paused, no attempt used up; resumed, it is launched with the submission id Ray never saw."""
    with stack(db_url, tmp_path, tiny_model_dir, launcher=_RefusingAfterGate()) as st:
        job_id, key = queued_job(st)
        ticking = threading.Thread(target=st.scheduler.tick, daemon=True)
        ticking.start()
        assert st.launcher.entered.wait(30)
        reply = st.client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=auth(key)).json()
        assert reply["status"] == "running" and reply["pause_requested"], reply
        st.launcher.gate.set()  # type: ignore[attr-defined]
        ticking.join(30)
        job = st.job(job_id)
        assert job.status == "paused" and job.attempt == 0 and job.submission_id is None and job.pauses == 0
        assert "Job paused (it was never submitted)" in st.messages(job_id)
        assert st.client.post(f"/v1/fine_tuning/jobs/{job_id}/resume", headers=auth(key)).json()["status"] == "queued"
        _tick(st)
        assert st.launcher.submitted == [f"{job_id}-a1"] and st.job(job_id).status == "running"
