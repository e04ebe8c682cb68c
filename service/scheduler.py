"""The job scheduler: one active leader across API replicas, fair share, launching, ingestion, reconciliation.

Every API process runs a ``Scheduler`` thread; each tick it tries to take or renew the ``scheduler`` lease row
(``repository.acquire_lease``) and does work only while it holds it. A tick:

1. re-submits files stuck in ``uploaded`` (their validator died with a previous process);
2. moves ``validating_files`` jobs to ``queued`` (files valid) or ``failed`` (a file has errors);
3. ingests each running job's run directory (``qwenvl_core.runs.RunDir``): new events, progress, and at the
   end ``result.json`` -> ``succeeded`` (adapter registered as ``ft:{base}:{tenant}:{suffix}:{job_id}``, the
   ``on_adapter_ready`` hooks told) / ``failed`` / ``cancelled``;
4. reconciles: a running job whose Ray job ended (or vanished) without a result is re-queued while attempts
   remain (``max_job_attempts``), else failed; a cancel not honoured within ``cancel_grace_s`` is stopped;
5. launches queued jobs while fewer than ``max_running_jobs`` run, always from the tenant with the fewest
   running jobs (ties: the oldest job), so one tenant's backlog cannot starve the others.

All state lives in the database and the run directories, so a restarted process resumes where the last left.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from qwenvl_core.runs import RunDir
from service import repository as repo
from service.context import AdapterReady
from service.jobspec import build_spec
from service.launcher import TERMINAL, Launcher, LauncherUnavailable
from service.models import Job
from service.settings import Settings
from service.storage import TenantStorage
from service.validation import Validator

log = logging.getLogger(__name__)
LEASE = "scheduler"
_PROGRESS_KEYS = ("step", "total_steps", "epoch", "loss", "learning_rate", "tokens_per_second",
                  "samples_per_second", "eta_seconds", "trained_tokens")
_STALE_UPLOAD_S = 30


class Scheduler:
    """See the module docstring. ``tick()`` is one pass; ``start()`` runs it on a thread every interval."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], storage: TenantStorage,
                 validator: Validator, launcher: Launcher | None,
                 notify: Callable[[AdapterReady], None]) -> None:
        self.settings, self.sessions, self.storage = settings, sessions, storage
        self.validator, self.launcher, self.notify = validator, launcher, notify
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready: list[AdapterReady] = []

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
        with self.sessions() as s, s.begin():
            return repo.acquire_lease(s, name=LEASE, holder=self.holder, ttl_s=self.settings.lease_ttl_s)

    def tick(self) -> bool:
        """One pass (module docstring); False when another process leads."""
        if not self.is_leader():
            return False
        self._revalidate_stale_files()
        self._advance_validating()
        for job_id in self._ids_in("running"):
            self._ingest(job_id)
        self._launch_queued()
        return True

    def _ids_in(self, state: str) -> list[str]:
        with self.sessions() as s:
            return [j.id for j in repo.jobs_in_states(s, states=[state])]

    # ----- files and validating jobs ------------------------------------------------------------------------
    def _revalidate_stale_files(self) -> None:
        with self.sessions() as s:
            stale = [f.id for f in repo.files_to_validate(s) if f.created_at < repo.now() - _STALE_UPLOAD_S]
        for file_id in stale:
            if not self.validator.in_flight(file_id):
                self.validator.submit(file_id)

    def _advance_validating(self) -> None:
        with self.sessions() as s, s.begin():
            for job in repo.jobs_in_states(s, states=["validating_files"]):
                self._advance_one(s, job)

    def _advance_one(self, s: Session, job: Job) -> None:
        for param, file_id in (("training_file", job.training_file), ("validation_file", job.validation_file)):
            row = repo.file_by_id(s, file_id=file_id) if file_id else None
            if file_id and row is None:
                self._fail(s, job, "file_not_found", f"{param} {file_id} was deleted", param)
                return
            if row is not None and row.status == "error":
                first = ((row.validation or {}).get("errors") or [{}])[0]
                detail = first.get("text") or first.get("message") or "the file is invalid"
                self._fail(s, job, "invalid_file", f"{param} {file_id} failed validation: {detail}", param)
                return
            if row is not None and row.status != "processed":
                return
        job.status = "queued"
        self._event(s, job, "Files validated; job queued")

    # ----- ingestion and reconciliation ---------------------------------------------------------------------
    def _ingest(self, job_id: str) -> None:
        with self.sessions() as s:
            job = repo.job_by_id(s, job_id=job_id)
            if job is None:
                return
            submission, cancel_at = job.submission_id, job.cancel_requested_at
        try:
            ray_status = self.launcher.status(submission) if self.launcher and submission else "UNKNOWN"
        except LauncherUnavailable as exc:
            log.warning("cannot reconcile %s: %s", job_id, exc)
            ray_status = "UNKNOWN"
        run = RunDir(job.output_uri)
        events, result = run.read_events(job.last_event_seq), run.read_result()
        with self.sessions() as s, s.begin():
            job = repo.job_by_id(s, job_id=job_id)
            if job is None or job.status != "running":
                return
            self._store_events(s, job, events)
            if result is not None:
                self._finish(s, job, result, run)
            elif ray_status is None or ray_status in TERMINAL:
                self._died(s, job, ray_status)
            elif cancel_at is not None and time.time() - cancel_at > self.settings.cancel_grace_s and self.launcher:
                self.launcher.stop(submission or "")
        while self._ready:
            self.notify(self._ready.pop(0))

    def _store_events(self, s: Session, job: Job, events: list[Any]) -> None:
        if not events:
            return
        rows = [{"seq": e.seq, "created_at": int(e.created_at), "level": e.level, "type": e.type,
                 "message": e.message, "data": e.data} for e in events]
        repo.add_events(s, job_id=job.id, events=rows)
        job.last_event_seq = max(job.last_event_seq, *(e.seq for e in events))
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
        if result.get("trained_tokens") is not None:
            job.trained_tokens = int(result["trained_tokens"])
        job.result_files = [self._result_file(s, job, run)]
        if state == "succeeded":
            self._succeed(s, job, run)
        elif state == "cancelled" or job.cancel_requested_at is not None:
            self._end(s, job, "cancelled", "Job cancelled")
        else:
            err = result.get("error") or {}
            message = err.get("message") if isinstance(err, dict) else str(err)
            code = err.get("code", "training_failed") if isinstance(err, dict) else "training_failed"
            self._fail(s, job, code, message or "training failed", None)

    def _result_file(self, s: Session, job: Job, run: RunDir) -> str:
        key = self.storage.key_of_uri(run.uri_of("result.json"))
        row = repo.add_file(s, file_id=repo.new_id("file"), tenant_id=job.tenant_id, filename="result.json",
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
        repo.add_model(s, model_id=model_id, tenant_id=job.tenant_id, base_model=job.model, job_id=job.id,
                       adapter_uri=adapter_uri)
        job.fine_tuned_model = model_id
        self._end(s, job, "succeeded", f"Job succeeded; model {model_id} is ready")
        ready = AdapterReady(model_id=model_id, tenant_id=job.tenant_id, base_model=job.model,
                             base_model_path=self.settings.base_models.get(job.model, job.model),
                             adapter_uri=adapter_uri, job_id=job.id)
        self._ready.append(ready)  # told after the transaction commits (see _ingest)

    def _died(self, s: Session, job: Job, ray_status: str | None) -> None:
        what = f"Ray job {job.submission_id} ended ({ray_status or 'vanished'}) without a result"
        if job.cancel_requested_at is not None:
            self._end(s, job, "cancelled", f"Job cancelled ({what})")
        elif job.attempt < self.settings.max_job_attempts:
            job.status, job.submission_id = "queued", None
            self._event(s, job, f"{what}; re-queued (attempt {job.attempt} of {self.settings.max_job_attempts})",
                        level="warn")
        else:
            self._fail(s, job, "job_died", f"{what} after {job.attempt} attempt(s)", None)

    # ----- launching ----------------------------------------------------------------------------------------
    def _launch_queued(self) -> None:
        if self.launcher is None:
            return
        while True:
            with self.sessions() as s:
                running = repo.running_per_tenant(s)
                if sum(running.values()) >= self.settings.max_running_jobs:
                    return
                queued = list(repo.jobs_in_states(s, states=["queued"]))
            if not queued:
                return
            pick = min(queued, key=lambda j: (running.get(j.tenant_id, 0), j.pk))
            if not self._launch(pick.id):
                return

    def _launch(self, job_id: str) -> bool:
        with self.sessions() as s, s.begin():
            job = repo.job_by_id(s, job_id=job_id)
            if job is None or job.status != "queued":
                return True
            spec_uri = self._write_spec(s, job)
            submission = f"{job.id}-a{job.attempt + 1}"
            try:
                assert self.launcher is not None
                self.launcher.submit(submission, spec_uri)
            except LauncherUnavailable as exc:
                log.warning("cannot launch %s yet: %s", job.id, exc)
                return False
            job.status, job.submission_id, job.attempt = "running", submission, job.attempt + 1
            job.started_at = job.started_at or repo.now()
            self._event(s, job, f"Job started on Ray (submission {submission})")
        return True

    def _write_spec(self, s: Session, job: Job) -> str:
        train = repo.file_by_id(s, file_id=job.training_file)
        val = repo.file_by_id(s, file_id=job.validation_file) if job.validation_file else None
        assert train is not None
        spec = build_spec(job_id=job.id, tenant_id=job.tenant_id,
                          base_model_path=self.settings.base_models.get(job.model, job.model),
                          train_uri=self.storage.uri_of_key(train.storage_key),
                          validation_uri=self.storage.uri_of_key(val.storage_key) if val else None,
                          output_uri=job.output_uri, seed=job.seed, hyperparameters=job.request["hyperparameters"],
                          ext=job.request.get("extensions", {}),
                          tracking_uri=self.settings.mlflow_tracking_uri)
        run = RunDir(job.output_uri)
        run.write_json("spec.json", spec.model_dump(mode="json"))
        return run.uri_of("spec.json")

    # ----- state changes ------------------------------------------------------------------------------------
    def _event(self, s: Session, job: Job, message: str, level: str = "info") -> None:
        add_service_event(s, job, message, level)

    def _end(self, s: Session, job: Job, state: str, message: str) -> None:
        job.status, job.finished_at = state, repo.now()
        job.estimated_finish = None
        self._event(s, job, message)

    def _fail(self, s: Session, job: Job, code: str, message: str, param: str | None) -> None:
        job.error = {"code": code, "message": message, "param": param}
        job.status, job.finished_at = "failed", repo.now()
        self._event(s, job, f"Job failed: {message}", level="error")


def add_service_event(s: Session, job: Job, message: str, level: str = "info") -> None:
    """An event written by the service itself (negative seq, never colliding with the run's events)."""
    seq = repo.next_service_seq(s, job_id=job.id)
    repo.add_events(s, job_id=job.id, events=[{"seq": seq, "created_at": repo.now(), "level": level,
                                               "type": "message", "message": message, "data": {}}])
