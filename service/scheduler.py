"""The job scheduler: one active leader across API replicas, fair share, launching, ingestion, reconciliation.

Every API process runs a ``Scheduler`` thread; each tick it tries to take or renew the ``scheduler`` lease row
(``repository.take_lease``, which hands out a fencing epoch) and does work only while it holds it. A tick:

1. re-submits files stuck in ``uploaded`` (their validator died with a previous process);
2. moves ``validating_files`` jobs to ``queued`` (files valid; ``auto`` hyperparameters resolved from the training
   file's statistics and recorded on the job, with an event saying why) or ``failed`` (a file has errors or was
   deleted);
3. ingests each running job's run directory (``qwenvl_core.runs.RunDir``): new events, progress, and at the
   end ``result.json`` -> ``succeeded`` (adapter registered as ``ft:{base}:{tenant}:{suffix}:{job_id}``, the
   ``on_adapter_ready`` hooks told) / ``failed`` / ``cancelled``;
4. reconciles: a running job whose Ray job ended, or that Ray says does not exist, without a result is re-queued
   while attempts remain (``max_job_attempts``; runs ended by a pause do not count, nor a submission Ray never
   got: one with no ``submissions/{id}.json`` in its run, written once Ray accepted it), else failed; a job whose pause
   was requested is ``paused`` instead once its Ray job ended (its run stopped with a checkpoint: see
   ``service.pausing``); an unknown Ray status concludes nothing; a cancel not honoured within ``cancel_grace_s``
   (a pause within ``pause_grace_s``) is stopped; a job past its wall-clock limit (``max_wall_clock_s`` from its start, time spent
   paused not counted) is cancelled the same way and ends ``failed`` (``wall_clock_limit_exceeded``);
5. stops strays (every ``stray_check_interval_s``): a Ray job named for one of our jobs (``{job_id}-a{n}``) that
   the cluster still runs but that is not the job's current submission, the late submission of a leader that
   stopped while submitting after the job was re-queued and launched again; it would train beside the current
   attempt, in the same run directory;
6. launches queued jobs while fewer than ``max_running_jobs`` run (a paused job holds no slot), always from the tenant with the fewest
   running jobs (ties: the oldest job), so one tenant's backlog cannot starve the others.

Safety (see docs/architecture.md, "Job lifecycle"): every state move is a compare-and-set through
``service.job_states``; every transaction that writes starts by renewing the lease with the tick's epoch
(``_fenced``), so a leader that lost the lease mid-tick writes nothing more (``LeaseLost`` ends its tick). A launch
moves the job to ``running`` *before* submitting it to Ray, so a concurrent cancel either wins (nothing is
submitted) or finds the job running and writes ``CANCEL``. One job that cannot be prepared or ingested fails (or
is skipped) alone: the loop carries on with the other jobs and tenants.

All state lives in the database and the run directories, so a restarted process resumes where the last left.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from qwenvl_core import autotune
from qwenvl_core.errors import ConfigError
from qwenvl_core.runs import ADAPTER_DIR, OUTCOME_FILE, RESULT_FILE, RESULTS_CSV, RunDir, submission_marker
from service import integrations, job_states
from service import repository as repo
from service.caps import auto_caps
from service.context import AdapterReady
from service.jobspec import build_spec, parent_adapter, resolve_request
from service.launcher import TERMINAL, Launcher, LauncherUnavailable, job_of_submission, submission_id
from service.models import File, Job
from service.settings import Settings
from service.storage import TenantStorage
from service.usage import charge_run_storage
from service.validation import Validator

log = logging.getLogger(__name__)
LEASE = "scheduler"
UNKNOWN = "UNKNOWN"  # the cluster could not tell: nothing is concluded about the job
_PROGRESS_KEYS = ("step", "total_steps", "epoch", "loss", "learning_rate", "tokens_per_second",
                  "samples_per_second", "eta_seconds", "trained_tokens")
_STALE_UPLOAD_S = 30
_MAX_UNAVAILABLE = 2  # submissions refused by the cluster in one tick before launching waits for the next tick


class LeaseLost(RuntimeError):
    """This process no longer holds the scheduler lease with the epoch its tick started with."""


class LaunchError(Exception):
    """A job that cannot be launched as it is (its own fault, not the cluster's): it fails with ``code``."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def _counted_attempts(job: Job) -> int:
    """The job's runs that count against ``max_job_attempts``: not those ended by a pause, nor those that never
    reached Ray."""
    return job.attempt - job.pauses - job.unsubmitted_attempts


class Scheduler:
    """See the module docstring. ``tick()`` is one pass; ``start()`` runs it on a thread every interval."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], storage: TenantStorage,
                 validator: Validator, launcher: Launcher | None,
                 notify: Callable[[AdapterReady], None]) -> None:
        self.settings, self.sessions, self.storage = settings, sessions, storage
        self.validator, self.launcher, self.notify = validator, launcher, notify
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._epoch: int | None = None  # the lease's fencing epoch this process holds, None when not leading
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready: list[AdapterReady] = []
        self._next_stray_check = 0.0  # time.monotonic() of the next ``_stop_strays``
        self._strays_stopped: set[str] = set()

    # ----- loop ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="qwenvl-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self.sessions() as s, s.begin():
            repo.release_lease(s, name=LEASE, holder=self.holder)
        self._epoch = None

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("scheduler tick failed")
            self._wake.wait(self.settings.scheduler_interval_s)
            self._wake.clear()

    def is_leader(self) -> bool:
        """Take or renew the lease; remembers its epoch, which every write of this tick is fenced with."""
        with self.sessions() as s, s.begin():
            self._epoch = repo.take_lease(s, name=LEASE, holder=self.holder, ttl_s=self.settings.lease_ttl_s)
        return self._epoch is not None

    def tick(self) -> bool:
        """One pass (module docstring); False when another process leads or took the lease over mid-tick."""
        if not self.is_leader():
            return False
        try:
            self._revalidate_stale_files()
            self._each(self._ids_in("validating_files"), self._advance_one, "advancing")
            self._each(self._ids_in("running"), self._ingest, "ingesting")
            self._stop_strays()
            self._launch_queued()
        except LeaseLost as exc:
            log.warning("scheduler tick aborted: %s", exc)
            return False
        return True

    @contextmanager
    def _fenced(self) -> Iterator[Session]:
        """A transaction that first renews the lease with this tick's epoch; ``LeaseLost`` (and a rollback) when
        another process took it over. Every scheduler write happens inside one."""
        with self.sessions() as s, s.begin():
            epoch = self._epoch
            if epoch is None or not repo.renew_lease(s, name=LEASE, holder=self.holder, epoch=epoch,
                                                     ttl_s=self.settings.lease_ttl_s):
                self._epoch = None
                raise LeaseLost(f"{self.holder} lost the scheduler lease (epoch {epoch}) to another process")
            yield s

    def _renew(self) -> None:
        """Between units of work: renew the lease, or end the tick (``LeaseLost``)."""
        with self._fenced():
            pass

    def _each(self, job_ids: Iterable[str], work: Callable[[str], None], what: str) -> None:
        """``work`` for every job; one job's unexpected error is logged and the others still get their turn."""
        for job_id in job_ids:
            try:
                work(job_id)
            except LeaseLost:
                raise
            except Exception:
                log.exception("scheduler: %s job %s failed; carrying on with the other jobs", what, job_id)

    def _ids_in(self, state: str) -> list[str]:
        with self.sessions() as s:
            return [j.id for j in repo.jobs_in_states(s, states=[state])]

    # ----- files and validating jobs ------------------------------------------------------------------------
    def _revalidate_stale_files(self) -> None:
        with self.sessions() as s:  # the oldest uploads not waiting here yet: every tick queues a few more
            stale = [(f.id, f.tenant_id) for f in repo.files_to_validate(s, skip=self.validator.in_flight_ids())
                     if f.created_at < repo.now() - _STALE_UPLOAD_S]
        for file_id, tenant_id in stale:
            self.validator.submit(file_id, tenant_id)

    def _advance_one(self, job_id: str) -> None:
        with self.sessions() as s:
            job = repo.job_by_id(s, job_id=job_id)
            if job is None or job.status != "validating_files":
                return
            ready, problem = self._files_verdict(s, job)
        if not ready and problem is None:
            return  # a file is still being validated
        with self._fenced() as s:
            job = repo.job_by_id(s, job_id=job_id)
            if job is None:
                return
            if problem is not None:
                self._fail(s, job, *problem, expected="validating_files")
                return
            try:
                request, auto = self._resolve_auto(s, job)
            except ConfigError as exc:  # the operator's training_defaults.json: the job cannot be sized
                self._fail(s, job, "model_misconfigured", f"model {job.model!r}: {exc}", "model",
                           expected="validating_files")
                return
            except LaunchError as exc:
                self._fail(s, job, exc.code, exc.message, exc.param, expected="validating_files")
                return
            if self._move(s, job, "queued", "Files validated; job queued", expected="validating_files",
                          request=request) and auto is not None:
                add_service_event(s, job, auto.message(), data={"auto": auto.reasons, "values": auto.values})

    def _resolve_auto(self, s: Session, job: Job) -> tuple[dict[str, Any], autotune.Resolution | None]:
        """The job's request with its ``auto`` hyperparameters decided from the base model's training defaults and
        the training file's validation statistics, within the tenant's caps (``service.jobspec.resolve_request``)."""
        train = repo.file_by_id(s, file_id=job.training_file)
        stats = (train.validation or {}).get("stats") if train is not None else None
        tenant = repo.get_tenant(s, tenant_id=job.tenant_id)
        return resolve_request(job.request, self._base_dir(job), stats, auto_caps(self.settings, tenant))

    def _base_dir(self, job: Job) -> str:
        """The directory (or URI) of the job's base model. A job outlives the configuration it was created under:
        a base dropped since (the stack restarted with fewer ``--models``, ``QWENVL_BASE_MODELS`` edited) fails
        the job with a message that names it and what is offered, not with a model-load error inside Ray."""
        path = self.settings.base_models.get(job.model)
        if path is None:
            offered = ", ".join(self.settings.base_models) or "none"
            raise LaunchError("model_not_found", f"the base model {job.model!r} is no longer offered here (offered: "
                              f"{offered}); create the job again on one of them", "model")
        return path

    def _files_verdict(self, s: Session, job: Job) -> tuple[bool, tuple[str, str, str] | None]:
        """(all files processed, the first problem as (code, message, param) or None)."""
        ready = True
        for param, file_id in (("training_file", job.training_file), ("validation_file", job.validation_file)):
            row = repo.file_by_id(s, file_id=file_id) if file_id else None
            if file_id and row is None:
                return False, ("file_not_found", f"{param} {file_id} was deleted", param)
            if row is not None and row.status == "error":
                first = ((row.validation or {}).get("errors") or [{}])[0]
                detail = first.get("text") or first.get("message") or "the file is invalid"
                return False, ("invalid_file", f"{param} {file_id} failed validation: {detail}", param)
            if row is not None and row.status != "processed":
                ready = False
        return ready, None

    # ----- ingestion and reconciliation ---------------------------------------------------------------------
    def _ingest(self, job_id: str) -> None:
        with self.sessions() as s:
            job = repo.job_by_id(s, job_id=job_id)
            if job is None or job.status != "running":
                return
        self._renew()  # a unit of work starts: only a current leader reads and reconciles
        self._ready.clear()
        submission = job.submission_id
        ray_status = self._ray_status(submission)
        run = RunDir(job.output_uri)
        result = run.read_result()  # first: every event the driver wrote before its result is then read too
        events = run.read_events(job.last_event_seq)
        stop = False
        with self._fenced() as s:
            job = repo.job_by_id(s, job_id=job_id)
            if job is None or job.status != "running" or job.submission_id != submission:
                return
            self._store_events(s, job, events)
            if result is not None:
                self._finish(s, job, result, run)
            elif ray_status is None or ray_status in TERMINAL:
                self._died(s, job, ray_status, run)
            else:
                stop = self._enforce_deadlines(s, job)
        if stop and self.launcher is not None and submission:
            self.launcher.stop(submission)
        while self._ready:  # told after the transaction committed
            self.notify(self._ready.pop(0))

    def _ray_status(self, submission: str | None) -> str | None:
        """The launcher's status; ``UNKNOWN`` when it cannot tell (only None means Ray says the job does not exist)."""
        if self.launcher is None or not submission:
            return UNKNOWN
        try:
            return self.launcher.status(submission)
        except Exception as exc:  # LauncherUnavailable, or any other launcher failure: unknown, never "gone"
            log.warning("cannot reconcile %s: %s", submission, exc)
            return UNKNOWN

    def _store_events(self, s: Session, job: Job, events: list[Any]) -> None:
        if not events:
            return
        rows = [{"seq": e.seq, "created_at": int(e.created_at), "level": e.level, "type": e.type,
                 "message": e.message, "data": e.data} for e in events]
        repo.add_events(s, job_id=job.id, events=rows)
        job.last_event_seq = max(job.last_event_seq, *(e.seq for e in events))
        if any(e.type == "checkpoint" for e in events):
            charge_run_storage(s, self.storage, job)  # the tenant's storage pays for its checkpoints
        metrics = [e for e in events if e.type == "metrics" and e.data]
        if metrics:
            data = metrics[-1].data
            job.progress = {k: data[k] for k in _PROGRESS_KEYS if k in data}
            if data.get("trained_tokens") is not None:
                job.trained_tokens = int(data["trained_tokens"])
            if data.get("eta_seconds") is not None:
                job.estimated_finish = int(time.time() + float(data["eta_seconds"]))

    def _finish(self, s: Session, job: Job, result: dict[str, Any], run: RunDir) -> None:
        state = str(result.get("state", "failed"))
        charge_run_storage(s, self.storage, job)  # the run's final outputs (adapter, result) are charged
        if result.get("trained_tokens") is not None:
            job.trained_tokens = int(result["trained_tokens"])
        # OpenAI's results.csv first (clients written for OpenAI read result_files[0] as it; only a run that trained
        # has one), then result.json
        names = ([RESULTS_CSV] if run.exists(RESULTS_CSV) else []) + [RESULT_FILE]
        job.result_files = [self._result_file(s, job, run, name) for name in names]
        if state == "succeeded":  # finished, even if past a limit: the adapter is complete and kept
            self._succeed(s, job, run)
        elif state == "cancelled" or job.cancel_requested_at is not None:
            self._cancelled(s, job, "Job cancelled")
        else:
            err = result.get("error") or {}
            message = err.get("message") if isinstance(err, dict) else str(err)
            code = err.get("code", "training_failed") if isinstance(err, dict) else "training_failed"
            self._fail(s, job, code, message or "training failed", None)

    def _result_file(self, s: Session, job: Job, run: RunDir, name: str) -> str:
        key = self.storage.key_of_uri(run.uri_of(name))
        row = repo.add_file(s, file_id=repo.new_id("file"), tenant_id=job.tenant_id, filename=name,
                            purpose="fine-tune-results", size=self.storage.size(key) or 0, sha256="",
                            storage_key=key, status="processed")
        return row.id

    def _succeed(self, s: Session, job: Job, run: RunDir) -> None:
        adapter_uri = run.uri_of("adapter")
        if not run.list_names("adapter"):
            self._fail(s, job, "no_adapter", "the job reported success but wrote no adapter/", None)
            return
        tenant = repo.get_tenant(s, tenant_id=job.tenant_id)
        model_id = f"ft:{job.model}:{tenant.name}:{job.suffix or ''}:{job.id}"
        if not self._move(s, job, "succeeded", f"Job succeeded; model {model_id} is ready", fine_tuned_model=model_id):
            return
        repo.add_model(s, model_id=model_id, tenant_id=job.tenant_id, base_model=job.model, job_id=job.id,
                       adapter_uri=adapter_uri, parent_model=job.parent_model)
        ready = AdapterReady(model_id=model_id, tenant_id=job.tenant_id, base_model=job.model,
                             base_model_path=self.settings.base_models.get(job.model, job.model),
                             adapter_uri=adapter_uri, job_id=job.id)
        self._ready.append(ready)  # told after the transaction commits (see _ingest)

    def _died(self, s: Session, job: Job, ray_status: str | None, run: RunDir) -> None:
        what = f"Ray job {job.submission_id} ended ({ray_status or 'does not exist'}) without a result"
        outcome = run.read_json(OUTCOME_FILE)
        if isinstance(outcome, dict) and outcome.get("state") == "succeeded":
            # trained, adapter uploaded, then the driver died before its result: finished, not run again (nor
            # failed on a last attempt); as the driver would have recorded it
            log.warning("%s; its training had finished: recording the outcome", what)
            self._finish(s, job, {"job_id": job.id, **outcome, "adapter_uri": run.uri_of(ADAPTER_DIR)}, run)
            return
        if job.cancel_requested_at is not None:
            self._cancelled(s, job, f"Job cancelled ({what})")
        elif job.pause_requested_at is not None or run.pause_requested():
            # (PAUSE without the flag: the pause route wrote it and then lost its commit; the run stopped on it)
            self._paused(s, job)
        elif self._past_deadline(job, time.time()):
            self._fail(s, job, "wall_clock_limit_exceeded", f"{what} after its wall-clock limit of "
                       f"{job.max_wall_clock_s} s", None)
        elif ray_status is None and not run.exists(submission_marker(job.submission_id or "")):
            # A scheduler stopped between marking the job running and Ray accepting the submission: the attempt
            # never ran, so it is not counted. The next launch takes the next submission id, not this one: the
            # stopped scheduler's submission may still land (that scheduler then stops it).
            self._move(s, job, "queued", f"Ray job {job.submission_id} was never submitted (the scheduler stopped "
                       "before it); re-queued", level="warn", submission_id=None,
                       unsubmitted_attempts=job.unsubmitted_attempts + 1)
        elif _counted_attempts(job) < self.settings.max_job_attempts:
            self._move(s, job, "queued", f"{what}; re-queued (attempt {_counted_attempts(job)} of "
                       f"{self.settings.max_job_attempts})", level="warn", submission_id=None)
        else:
            self._fail(s, job, "job_died", f"{what} after {_counted_attempts(job)} attempt(s)", None)

    def _paused(self, s: Session, job: Job) -> None:
        """A run stopped on its pause request (or was stopped after ``cancel_grace_s``): ``paused``, the slot free;
        resume relaunches it and Ray Train restores its latest checkpoint."""
        s.flush()  # the events of this ingest (the pause's checkpoint) are visible to the query
        rows, _ = repo.list_events(s, job_id=job.id, limit=1, after=None, types=["checkpoint"])
        step = (rows[0].data or {}).get("step") if rows else None
        where = (f"its checkpoint of step {step} is kept and resume continues from it" if step is not None else
                 "it had no checkpoint yet, resume starts it from step 0")
        self._move(s, job, "paused", f"Job paused: its run stopped and freed its cluster slot; {where}",
                   submission_id=None, pause_requested_at=None, paused_from="running", paused_at=time.time(),
                   pauses=job.pauses + 1)

    def _cancelled(self, s: Session, job: Job, message: str) -> None:
        """A cancelled run ends ``cancelled``, or ``failed`` when the cancel was the wall-clock limit's."""
        if self._past_deadline(job, job.cancel_requested_at):
            self._fail(s, job, "wall_clock_limit_exceeded", f"the job ran past its wall-clock limit of "
                       f"{job.max_wall_clock_s} s and was stopped", None)
        else:
            self._move(s, job, "cancelled", message)

    def _past_deadline(self, job: Job, at: float | None) -> bool:
        limit = job.max_wall_clock_s
        return bool(limit and job.started_at is not None and at is not None
                    and at >= job.started_at + (job.paused_s or 0.0) + limit)

    def _enforce_deadlines(self, s: Session, job: Job) -> bool:
        """Cancel a job past its wall-clock limit; True when a requested cancel outlived ``cancel_grace_s`` (a pause
        ``pause_grace_s``) and the Ray job must be stopped."""
        now = time.time()
        if job.cancel_requested_at is None and self._past_deadline(job, now):
            if job_states.request_cancel(s, job, at=now):
                RunDir(job.output_uri).request_cancel()
                self._event(s, job, f"Wall-clock limit of {job.max_wall_clock_s} s reached; cancelling the job",
                            level="warn")
            return False
        cancel, pause = job.cancel_requested_at, job.pause_requested_at
        return ((cancel is not None and now - cancel > self.settings.cancel_grace_s)
                or (pause is not None and now - pause > self.settings.pause_grace_s))

    # ----- launching ----------------------------------------------------------------------------------------
    def _stop_strays(self) -> None:
        """Step 5 of the module docstring. A job this database does not know is left alone (another deployment's,
        on a shared cluster); the current submission is never touched, nor anything while the cluster cannot say
        what runs."""
        if self.launcher is None or time.monotonic() < self._next_stray_check:
            return
        self._next_stray_check = time.monotonic() + self.settings.stray_check_interval_s
        try:
            live = self.launcher.live_submissions()
        except LauncherUnavailable as exc:
            log.warning("cannot check the cluster for stray submissions: %s", exc)
            return
        for submission in sorted(live):
            job_id = job_of_submission(submission)
            if job_id is None:
                continue
            with self.sessions() as s:
                job = repo.job_by_id(s, job_id=job_id)
                if job is None or job.submission_id == submission:
                    continue
            with self._fenced() as s:  # (still the leader: only the leader stops anything)
                job = repo.job_by_id(s, job_id=job_id)
                if job is None or job.submission_id == submission:
                    continue
                if submission not in self._strays_stopped:  # (one event, however long Ray takes to stop it)
                    self._event(s, job, f"Stopped Ray job {submission}: a late submission of an earlier launch "
                                f"(the job's current submission is {job.submission_id or 'none'})", level="warn")
            log.warning("stopping stray submission %s of job %s", submission, job_id)
            self.launcher.stop(submission)
            self._strays_stopped.add(submission)

    def _launch_queued(self) -> None:
        """Fair-share launching. Every job is tried at most once per tick, so a job that cannot be launched never
        holds up the others; after ``_MAX_UNAVAILABLE`` refusals by the cluster the rest waits for the next tick."""
        if self.launcher is None:
            return
        tried: set[str] = set()
        unavailable = 0
        while unavailable < _MAX_UNAVAILABLE:
            with self.sessions() as s:
                running = repo.running_per_tenant(s)
                if sum(running.values()) >= self.settings.max_running_jobs:
                    return
                queued = [j for j in repo.jobs_in_states(s, states=["queued"]) if j.id not in tried]
            if not queued:
                return
            pick = min(queued, key=lambda j: (running.get(j.tenant_id, 0), j.pk))
            tried.add(pick.id)
            if not self._launch(pick.id):
                unavailable += 1

    def _launch(self, job_id: str) -> bool:
        """Launch one job; False only when the cluster refused the submission (the job is queued again)."""
        assert self.launcher is not None
        try:
            started = self._start_attempt(job_id)
        except LeaseLost:
            raise
        except Exception as exc:  # missing file, spec error, storage failure: this job fails, the others go on
            self._launch_failed(job_id, exc, expected="queued", submission=None)
            return True
        if started is None:
            return True  # it moved meanwhile (a cancel won)
        submission, spec_uri, run_uri = started
        if self._stopped_before_submit(job_id, submission):
            return True
        self._renew()  # the submission below happens under a fresh lease
        try:
            self.launcher.submit(submission, spec_uri)
        except LauncherUnavailable as exc:
            log.warning("cannot launch %s yet: %s", job_id, exc)
            self._undo_attempt(job_id, submission, str(exc))
            return False
        except Exception as exc:
            self._launch_failed(job_id, exc, expected="running", submission=submission)
            return True
        self._mark_submitted(run_uri, submission)
        try:
            self._renew()
        except LeaseLost:
            # Another leader took over during the submission and may already have found it missing and launched
            # the next attempt: stop this one rather than let two drivers share the run directory.
            log.warning("lost the scheduler lease while submitting %s; stopping that submission", submission)
            self.launcher.stop(submission)
            raise
        return True

    @staticmethod
    def _mark_submitted(run_uri: str, submission: str) -> None:
        """Record in the run directory that Ray accepted ``submission`` (``_died`` tells a job Ray lost from one it
        never got by it). Best effort: without it, a job Ray later loses is re-run without counting the attempt."""
        try:
            RunDir(run_uri).write_json(submission_marker(submission), {"submitted_at": time.time()})
        except Exception as exc:  # a storage failure: the job runs all the same
            log.warning("could not record the submission of %s: %s", submission, exc)

    def _start_attempt(self, job_id: str) -> tuple[str, str, str] | None:
        """Write the spec, then move the job queued -> running (compare-and-set) *before* anything is submitted.
        (submission id, spec URI, run directory URI), or None when the job is no longer queued."""
        with self.sessions() as s:
            job = repo.job_by_id(s, job_id=job_id)
            if job is None or job.status != "queued":
                return None
            spec_uri = self._write_spec(s, job)
            attempt = job.attempt + 1
        submission = submission_id(job_id, attempt)
        with self._fenced() as s:
            job = repo.job_by_id(s, job_id=job_id)
            if job is None or not job_states.transition(
                    s, job, "running", expected="queued", conditions=(Job.attempt == attempt - 1,),
                    submission_id=submission, attempt=attempt, started_at=job.started_at or repo.now()):
                return None
            self._event(s, job, f"Job started on Ray (submission {submission})")
            run_uri = job.output_uri
        return submission, spec_uri, run_uri

    def _stopped_before_submit(self, job_id: str, submission: str) -> bool:
        """A cancel or pause that found the job already running but not yet submitted: cancel or pause it here,
        submit nothing."""
        with self.sessions() as s:
            job = repo.job_by_id(s, job_id=job_id)
            if job is None or (job.cancel_requested_at is None and job.pause_requested_at is None):
                return False
        with self._fenced() as s:
            job = repo.job_by_id(s, job_id=job_id)
            if job is not None and job.cancel_requested_at is not None:
                self._move(s, job, "cancelled", "Job cancelled before it was submitted", expected="running",
                           conditions=(Job.submission_id == submission,))
            elif job is not None:
                self._pause_unsubmitted(s, job, submission, "Job paused before it was submitted")
        return True

    def _pause_unsubmitted(self, s: Session, job: Job, submission: str, message: str) -> None:
        """running -> paused for an attempt Ray never ran (not counted: the next launch reuses its submission id)."""
        self._move(s, job, "paused", message, expected="running", conditions=(Job.submission_id == submission,),
                   submission_id=None, attempt=job.attempt - 1, pause_requested_at=None, paused_from="queued",
                   paused_at=time.time())

    def _undo_attempt(self, job_id: str, submission: str, why: str) -> None:
        """The cluster refused the submission: back to queued (the attempt is not counted), or cancelled / paused
        when a cancel / pause arrived meanwhile."""
        with self._fenced() as s:
            job = repo.job_by_id(s, job_id=job_id)
            if job is None:
                return
            same = Job.submission_id == submission
            if job.cancel_requested_at is not None:
                self._move(s, job, "cancelled", "Job cancelled (it was never submitted)", expected="running",
                           conditions=(same,))
            elif job.pause_requested_at is not None:
                self._pause_unsubmitted(s, job, submission, "Job paused (it was never submitted)")
            else:  # a cancel (pause) landing after this read keeps it running: the next ingest finds it missing
                self._move(s, job, "queued", f"Submitting {submission} failed ({why}); re-queued", level="warn",
                           expected="running", conditions=(same, Job.cancel_requested_at.is_(None),
                                                           Job.pause_requested_at.is_(None)),
                           submission_id=None, attempt=job.attempt - 1)

    def _launch_failed(self, job_id: str, exc: Exception, *, expected: str, submission: str | None) -> None:
        if isinstance(exc, LaunchError):
            code, message, param = exc.code, exc.message, exc.param
            log.warning("job %s cannot be launched: %s", job_id, message)
        else:
            log.exception("job %s could not be launched", job_id, exc_info=exc)
            code, param = "launch_failed", None
            message = (f"the job could not be prepared for launch ({type(exc).__name__}); the service log has "
                       "the details")
        with self._fenced() as s:
            job = repo.job_by_id(s, job_id=job_id)
            if job is not None:
                same = (Job.submission_id == submission,) if submission else ()
                self._fail(s, job, code, message, param, expected=expected, conditions=same)

    def _write_spec(self, s: Session, job: Job) -> str:
        train = self._input_file(s, job, "training_file", job.training_file)
        val = self._input_file(s, job, "validation_file", job.validation_file) if job.validation_file else None
        spec = build_spec(job_id=job.id, tenant_id=job.tenant_id,
                          base_model_path=self._base_dir(job),
                          train_uri=self.storage.uri_of_key(train.storage_key),
                          validation_uri=self.storage.uri_of_key(val.storage_key) if val else None,
                          output_uri=job.output_uri, seed=job.seed, hyperparameters=job.request["hyperparameters"],
                          ext=job.request.get("extensions", {}),
                          tracking_uri=self.settings.mlflow_tracking_uri, tracking=self._tracking(s, job, train, val),
                          init_adapter=parent_adapter(job.request))  # continued training: the parent's adapter
        run = RunDir(job.output_uri)
        run.write_json("spec.json", spec.model_dump(mode="json"))
        return run.uri_of("spec.json")

    def _tracking(self, s: Session, job: Job, train: File, val: File | None) -> dict[str, Any] | None:
        """The spec's MLflow fields (integration, lineage tags, dataset inputs); None when nothing is tracked."""
        if self.settings.mlflow_tracking_uri is None:
            return None
        files = [("training", train), *([("validation", val)] if val is not None else [])]
        return integrations.job_tracking(s, self.settings, job,
                                         [(c, row, self.storage.uri_of_key(row.storage_key)) for c, row in files])

    def _input_file(self, s: Session, job: Job, param: str, file_id: str) -> File:
        """The job's file row, its object present: never a silent launch without it (a deleted validation file
        fails the job rather than dropping validation)."""
        row = repo.file_by_id(s, file_id=file_id)
        if row is None or row.tenant_id != job.tenant_id or self.storage.size(row.storage_key) is None:
            raise LaunchError("file_not_found", f"{param} {file_id} was deleted before the job could start", param)
        return row

    # ----- state changes ------------------------------------------------------------------------------------
    def _event(self, s: Session, job: Job, message: str, level: str = "info") -> None:
        add_service_event(s, job, message, level)

    def _move(self, s: Session, job: Job, state: str, message: str, *, level: str = "info",
              expected: str | None = None, conditions: tuple[Any, ...] = (), **values: Any) -> bool:
        """One state move through the state machine (compare-and-set) and its event; False when the job had
        moved on meanwhile (nothing is written then)."""
        if not job_states.transition(s, job, state, expected=expected, conditions=conditions, **values):
            log.info("job %s changed state meanwhile; the move to %s was not made", job.id, state)
            return False
        self._event(s, job, message, level)
        return True

    def _fail(self, s: Session, job: Job, code: str, message: str, param: str | None, *,
              expected: str | None = None, conditions: tuple[Any, ...] = ()) -> bool:
        return self._move(s, job, "failed", f"Job failed: {message}", level="error", expected=expected,
                          conditions=conditions, error={"code": code, "message": message, "param": param})


def add_service_event(s: Session, job: Job, message: str, level: str = "info",
                      data: dict[str, Any] | None = None) -> None:
    """An event written by the service itself (negative seq, never colliding with the run's events)."""
    seq = repo.next_service_seq(s, job_id=job.id)
    repo.add_events(s, job_id=job.id, events=[{"seq": seq, "created_at": repo.now(), "level": level,
                                               "type": "message", "message": message, "data": data or {}}])
