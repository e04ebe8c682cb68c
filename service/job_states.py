"""The job state machine: the legal moves of ``Job.status`` as data, and the one way to make a move.

Every writer of a job's state (the scheduler, the cancel, pause and resume routes) goes through ``transition``
(status moves), ``request_cancel`` (the cancel flag of a running job) or ``request_pause`` (its pause flag). All are
a compare-and-set: a conditional
``UPDATE jobs ... WHERE id = :id AND status = :expected`` whose row count says whether this writer won. A writer
that loses (the row moved meanwhile, e.g. a cancel and a launch at the same moment) gets False and must re-read;
it never overwrites the winner. ``IllegalTransition`` is a programming error (a move the table does not allow).
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from service import repository as repo
from service.models import Job

TRANSITIONS: dict[str, frozenset[str]] = {
    "validating_files": frozenset({"queued", "failed", "cancelled", "paused"}),
    "queued": frozenset({"running", "cancelled", "failed", "paused"}),
    # running -> queued: the attempt died without a result (or its submission failed) and the job is re-queued;
    # running -> paused: its run stopped after a pause request (checkpoint written), its Ray job has ended
    "running": frozenset({"succeeded", "failed", "cancelled", "queued", "paused"}),
    # paused -> the state it was paused in (``Job.paused_from``; a paused running job resumes as queued)
    "paused": frozenset({"validating_files", "queued", "cancelled"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}
STATES = frozenset(TRANSITIONS)
TERMINAL = frozenset(state for state, moves in TRANSITIONS.items() if not moves)


class IllegalTransition(ValueError):
    """A move the table does not allow (a bug in the caller, never a race)."""


def check(source: str, target: str) -> None:
    """Raise ``IllegalTransition`` unless ``source -> target`` is in the table."""
    if source not in STATES or target not in STATES:
        raise IllegalTransition(f"unknown job state in {source!r} -> {target!r}")
    if target not in TRANSITIONS[source]:
        raise IllegalTransition(f"a job cannot move from {source} to {target}")


def transition(s: Session, job: Job, target: str, *, expected: str | None = None, conditions: tuple[Any, ...] = (),
               **values: Any) -> bool:
    """Move ``job`` from ``expected`` (default: the status it was read with) to ``target`` and set ``values``, only
    if the row still has that status (and ``conditions`` hold). True when this call made the move; the in-memory
    ``job`` then carries the written values. A terminal target also sets ``finished_at`` and clears
    ``estimated_finish`` and a pending pause request."""
    source = expected or job.status
    check(source, target)
    if target in TERMINAL:
        values = {"finished_at": repo.now(), "estimated_finish": None, "pause_requested_at": None, **values}
    return _write(s, job, source, conditions, {"status": target, **values})


def request_cancel(s: Session, job: Job, *, at: float | None = None) -> bool:
    """Set the cancel flag of a running job (compare-and-set: still running, not yet flagged). True when this call
    set it; the caller then writes ``CANCEL`` into the run directory."""
    return _write(s, job, "running", (Job.cancel_requested_at.is_(None),),
                  {"cancel_requested_at": float(at if at is not None else time.time())})


def request_pause(s: Session, job: Job, *, at: float | None = None) -> bool:
    """Set the pause flag of a running job (compare-and-set: still running, neither pause nor cancel requested).
    True when this call set it; the caller then writes ``PAUSE`` into the run directory."""
    return _write(s, job, "running", (Job.pause_requested_at.is_(None), Job.cancel_requested_at.is_(None)),
                  {"pause_requested_at": float(at if at is not None else time.time())})


def resume_target(job: Job) -> str:
    """Where ``resume`` moves a paused job: the state it was paused in, ``queued`` for a job paused while running
    (it is launched again and continues from its checkpoint)."""
    return "validating_files" if job.paused_from == "validating_files" else "queued"


def _write(s: Session, job: Job, status: str, conditions: tuple[Any, ...], values: dict[str, Any]) -> bool:
    s.flush()  # pending attribute changes go first, so the conditional UPDATE is the last word
    if not repo.update_job_if(s, job_id=job.id, status=status, conditions=conditions, values=values):
        return False
    for key, value in values.items():  # mirror the row without marking the object dirty (no second UPDATE)
        set_committed_value(job, key, value)
    return True
