"""Pause and resume of fine-tuning jobs, as the API asks for them (``POST /v1/fine_tuning/jobs/{id}/pause``,
``.../resume``); the scheduler does the rest (``service.scheduler``: a running job's stop, its move to ``paused``).

- A ``validating_files`` or ``queued`` job is paused at once (``paused``): it is never launched while paused.
- A ``running`` job gets its pause flag (``job_states.request_pause``) and ``PAUSE`` in its run directory; the run
  stops at its next optimizer step with a checkpoint of that step (the same stop as a cancel, so a pause costs at
  most one step), its Ray job ends, and the scheduler moves it to ``paused``: its cluster slot is free. A run that
  has not stopped within ``pause_grace_s`` is stopped by the scheduler; it then resumes from its latest periodic
  checkpoint.
- ``resume`` moves a paused job back to the state it left (``job_states.resume_target``: a running job is queued and
  launched again; Ray Train restores its latest checkpoint, the trainer continues exactly from it).
- Terminal jobs cannot be paused, a job being cancelled cannot be paused, only a paused job can be resumed: 400
  naming the state. Pausing a paused job (or one whose pause is pending) changes nothing.

Every move is a compare-and-set (``service.job_states``); a route that loses to the scheduler re-reads the job and
decides again.
"""

from __future__ import annotations

import time

from sqlalchemy.orm import Session

from qwenvl_core.runs import RunDir
from service import job_states
from service.errors import Conflict, InvalidRequest
from service.models import Job
from service.scheduler import add_service_event

_TRIES = 5  # a job moves at most validating -> queued -> running between two reads
PARAM = "fine_tuning_job_id"


def pause(s: Session, job: Job) -> Job:
    """Pause ``job`` (see the module docstring); the job as it is afterwards."""
    for _ in range(_TRIES):
        if job.status in job_states.TERMINAL:
            raise InvalidRequest(f"job {job.id} is {job.status}: only a validating_files, queued or running job can "
                                 "be paused", param=PARAM, code="job_not_pausable")
        if job.status == "running" and job.cancel_requested_at is not None:
            raise InvalidRequest(f"job {job.id} is being cancelled and cannot be paused", param=PARAM,
                                 code="job_not_pausable")
        if job.status == "paused" or (job.status == "running" and job.pause_requested_at is not None):
            return job
        if job.status == "running":
            if job_states.request_pause(s, job):
                RunDir(job.output_uri).request_pause()
                add_service_event(s, job, "Pause requested: the run stops at its next step with a checkpoint")
                return job
        elif job_states.transition(s, job, "paused", paused_from=job.status, paused_at=time.time()):
            add_service_event(s, job, f"Job paused (it was {job.paused_from}); resume it to continue")
            return job
        s.refresh(job)  # the scheduler moved it meanwhile: decide again on the current state
    raise Conflict(f"job {job.id} kept changing state while being paused; retry", param=PARAM,
                   code="job_state_changed")


def resume(s: Session, job: Job) -> Job:
    """Resume a paused ``job``: back to the state it was paused in (a paused running job is queued again)."""
    for _ in range(_TRIES):
        if job.status != "paused":
            pending = " (its pause is still in progress)" if job.pause_requested_at is not None and \
                job.status == "running" else ""
            raise InvalidRequest(f"job {job.id} is {job.status}{pending}, not paused: only a paused job can be "
                                 "resumed", param=PARAM, code="job_not_paused")
        target = job_states.resume_target(job)
        paused_for = max(0.0, time.time() - (job.paused_at or time.time()))
        RunDir(job.output_uri).clear_pause()  # before the move: the relaunched run must not stop at once
        if job_states.transition(s, job, target, paused_from=None, paused_at=None, pause_requested_at=None,
                                 paused_s=(job.paused_s or 0.0) + (paused_for if job.started_at else 0.0)):
            add_service_event(s, job, f"Job resumed after {paused_for:.0f} s paused; {target}"
                              + (", it continues from its latest checkpoint" if job.started_at else ""))
            return job
        s.refresh(job)
    raise Conflict(f"job {job.id} kept changing state while being resumed; retry", param=PARAM,
                   code="job_state_changed")
