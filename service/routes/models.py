"""``/v1/models``: base models plus the tenant's adapters; get, delete an adapter, download it as a PEFT archive."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from qwenvl_core.storage import iter_chunks
from service import repository as repo
from service.context import AdapterDeleted
from service.deps import Ctx, SessionDep, SettingsDep, StorageDep, TenantDep
from service.errors import PermissionDenied
from service.schemas import Deleted, ModelList, ModelPublic, model_public
from service.storage import TenantStorage

router = APIRouter(prefix="/v1/models", tags=["models"])
_BASE_CREATED = 1_700_000_000


def _base(model_id: str) -> ModelPublic:
    return ModelPublic(id=model_id, created=_BASE_CREATED, owned_by="system", kind="base")


@router.get("", operation_id="models-list")
def list_models(tenant: TenantDep, session: SessionDep, settings: SettingsDep) -> ModelList:
    adapters = [model_public(m, tenant.name) for m in repo.list_models(session, tenant_id=tenant.id)]
    return ModelList(data=[_base(m) for m in settings.base_models] + adapters)


@router.get("/{model_id:path}/content", operation_id="models-download",
            responses={200: {"content": {"application/gzip": {}}}})
def download_model(model_id: str, tenant: TenantDep, session: SessionDep, storage: StorageDep) -> StreamingResponse:
    """The adapter as ``.tar.gz`` of a PEFT directory (adapter_config.json, adapter_model.safetensors, ...)."""
    row = repo.get_model(session, tenant_id=tenant.id, model_id=model_id)
    archive = _archive(storage, row.adapter_uri)
    size = os.fstat(archive.fileno()).st_size
    headers = {"Content-Disposition": f'attachment; filename="{row.job_id}-adapter.tar.gz"',
               "Content-Length": str(size)}
    return StreamingResponse(_stream(archive), media_type="application/gzip", headers=headers)


def _archive(storage: TenantStorage, adapter_uri: str) -> IO[bytes]:
    """The adapter's ``.tar.gz`` as an open file whose name is already unlinked: its disk space goes with the
    handle, whatever happens to the response (error, client gone); a failed write leaves nothing either."""
    fd, tmp = tempfile.mkstemp(prefix="qwenvl-adapter-", suffix=".tar.gz")
    try:
        os.close(fd)
        storage.write_tar_gz(adapter_uri, Path(tmp), "adapter")
        return open(tmp, "rb")  # closed by _stream (or, if never iterated, when collected)
    finally:
        os.unlink(tmp)


def _stream(archive: IO[bytes]) -> Iterator[bytes]:
    with archive:
        yield from iter_chunks(archive)


@router.get("/{model_id:path}", operation_id="models-retrieve")
def get_model(model_id: str, tenant: TenantDep, session: SessionDep, settings: SettingsDep) -> ModelPublic:
    if model_id in settings.base_models:
        return _base(model_id)
    return model_public(repo.get_model(session, tenant_id=tenant.id, model_id=model_id), tenant.name)


@router.delete("/{model_id:path}", operation_id="models-delete")
def delete_model(
    model_id: str, tenant: TenantDep, session: SessionDep, settings: SettingsDep, ctx: Ctx
) -> Deleted:
    """Delete an adapter: it is no longer listed or served. Its run directory (adapter included) stays for the
    job's record and stays charged to the tenant's storage; base models cannot be deleted."""
    if model_id in settings.base_models:
        raise PermissionDenied(f"{model_id!r} is a base model and cannot be deleted", param="model")
    row = repo.get_model(session, tenant_id=tenant.id, model_id=model_id)
    row.deleted = True
    session.commit()  # unservable first (the chat route reads this flag), then evicted from the replicas
    ctx.notify_adapter_deleted(AdapterDeleted(model_id=model_id, tenant_id=tenant.id, base_model=row.base_model))
    return Deleted(id=model_id, object="model")
