"""``/v1/models``: base models plus the tenant's adapters; get, delete an adapter, download it as a PEFT archive or
(``format=merged``) as the base model with the adapter merged in (``service.merged_export``).

A job's checkpoints are models too (``ft:…:ckpt-step-N``, ``service.lineage``): retrieved and downloaded like an
adapter, not listed (a job's checkpoints list is ``/v1/fine_tuning/jobs/{id}/checkpoints``), not deletable.

Every model object says whether the chat route can serve it now (``servable``) and, when not, why
(``unservable_reason`` / ``unservable_code``): ``serving_refusal``, the decision the chat route applies too
(``mount_chat``), over ``qwenvl_core.serving.servable``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Annotated, Literal

from fastapi import APIRouter, Query
from sqlalchemy.orm import Session

from qwenvl_core.serving import servable
from service import lineage, merged_export
from service import repository as repo
from service.context import AdapterDeleted, ServiceContext
from service.deps import Ctx, SessionDep, SettingsDep, StorageDep, TenantDep
from service.downloads import ObjectResponse
from service.errors import InvalidRequest, PermissionDenied
from service.models import Tenant
from service.schemas import Deleted, ModelList, ModelPublic, model_public
from service.settings import Settings
from service.storage import TenantStorage

router = APIRouter(prefix="/v1/models", tags=["models"])
_BASE_CREATED = 1_700_000_000


def serving_refusal(ctx: ServiceContext, base_model: str, adapter_uri: str | None = None) -> servable.Refusal | None:
    """Why the base model (``adapter_uri`` None) or the adapter stored at ``adapter_uri`` on ``base_model`` cannot
    be served now by the model servers attached to this API (``ctx.served_models``); None when it can."""
    deployed = ctx.served_models() if ctx.served_models is not None else None
    if adapter_uri is None:
        return servable.base_refusal(base_model, deployed)
    families = None if deployed is None else servable.deployed_families(deployed, ctx.settings.base_models)
    return servable.adapter_refusal(base_model, adapter_uri, families, max_rank=ctx.settings.serve_max_lora_rank)


def _with_servability(model: ModelPublic, refusal: servable.Refusal | None) -> ModelPublic:
    return model.model_copy(update={"servable": refusal is None, "unservable_reason": refusal and refusal.reason,
                                    "unservable_code": refusal and refusal.code})


def _base(ctx: ServiceContext, model_id: str) -> ModelPublic:
    return _with_servability(ModelPublic(id=model_id, created=_BASE_CREATED, owned_by="system", kind="base"),
                             serving_refusal(ctx, model_id))


@router.get("", operation_id="models-list")
def list_models(tenant: TenantDep, session: SessionDep, settings: SettingsDep, ctx: Ctx) -> ModelList:
    adapters = [_with_servability(model_public(m, tenant.name), serving_refusal(ctx, m.base_model, m.adapter_uri))
                for m in repo.list_models(session, tenant_id=tenant.id)]
    return ModelList(data=[_base(ctx, m) for m in settings.base_models] + adapters)


ExportFormat = Annotated[Literal["peft", "merged"], Query(
    alias="format", description="peft: the adapter as .tar.gz of a PEFT directory; merged: the base model with the "
    "adapter merged in, as .tar of a model directory (service.merged_export)")]


@router.get("/{model_id:path}/content", operation_id="models-download",
            responses={200: {"content": {"application/gzip": {}, "application/x-tar": {}}}})
def download_model(model_id: str, tenant: TenantDep, session: SessionDep, storage: StorageDep, settings: SettingsDep,
                   export_format: ExportFormat = "peft") -> ObjectResponse:
    """The adapter (or checkpoint's adapter) as ``.tar.gz`` of a PEFT directory (adapter_config.json,
    adapter_model.safetensors, ...); ``format=merged``: the merged full model as ``.tar`` (``model/``)."""
    found = lineage.find(session, tenant.id, model_id)
    name = found.job_id if found.step is None else f"{found.job_id}-step-{found.step}"
    if export_format == "merged":
        return _merged(session, storage, settings, tenant, found, name)
    archive = _archive(storage, found.adapter_uri)
    size = os.fstat(archive.fileno()).st_size
    headers = {"Content-Disposition": f'attachment; filename="{name}-adapter.tar.gz"',
               "Content-Length": str(size)}
    return ObjectResponse(archive, media_type="application/gzip", headers=headers)


def _merged(session: Session, storage: TenantStorage, settings: Settings, tenant: Tenant, found: lineage.AdapterModel,
            name: str) -> ObjectResponse:
    """The merged export, merged first unless already stored (``service.merged_export``), streamed from storage."""
    key = merged_export.ensure_merged(session, storage, tenant, model_id=found.id, adapter_uri=found.adapter_uri,
                                      base_dir=settings.base_models.get(found.base_model), job_id=found.job_id,
                                      timeout_s=settings.merge_timeout_s)
    headers = {"Content-Disposition": f'attachment; filename="{name}-merged.tar"',
               "Content-Length": str(storage.size(key))}
    return ObjectResponse(storage.open(key), media_type="application/x-tar", headers=headers)


def _archive(storage: TenantStorage, adapter_uri: str) -> IO[bytes]:
    """The adapter's ``.tar.gz`` as an open file whose name is already unlinked: its disk space goes with the
    handle, whatever happens to the response (error, client gone); a failed write leaves nothing either."""
    fd, tmp = tempfile.mkstemp(prefix="qwenvl-adapter-", suffix=".tar.gz")
    try:
        os.close(fd)
        storage.write_tar_gz(adapter_uri, Path(tmp), "adapter")
        return open(tmp, "rb")  # closed by the response (or, if never sent, when collected)
    finally:
        os.unlink(tmp)


@router.get("/{model_id:path}", operation_id="models-retrieve")
def get_model(model_id: str, tenant: TenantDep, session: SessionDep, settings: SettingsDep, ctx: Ctx) -> ModelPublic:
    if model_id in settings.base_models:
        return _base(ctx, model_id)
    found = lineage.find(session, tenant.id, model_id)
    model = ModelPublic(id=found.id, created=found.created_at, owned_by=tenant.name,
                        kind="adapter" if found.step is None else "checkpoint", base_model=found.base_model,
                        fine_tuning_job_id=found.job_id, parent_model=found.parent_model, step_number=found.step)
    return _with_servability(model, serving_refusal(ctx, found.base_model, found.adapter_uri))


@router.delete("/{model_id:path}", operation_id="models-delete")
def delete_model(
    model_id: str, tenant: TenantDep, session: SessionDep, settings: SettingsDep, ctx: Ctx
) -> Deleted:
    """Delete an adapter: it is no longer listed or served. Its run directory (adapter included) stays for the
    job's record and stays charged to the tenant's storage; base models cannot be deleted."""
    if model_id in settings.base_models:
        raise PermissionDenied(f"{model_id!r} is a base model and cannot be deleted", param="model")
    if lineage.is_checkpoint_id(model_id):
        found = lineage.find(session, tenant.id, model_id)  # 404 unless the tenant's own
        raise InvalidRequest(f"{found.id!r} is a checkpoint of job {found.job_id}: checkpoints are kept with their job "
                             "(its last checkpoint.keep) and cannot be deleted one by one", param="model",
                             code="checkpoint_not_deletable")
    row = repo.get_model(session, tenant_id=tenant.id, model_id=model_id)
    row.deleted = True
    session.commit()  # unservable first (the chat route reads this flag), then evicted from the replicas
    ctx.notify_adapter_deleted(AdapterDeleted(model_id=model_id, tenant_id=tenant.id, base_model=row.base_model))
    return Deleted(id=model_id, object="model")
