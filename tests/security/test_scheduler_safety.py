"""One tenant's job can never stall the scheduler for the others (issue 15, item 3), through the real API.

Deleting a file an unfinished job uses answers 409 ``file_in_use`` naming the job. A job whose file vanished
anyway (its row removed behind the API's back, as the old delete path or a create/delete race left it), or whose
launch fails for any other reason, fails alone with a clear error; another tenant's queued job still launches in
the same tick. A vanished validation file fails the job instead of training without validation. A job whose base
model a restart no longer offers fails with ``model_not_found``. Launches go to a
launcher that records submissions (``tests/service/scheduler_harness.RecordingLauncher``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import delete, select, update

from service.models import File, Job
from tests.service.helpers import auth, upload, wait_file
from tests.service.scheduler_harness import Stack, stack


@pytest.fixture(scope="module")
def st(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("scheduler-safety")
    with stack(f"sqlite:///{root / 'db.sqlite'}", root, tiny_model_dir, max_running_jobs=8) as st:
        yield st


def _files(st: Stack, *owners: tuple[str, str]) -> list[str]:
    """Upload one file per (key, name), validated in parallel; their ids."""
    ids = [upload(st.client, key, name=name)["id"] for key, name in owners]
    for (key, _), file_id in zip(owners, ids, strict=True):
        assert wait_file(st.client, key, file_id)["status"] == "processed"
    return ids


def _job(st: Stack, key: str, **body: object) -> str:
    resp = st.client.post("/v1/fine_tuning/jobs", json={"model": "qwen-vl-tiny", **body}, headers=auth(key))
    assert resp.status_code == 200, resp.text
    return str(resp.json()["id"])


def _vanish(st: Stack, file_id: str) -> None:
    """Remove a file row and its object directly, as a delete that ignored its jobs would."""
    with st.ctx.sessions() as s, s.begin():
        row = s.scalar(select(File).where(File.id == file_id))
        assert row is not None
        st.ctx.storage.delete(row.storage_key)
        s.execute(delete(File).where(File.id == file_id))


def test_deleting_a_file_an_unfinished_job_uses_is_409(st: Stack) -> None:
    _, key = st.tenant("holder")
    [train] = _files(st, (key, "train.jsonl"))
    job_id = _job(st, key, training_file=train)
    for _ in range(2):  # validating_files, then queued
        resp = st.client.delete(f"/v1/files/{train}", headers=auth(key))
        assert resp.status_code == 409, resp.text
        err = resp.json()["error"]
        assert err["code"] == "file_in_use" and err["param"] == "file_id" and job_id in err["message"], err
        assert err["type"] == "invalid_request_error"
        st.queue_without_launching()
    assert st.job(job_id).status == "queued"
    assert st.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth(key)).json()["status"] == "cancelled"
    gone = st.client.delete(f"/v1/files/{train}", headers=auth(key))  # no unfinished job uses it any more
    assert gone.status_code == 200 and gone.json()["deleted"] is True, gone.text


def test_a_job_whose_file_vanished_fails_alone_and_other_tenants_launch(st: Stack) -> None:
    _, key_a = st.tenant("vanishing")
    _, key_b = st.tenant("bystander")
    train_a, train_b = _files(st, (key_a, "a.jsonl"), (key_b, "b.jsonl"))
    job_a = _job(st, key_a, training_file=train_a)  # older: fair share picks it first
    job_b = _job(st, key_b, training_file=train_b)
    st.queue_without_launching()
    assert st.job(job_a).status == st.job(job_b).status == "queued"
    _vanish(st, train_a)
    for _ in range(2):  # and it stays that way on the next tick: nothing keeps picking the dead job
        assert st.scheduler.tick()
    a, b = st.job(job_a), st.job(job_b)
    assert a.status == "failed" and a.error is not None, a.error
    assert a.error["code"] == "file_not_found" and a.error["param"] == "training_file" and train_a in a.error["message"]
    assert b.status == "running" and f"{job_b}-a1" in st.launcher.submitted
    assert not any(s.startswith(job_a) for s in st.launcher.submitted)


def test_a_vanished_validation_file_fails_the_job_instead_of_skipping_validation(st: Stack) -> None:
    _, key = st.tenant("validator")
    train, val = _files(st, (key, "train.jsonl"), (key, "val.jsonl"))
    job_id = _job(st, key, training_file=train, validation_file=val)
    st.queue_without_launching()
    _vanish(st, val)
    assert st.scheduler.tick()
    job = st.job(job_id)
    assert job.status == "failed" and job.error is not None
    assert job.error["code"] == "file_not_found" and job.error["param"] == "validation_file", job.error
    assert not any(s.startswith(job_id) for s in st.launcher.submitted)


def test_any_launch_error_fails_only_that_job(st: Stack) -> None:
    """A job whose spec cannot be built (here: its stored request corrupted) fails with launch_failed; another
    tenant's job queued behind it launches in the same tick."""
    _, key_a = st.tenant("broken")
    _, key_b = st.tenant("healthy")
    train_a, train_b = _files(st, (key_a, "a.jsonl"), (key_b, "b.jsonl"))
    job_a, job_b = _job(st, key_a, training_file=train_a), _job(st, key_b, training_file=train_b)
    st.queue_without_launching()
    with st.ctx.sessions() as s, s.begin():
        s.execute(update(Job).where(Job.id == job_a).values(request={"hyperparameters": "not a mapping"}))
    assert st.scheduler.tick()
    a, b = st.job(job_a), st.job(job_b)
    assert a.status == "failed" and a.error is not None and a.error["code"] == "launch_failed", a.error
    assert "service log" in a.error["message"] and "not a mapping" not in a.error["message"]  # no internals leak
    assert b.status == "running" and f"{job_b}-a1" in st.launcher.submitted


def test_jobs_on_a_base_dropped_by_a_restart_fail_clearly_and_the_others_launch(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """A restart that no longer offers a base model (``qwenvl up --models``, an edited ``QWENVL_BASE_MODELS``) fails
    that base's queued and still-validating jobs with ``model_not_found`` naming the base and what is offered,
    instead of launching them onto a model load error inside Ray; a job on a base still offered launches."""
    db_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    both = {"qwen-vl-tiny": str(tiny_model_dir), "qwen-vl-kept": str(tiny_model_dir)}
    with stack(db_url, tmp_path, tiny_model_dir, base_models=both) as before:
        tenant_id, key = before.tenant("restarted")
        queued = before.create_job(key, before.processed_file(tenant_id))
        kept = before.create_job(key, before.processed_file(tenant_id), model="qwen-vl-kept")
        before.queue_without_launching()
        assert before.job(queued).status == before.job(kept).status == "queued"
        validating = before.create_job(key, before.processed_file(tenant_id))
        assert before.job(validating).status == "validating_files"
        before.scheduler.stop()  # hands the lease over, as the shutdown of a scheduling replica does
    with stack(db_url, tmp_path, tiny_model_dir, base_models={"qwen-vl-kept": str(tiny_model_dir)}) as after:
        assert after.scheduler.tick()
        for job_id in (queued, validating):
            job = after.job(job_id)
            assert job.status == "failed" and job.error is not None, (job.status, job.error)
            assert job.error["code"] == "model_not_found" and job.error["param"] == "model", job.error
            assert "'qwen-vl-tiny'" in job.error["message"] and "qwen-vl-kept" in job.error["message"], job.error
            assert not any(s.startswith(job_id) for s in after.launcher.submitted)
        assert after.job(kept).status == "running" and f"{kept}-a1" in after.launcher.submitted
