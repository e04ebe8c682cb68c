"""Continued training and checkpoints as models: which adapter a tenant's model id names, and a job's parent.

Model ids beyond the base models (a job's ``model``, a chat completion's ``model``, ``/v1/models/{id}``):

- ``ft:{base}:{tenant}:{suffix}:{job_id}``: the adapter a succeeded job produced (the ``models`` table);
- ``ft:{base}:{tenant}:{suffix}:{job_id}:ckpt-step-{N}``: the adapter of that job's checkpoint of step N (OpenAI's
  ``fine_tuned_model_checkpoint`` shape), stored in the run directory with the checkpoint
  (``RunDir.checkpoint_adapter_uri``); a checkpoint is a model while its adapter is stored
  (``RunDir.checkpoint_has_adapter``; Ray Train keeps a job's last ``checkpoint.keep`` checkpoints);
- ``ftckpt-{ref}``: a checkpoint's id as the checkpoints list shows it: the same checkpoint model (canonical id above).

``find`` resolves any of them for one tenant; unknown ids and other tenants' ids raise the same ``NotFound``, so an
id never confirms that another tenant's model exists. ``parent_of`` is ``find`` for a fine-tuning job's ``model``:
a base model is no parent; a tenant's own job that has not (yet) produced its model is a 400 saying why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from qwenvl_core.runs import RunDir
from service import repository as repo
from service.errors import InvalidRequest, NotFound
from service.models import Job, Tenant
from service.settings import Settings

CHECKPOINT_ID_PREFIX = "ftckpt-"
CHECKPOINT_MARK = ":ckpt-step-"


@dataclass(frozen=True)
class AdapterModel:
    """A tenant's fine-tuned model: a job's final adapter (``step`` None) or one of its checkpoints."""

    id: str  # canonical: ft:… (checkpoints: ft:…:ckpt-step-N, also when found by their ftckpt- id)
    base_model: str
    job_id: str
    adapter_uri: str
    created_at: int
    step: int | None = None
    parent_model: str | None = None  # the model the job continued from


def fine_tuned_name(job: Job, tenant_name: str) -> str:
    """The model id a job produces (or will produce): ``ft:{base}:{tenant}:{suffix}:{job_id}``."""
    return job.fine_tuned_model or f"ft:{job.model}:{tenant_name}:{job.suffix or ''}:{job.id}"


def checkpoint_model_id(fine_tuned: str, step: int) -> str:
    return f"{fine_tuned}{CHECKPOINT_MARK}{step}"


def is_checkpoint_id(model_id: str) -> bool:
    return model_id.startswith(CHECKPOINT_ID_PREFIX) or CHECKPOINT_MARK in model_id


def _unknown(model_id: str, param: str) -> NotFound:
    return NotFound(f"the model {model_id!r} does not exist", param=param, code="model_not_found")


def find(s: Session, tenant_id: str, model_id: str, param: str = "model") -> AdapterModel:
    """The tenant's fine-tuned model or checkpoint ``model_id`` (module docstring); ``NotFound`` otherwise."""
    if is_checkpoint_id(model_id):
        return _checkpoint(s, tenant_id, model_id, param)
    row = repo.get_model(s, tenant_id=tenant_id, model_id=model_id, param=param)
    return AdapterModel(id=row.id, base_model=row.base_model, job_id=row.job_id, adapter_uri=row.adapter_uri,
                        created_at=row.created_at, parent_model=row.parent_model)


def _checkpoint(s: Session, tenant_id: str, model_id: str, param: str) -> AdapterModel:
    tenant = repo.get_tenant(s, tenant_id=tenant_id)
    if model_id.startswith(CHECKPOINT_ID_PREFIX):
        ref = repo.event_ref(model_id[len(CHECKPOINT_ID_PREFIX):])
        event = repo.checkpoint_event(s, ref=ref) if ref is not None else None
        job = repo.job_by_id(s, job_id=event.job_id) if event is not None else None
        if event is None or job is None or job.tenant_id != tenant_id:
            raise _unknown(model_id, param)
        step = int((event.data or {}).get("step", 0))
    else:
        fine_tuned, _, number = model_id.rpartition(CHECKPOINT_MARK)
        job, step = _job_of(s, tenant, fine_tuned), repo.decimal_id(number)
        if job is None or step is None:
            raise _unknown(model_id, param)
        event = repo.checkpoint_event(s, job_id=job.id, step=step)
        if event is None:
            raise _unknown(model_id, param)
    canonical = checkpoint_model_id(fine_tuned_name(job, tenant.name), step)
    run = RunDir(job.output_uri)
    if not run.checkpoint_has_adapter(job.id, step):
        raise NotFound(f"the checkpoint {canonical!r} is no longer stored: a job keeps its last checkpoint.keep "
                       f"checkpoints (GET /v1/fine_tuning/jobs/{job.id}/checkpoints lists them)", param=param,
                       code="model_not_found")
    return AdapterModel(id=canonical, base_model=job.model, job_id=job.id,
                        adapter_uri=run.checkpoint_adapter_uri(job.id, step), created_at=event.created_at, step=step,
                        parent_model=job.parent_model)


def _job_of(s: Session, tenant: Tenant, fine_tuned: str) -> Job | None:
    """The tenant's job whose model id is ``fine_tuned`` (``ft:…:{job_id}``), whether or not it finished."""
    parts = fine_tuned.split(":")
    if len(parts) != 5 or parts[0] != "ft":
        return None
    try:
        job = repo.get_job(s, tenant_id=tenant.id, job_id=parts[4])
    except NotFound:
        return None
    return job if fine_tuned_name(job, tenant.name) == fine_tuned else None


def parent_of(s: Session, settings: Settings, tenant: Tenant, model_id: str) -> AdapterModel | None:
    """The parent adapter of a job asked to train ``model_id``: None for a base model; 404 for unknown (and other
    tenants') ids; 400 for the tenant's own job that has no model (yet) or whose base model is no longer offered."""
    if model_id in settings.base_models:
        return None
    try:
        parent = find(s, tenant.id, model_id)
    except NotFound:
        job = None if is_checkpoint_id(model_id) else _job_of(s, tenant, model_id)
        if job is None:
            raise
        hint = f"continue from one of its checkpoints instead (GET /v1/fine_tuning/jobs/{job.id}/checkpoints)"
        if job.status == "succeeded":
            raise NotFound(f"the model {model_id!r} was deleted; {hint}", param="model",
                           code="model_not_found") from None
        if job.status in ("failed", "cancelled"):
            raise InvalidRequest(f"model {model_id!r} does not exist: its job {job.id} {job.status} before producing "
                                 f"it; {hint}", param="model", code="model_not_ready") from None
        raise InvalidRequest(f"model {model_id!r} is not ready: its job {job.id} is {job.status}; wait until it "
                             f"succeeds, or {hint}", param="model", code="model_not_ready") from None
    if parent.base_model not in settings.base_models:
        raise InvalidRequest(f"model {model_id!r}: its base model {parent.base_model!r} is no longer offered, so it "
                             "cannot be trained further", param="model", code="model_not_supported")
    return parent


def parent_lora(s: Session, parent: AdapterModel) -> dict[str, Any]:
    """The LoRA configuration the parent's job trained with (as stored on it: ``extensions.lora``)."""
    job = repo.job_by_id(s, job_id=parent.job_id)
    lora = ((job.request or {}).get("extensions") or {}).get("lora") if job is not None else None
    if not isinstance(lora, dict):
        raise InvalidRequest(f"model {parent.id!r}: the LoRA configuration it was trained with is not recorded, so it "
                             "cannot be trained further", param="model", code="model_not_supported")
    return lora


def parent_record(parent: AdapterModel) -> dict[str, Any]:
    """What a continued job stores about its parent (``request.parent``): the spec's ``init_adapter`` comes from it."""
    return {"model": parent.id, "job_id": parent.job_id, "step": parent.step, "adapter_uri": parent.adapter_uri}
