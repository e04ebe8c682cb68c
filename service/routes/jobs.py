"""``/v1/fine_tuning``: create, list, get and cancel jobs; their events and checkpoints; the estimate."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from sqlalchemy.orm import Session

from qwenvl_core.runs import RunDir
from service import repository as repo
from service.deps import Ctx, SessionDep, StorageDep, TenantDep
from service.errors import InvalidRequest, QuotaExceeded
from service.jobspec import build_spec, extensions, resolved_hyperparameters
from service.models import Tenant
from service.scheduler import add_service_event
from service.schemas import (
    CheckpointList,
    EstimatePublic,
    EstimateRequest,
    EventList,
    JobCreate,
    JobList,
    JobPublic,
    checkpoint_public,
    event_public,
    job_public,
)
from service.settings import Settings
from service.validation import run_worker

router = APIRouter(prefix="/v1/fine_tuning", tags=["fine-tuning"])


def _check_model(s: Session, settings: Settings, tenant: Tenant, model: str) -> str:
    """The base model's path; 404 for unknown models (and for other tenants' ft: models)."""
    if model in settings.base_models:
        return settings.base_models[model]
    repo.get_model(s, tenant_id=tenant.id, model_id=model)
    raise InvalidRequest(f"model {model!r}: fine-tuning a fine-tuned model is not supported yet; use its base",
                         param="model", code="model_not_supported")


def _check_file(s: Session, tenant: Tenant, file_id: str, param: str) -> None:
    row = repo.get_file(s, tenant_id=tenant.id, file_id=file_id, param=param)
    if row.purpose != "fine-tune":
        raise InvalidRequest(f"{param} {file_id} has purpose {row.purpose!r}, not 'fine-tune'", param=param)
    if row.status == "error":
        raise InvalidRequest(f"{param} {file_id} failed validation; see GET /v1/files/{file_id}", param=param,
                             code="invalid_file")


@router.post("/jobs", operation_id="fine-tuning-jobs-create")
def create_job(body: JobCreate, tenant: TenantDep, session: SessionDep, storage: StorageDep, ctx: Ctx) -> JobPublic:
    """Create a job; it waits in validating_files until its files are validated, then queues."""
    base_path = _check_model(session, ctx.settings, tenant, body.model)
    _check_file(session, tenant, body.training_file, "training_file")
    if body.validation_file:
        if body.validation_file == body.training_file:
            raise InvalidRequest("validation_file must differ from training_file", param="validation_file")
        _check_file(session, tenant, body.validation_file, "validation_file")
    if repo.count_active_jobs(session, tenant_id=tenant.id) >= tenant.max_active_jobs:
        raise QuotaExceeded(f"concurrent job quota reached: {tenant.max_active_jobs} unfinished jobs allowed; wait "
                            "for one to finish or cancel one", code="concurrent_jobs_quota_exceeded")
    job_id, seed = repo.new_id("ftjob"), body.seed if body.seed is not None else secrets.randbelow(2**31)
    hp, ext = resolved_hyperparameters(body), extensions(body)
    output_uri = storage.run_uri(tenant.id, job_id)
    build_spec(job_id=job_id, tenant_id=tenant.id, base_model_path=base_path, train_uri="check",
               validation_uri=None, output_uri=output_uri, seed=seed, hyperparameters=hp, ext=ext)
    job = repo.add_job(session, id=job_id, tenant_id=tenant.id, model=body.model, training_file=body.training_file,
                       validation_file=body.validation_file, suffix=body.suffix, seed=seed, meta=body.metadata,
                       request={"hyperparameters": hp, "extensions": ext, "integrations": body.integrations},
                       output_uri=output_uri)
    add_service_event(session, job, f"Created fine-tuning job: {job_id}")
    ctx.scheduler.wake()
    return job_public(job)


@router.get("/jobs", operation_id="fine-tuning-jobs-list")
def list_jobs(request: Request, tenant: TenantDep, session: SessionDep, after: str | None = None,
              limit: Annotated[int, Query(ge=1, le=100)] = 20) -> JobList:
    """Newest first; ``metadata[key]=value`` query parameters filter."""
    meta = {k[9:-1]: v for k, v in request.query_params.items() if k.startswith("metadata[") and k.endswith("]")}
    rows, more = repo.list_jobs(session, tenant_id=tenant.id, limit=limit, after=after, metadata=meta or None)
    return JobList.of([job_public(r) for r in rows], more)


@router.get("/jobs/{fine_tuning_job_id}", operation_id="fine-tuning-jobs-retrieve")
def get_job(fine_tuning_job_id: str, tenant: TenantDep, session: SessionDep) -> JobPublic:
    return job_public(repo.get_job(session, tenant_id=tenant.id, job_id=fine_tuning_job_id))


@router.post("/jobs/{fine_tuning_job_id}/cancel", operation_id="fine-tuning-jobs-cancel")
def cancel_job(fine_tuning_job_id: str, tenant: TenantDep, session: SessionDep, ctx: Ctx) -> JobPublic:
    """Queued jobs are cancelled at once; a running job is asked to stop (``cancel_requested``)."""
    job = repo.get_job(session, tenant_id=tenant.id, job_id=fine_tuning_job_id)
    if job.status in ("succeeded", "failed", "cancelled"):
        raise InvalidRequest(f"job {job.id} is already {job.status}", param="fine_tuning_job_id",
                             code="job_not_cancellable")
    if job.status == "running":
        if job.cancel_requested_at is None:
            job.cancel_requested_at = float(repo.now())
            RunDir(job.output_uri).request_cancel()
            add_service_event(session, job, "Cancellation requested")
    else:
        job.status, job.finished_at = "cancelled", repo.now()
        add_service_event(session, job, "Job cancelled")
    ctx.scheduler.wake()
    return job_public(job)


@router.get("/jobs/{fine_tuning_job_id}/events", operation_id="fine-tuning-jobs-events")
def list_events(fine_tuning_job_id: str, tenant: TenantDep, session: SessionDep, after: str | None = None,
                limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> EventList:
    """Newest first; ``type`` is ``message`` or ``metrics`` (``data.kind`` keeps the run's own kind)."""
    job = repo.get_job(session, tenant_id=tenant.id, job_id=fine_tuning_job_id)
    rows, more = repo.list_events(session, job_id=job.id, limit=limit, after=after)
    return EventList(data=[event_public(r) for r in rows], has_more=more)


@router.get("/jobs/{fine_tuning_job_id}/checkpoints", operation_id="fine-tuning-jobs-checkpoints")
def list_checkpoints(fine_tuning_job_id: str, tenant: TenantDep, session: SessionDep, after: str | None = None,
                     limit: Annotated[int, Query(ge=1, le=100)] = 10) -> CheckpointList:
    job = repo.get_job(session, tenant_id=tenant.id, job_id=fine_tuning_job_id)
    after_event = f"ftevent-{after.removeprefix('ftckpt-')}" if after else None
    rows, more = repo.list_events(session, job_id=job.id, limit=limit, after=after_event, types=["checkpoint"],
                                  latest_per_step=True)
    base = job.fine_tuned_model or f"ft:{job.model}:{tenant.name}:{job.suffix or ''}:{job.id}"
    return CheckpointList.of([checkpoint_public(r, base) for r in rows], more)


@router.post("/estimate", operation_id="fine-tuning-estimate")
def estimate(body: EstimateRequest, tenant: TenantDep, session: SessionDep, storage: StorageDep,
             ctx: Ctx) -> EstimatePublic:
    """Tokens (text + image) and time of a fine-tune, counted with the base model's tokenizer; no compute used."""
    base_path = _check_model(session, ctx.settings, tenant, body.model)
    row = repo.get_file(session, tenant_id=tenant.id, file_id=body.training_file, param="training_file")
    if not Path(base_path).is_dir():
        raise InvalidRequest(f"model {body.model!r}: its tokenizer directory {base_path!r} is not available to the "
                             "control plane, so tokens cannot be counted", param="model", code="estimate_unavailable")
    tps = body.tokens_per_second or ctx.settings.estimate_tokens_per_second
    out = run_worker(storage, row.storage_key, row.filename, ctx.settings.validation_timeout_s,
                     model_dir=base_path, epochs=body.n_epochs, tokens_per_second=tps)
    report, est = out["report"], out.get("estimate")
    if est is None:
        first = (report.get("errors") or [{}])[0]
        raise InvalidRequest(f"training_file {row.id} is not valid: {first.get('text', 'see its report')}",
                             param="training_file", code="invalid_file")
    stats = report["stats"]
    return EstimatePublic(model=body.model, training_file=row.id, samples=stats["samples"], images=stats["images"],
                          total_tokens=stats["total_tokens"], supervised_tokens=stats.get("supervised_tokens"),
                          epochs=est["epochs"], estimated_train_tokens=est["estimated_train_tokens"],
                          tokens_per_second=est["tokens_per_second"], estimated_seconds=est["estimated_seconds"])
