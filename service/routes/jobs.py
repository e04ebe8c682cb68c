"""``/v1/fine_tuning``: create, list, get, cancel, pause and resume jobs; their events and checkpoints; the
estimate."""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from qwenvl_core.runs import RunDir
from service import caps, integrations, job_states, lineage, pausing, usage
from service import repository as repo
from service.admission import cancel_on_disconnect
from service.deps import Ctx, SessionDep, StorageDep, TenantDep
from service.errors import Conflict, InvalidRequest, QuotaExceeded, TimedOut
from service.jobspec import (
    base_defaults,
    build_spec,
    check_data_format,
    check_pixel_options,
    extensions,
    resolved_hyperparameters,
)
from service.limits import EstimateBusy, EstimateSlots
from service.mlflow_tenants import provision_experiment
from service.models import File, Tenant
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
from service.validation import run_worker_async

router = APIRouter(prefix="/v1/fine_tuning", tags=["fine-tuning"])
_CANCEL_TRIES = 5  # a job moves at most validating -> queued -> running -> queued between two reads


def _check_model(s: Session, settings: Settings, tenant: Tenant, model: str
                 ) -> tuple[str, str, lineage.AdapterModel | None]:
    """(base model id, its path, the parent adapter): ``model`` is a base model, or one of the tenant's fine-tuned
    models or checkpoints to continue from (``service.lineage.parent_of``: 404 for unknown ids and other tenants'
    models, 400 for the tenant's own job that has no model yet)."""
    parent = lineage.parent_of(s, settings, tenant, model)
    base = parent.base_model if parent is not None else model
    return base, settings.base_models[base], parent


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
    base, base_path, parent = _check_model(session, ctx.settings, tenant, body.model)
    check_pixel_options(base_path, body.model, body.min_pixels, body.max_pixels)  # 400 naming the option
    _check_file(session, tenant, body.training_file, "training_file")
    if body.validation_file:
        if body.validation_file == body.training_file:
            raise InvalidRequest("validation_file must differ from training_file", param="validation_file")
        _check_file(session, tenant, body.validation_file, "validation_file")
    for param, file_id in (("training_file", body.training_file), ("validation_file", body.validation_file)):
        if file_id:  # DPO <-> preference files (400 naming the file)
            check_data_format(body, repo.get_file(session, tenant_id=tenant.id, file_id=file_id, param=param
                                                  ).validation, param, file_id)
    if repo.count_active_jobs(session, tenant_id=tenant.id) >= tenant.max_active_jobs:
        raise QuotaExceeded(f"concurrent job quota reached: {tenant.max_active_jobs} unfinished jobs allowed; wait "
                            "for one to finish or cancel one", code="concurrent_jobs_quota_exceeded")
    job_id, seed = repo.new_id("ftjob"), body.seed if body.seed is not None else secrets.randbelow(2**31)
    auto_caps = caps.auto_caps(ctx.settings, tenant)  # auto values stay within the tenant's caps
    parent_lora = lineage.parent_lora(session, parent) if parent is not None else None  # continued: its LoRA
    hp, (ext, lora_auto) = resolved_hyperparameters(body), extensions(body, base_defaults(base_path, base), auto_caps,
                                                                       parent_lora)
    output_uri = storage.run_uri(tenant.id, job_id)
    spec = build_spec(job_id=job_id, tenant_id=tenant.id, base_model_path=base_path, train_uri="check",
                      validation_uri=None, output_uri=output_uri, seed=seed, hyperparameters=hp, ext=ext,
                      caps=auto_caps, init_adapter=parent.adapter_uri if parent is not None else None)
    max_wall_clock_s = caps.check_job(ctx.settings, tenant, body, spec)  # 400 limit_exceeded
    usage.require_headroom(session, tenant)  # 403 storage_quota_exceeded
    tracked = integrations.parse(body.integrations, ctx.settings)  # 400 naming integrations[i].<field>
    if (options := integrations.mlflow_options(tracked)) is not None and options.experiment_name != "default":
        provision_experiment(ctx.settings, tenant.id, options.experiment_name)  # readable by the tenant's login
    request = {"hyperparameters": hp, "extensions": ext, "integrations": tracked}
    if parent is not None:  # lineage: the job trains the parent's base model, from the parent's adapter
        request["parent"] = lineage.parent_record(parent)
    job = repo.add_job(session, id=job_id, tenant_id=tenant.id, model=base,
                       parent_model=parent.id if parent is not None else None, training_file=body.training_file,
                       validation_file=body.validation_file, suffix=body.suffix, seed=seed, meta=body.metadata,
                       request=request, output_uri=output_uri, max_wall_clock_s=max_wall_clock_s)
    add_service_event(session, job, f"Created fine-tuning job: {job_id}")
    if parent is not None:
        add_service_event(session, job, f"Continues from {parent.id}: base model {base}, its LoRA configuration, "
                          "the adapter starts from its weights", data={"parent_model": parent.id})
    if lora_auto is not None:
        add_service_event(session, job, lora_auto)
    if spec.lora.r > ctx.settings.serve_max_lora_rank:  # trained, but not servable by this platform's servers
        add_service_event(session, job, f"lora.r {spec.lora.r} is above the model servers' max_lora_rank "
                          f"{ctx.settings.serve_max_lora_rank}: the fine-tuned model can be downloaded but not "
                          "served here (train with a lower lora.r, or have the operator raise "
                          "QWENVL_SERVE_MAX_LORA_RANK)", level="warning", data={"param": "lora.r"})
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
    """Queued jobs are cancelled at once; a running job is asked to stop (``cancel_requested``).

    Compare-and-set against the scheduler (``service.job_states``): a cancel racing a launch either wins (the job
    is cancelled and never submitted) or finds the job running and writes ``CANCEL``; it re-reads and retries when
    the row moved between its read and its write."""
    job = repo.get_job(session, tenant_id=tenant.id, job_id=fine_tuning_job_id)
    for _ in range(_CANCEL_TRIES):
        if job.status in job_states.TERMINAL:
            raise InvalidRequest(f"job {job.id} is already {job.status}", param="fine_tuning_job_id",
                                 code="job_not_cancellable")
        if job.status == "running":
            if job.cancel_requested_at is not None:
                break
            if job_states.request_cancel(session, job):
                RunDir(job.output_uri).request_cancel()
                add_service_event(session, job, "Cancellation requested")
                break
        elif job_states.transition(session, job, "cancelled"):
            add_service_event(session, job, "Job cancelled")
            break
        session.refresh(job)  # the scheduler moved it meanwhile: decide again on the current state
    else:
        raise Conflict(f"job {job.id} kept changing state while being cancelled; retry", param="fine_tuning_job_id",
                       code="job_state_changed")
    ctx.scheduler.wake()
    return job_public(job)


@router.post("/jobs/{fine_tuning_job_id}/pause", operation_id="fine-tuning-jobs-pause")
def pause_job(fine_tuning_job_id: str, tenant: TenantDep, session: SessionDep, ctx: Ctx) -> JobPublic:
    """Pause a job: a queued one at once; a running one stops at its next step with a checkpoint and frees its
    cluster slot (``pause_requested`` until then). See ``service.pausing``."""
    job = pausing.pause(session, repo.get_job(session, tenant_id=tenant.id, job_id=fine_tuning_job_id))
    ctx.scheduler.wake()
    return job_public(job)


@router.post("/jobs/{fine_tuning_job_id}/resume", operation_id="fine-tuning-jobs-resume")
def resume_job(fine_tuning_job_id: str, tenant: TenantDep, session: SessionDep, ctx: Ctx) -> JobPublic:
    """Resume a paused job: queued again, it continues exactly from its checkpoint. See ``service.pausing``."""
    job = pausing.resume(session, repo.get_job(session, tenant_id=tenant.id, job_id=fine_tuning_job_id))
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
    """Newest first; only checkpoints stored with their adapter, each a model (``fine_tuned_model_checkpoint``)
    that chat completions serve, ``/v1/models`` retrieves and downloads, and a job can continue from."""
    job = repo.get_job(session, tenant_id=tenant.id, job_id=fine_tuning_job_id)
    after_event = f"ftevent-{after.removeprefix(lineage.CHECKPOINT_ID_PREFIX)}" if after else None
    stored = RunDir(job.output_uri).checkpoint_adapter_steps(job.id)  # Ray Train removes those beyond keep
    rows, more = repo.list_events(session, job_id=job.id, limit=limit, after=after_event, types=["checkpoint"],
                                  latest_per_step=True, steps=sorted(stored), after_as=after)
    base = lineage.fine_tuned_name(job, tenant.name)
    return CheckpointList.of([checkpoint_public(r, base) for r in rows], more)


def _estimate_inputs(session: Session, settings: Settings, tenant: Tenant, body: EstimateRequest) -> tuple[str, File]:
    """The base model's directory and the training file's row; the DB connection is handed back afterwards."""
    base_path = _check_model(session, settings, tenant, body.model)[1]  # a fine-tuned model: its base's tokenizer
    row = repo.get_file(session, tenant_id=tenant.id, file_id=body.training_file, param="training_file")
    if not Path(base_path).is_dir():
        raise InvalidRequest(f"model {body.model!r}: its tokenizer directory {base_path!r} is not available to the "
                             "control plane, so tokens cannot be counted", param="model", code="estimate_unavailable")
    check_pixel_options(base_path, body.model, body.min_pixels, body.max_pixels)
    session.commit()  # the worker may run for minutes: do not hold a pooled connection meanwhile
    return base_path, row


def _pixels(body: EstimateRequest) -> dict[str, int]:
    """The job's pixel options the estimate counts image tokens with (``min_pixels`` / ``max_pixels`` set)."""
    return {k: v for k, v in (("min_pixels", body.min_pixels), ("max_pixels", body.max_pixels)) if v is not None}


@router.post("/estimate", operation_id="fine-tuning-estimate")
async def estimate(body: EstimateRequest, request: Request, tenant: TenantDep, session: SessionDep,
                   storage: StorageDep, ctx: Ctx) -> EstimatePublic:
    """Tokens (text + image) and time of a fine-tune, counted with the base model's tokenizer; no compute used.

    The count runs in a worker process, awaited without holding a request thread: one estimate per tenant at a
    time (429 ``too_many_concurrent_estimates``), ``max_concurrent_estimates`` workers per API process (later
    ones wait), ``estimate_timeout_s`` in all (504 ``estimate_timeout``). The worker is killed on timeout and
    when the client disconnects."""
    settings = ctx.settings
    base_path, row = await run_in_threadpool(_estimate_inputs, session, settings, tenant, body)
    tps = body.tokens_per_second or settings.estimate_tokens_per_second
    timeout = settings.estimate_timeout_s
    deadline = time.monotonic() + timeout
    slots: EstimateSlots = request.app.state.estimate_slots
    try:
        async with slots.hold(tenant.id, deadline):
            out = await cancel_on_disconnect(request, lambda: run_worker_async(
                storage, row.storage_key, row.filename, max(0.0, deadline - time.monotonic()), model_dir=base_path,
                epochs=body.n_epochs, tokens_per_second=tps, pixels=_pixels(body)))
    except EstimateBusy:
        raise QuotaExceeded(f"an estimate of this tenant is already running; wait for its answer (at most "
                            f"{timeout:g} s) before starting another", code="too_many_concurrent_estimates") from None
    except TimeoutError:
        raise TimedOut(f"the estimate of {row.id} did not finish within {timeout:g} s (QWENVL_ESTIMATE_TIMEOUT_S) "
                       "and was stopped; the server may be busy, retry later or estimate a smaller file",
                       param="training_file", code="estimate_timeout") from None
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
