"""``/v1/files``: upload (multipart, streamed to storage, validated right after), list, get, content, delete."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi.responses import StreamingResponse

from qwenvl_core.storage import iter_chunks
from service import repository as repo
from service.deps import Ctx, SessionDep, StorageDep, TenantDep
from service.errors import InvalidRequest, PayloadTooLarge, PermissionDenied
from service.schemas import Deleted, FileList, FilePublic, file_public
from service.storage import safe_filename

router = APIRouter(prefix="/v1/files", tags=["files"])
ACCEPTED_SUFFIXES = (".jsonl", ".json", ".zip", ".tar.gz", ".tgz")


def _check_upload(file: UploadFile, purpose: str, max_bytes: int) -> str:
    if purpose != "fine-tune":
        raise InvalidRequest(f"purpose {purpose!r} is not supported: use 'fine-tune'", param="purpose",
                             code="invalid_purpose")
    name = safe_filename(file.filename or "")
    if not name.lower().endswith(ACCEPTED_SUFFIXES):
        raise InvalidRequest(f"file {name!r}: expected one of {', '.join(ACCEPTED_SUFFIXES)}", param="file",
                             code="invalid_file_type")
    if file.size is not None and file.size > max_bytes:
        raise PayloadTooLarge(f"file {name!r} is {file.size} bytes; the limit is {max_bytes}", param="file")
    return name


@router.post("", operation_id="files-create")
def create_file(file: UploadFile, purpose: Annotated[str, Form()], tenant: TenantDep, session: SessionDep,
                storage: StorageDep, ctx: Ctx) -> FilePublic:
    """Upload a .jsonl/.json data file or a .zip/.tar.gz bundle; validation starts right after."""
    name = _check_upload(file, purpose, ctx.settings.max_upload_bytes)
    used = repo.stored_bytes(session, tenant_id=tenant.id)
    if used + (file.size or 0) > tenant.max_stored_bytes:
        raise PermissionDenied(f"storage quota exceeded: {used} of {tenant.max_stored_bytes} bytes used, the "
                               f"upload is {file.size} bytes; delete files first", code="storage_quota_exceeded")
    file_id = repo.new_id("file")
    stored = storage.put(storage.file_key(tenant.id, file_id, name), file.file)
    row = repo.add_file(session, file_id=file_id, tenant_id=tenant.id, filename=name, purpose=purpose,
                        size=stored.size, sha256=stored.sha256, storage_key=stored.key)
    session.commit()  # the validator reads the row from its own session
    ctx.validator.submit(file_id)
    return file_public(row)


@router.get("", operation_id="files-list")
def list_files(tenant: TenantDep, session: SessionDep, purpose: str | None = None,
               limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000, after: str | None = None,
               order: Literal["desc"] = "desc") -> FileList:
    rows, more = repo.list_files(session, tenant_id=tenant.id, purpose=purpose, limit=limit, after=after)
    return FileList.of([file_public(r) for r in rows], more)


@router.get("/{file_id}", operation_id="files-retrieve")
def get_file(file_id: str, tenant: TenantDep, session: SessionDep) -> FilePublic:
    """The file, its status (uploaded -> processed | error) and its validation report."""
    return file_public(repo.get_file(session, tenant_id=tenant.id, file_id=file_id))


@router.get("/{file_id}/content", operation_id="files-content",
            responses={200: {"content": {"application/octet-stream": {}}}})
def file_content(file_id: str, tenant: TenantDep, session: SessionDep, storage: StorageDep) -> StreamingResponse:
    row = repo.get_file(session, tenant_id=tenant.id, file_id=file_id)
    stream = storage.open(row.storage_key)
    headers = {"Content-Disposition": f'attachment; filename="{row.filename}"', "Content-Length": str(row.bytes)}
    return StreamingResponse(iter_chunks(stream), media_type="application/octet-stream", headers=headers)


@router.delete("/{file_id}", operation_id="files-delete")
def delete_file(file_id: str, tenant: TenantDep, session: SessionDep, storage: StorageDep) -> Deleted:
    row = repo.delete_file(session, tenant_id=tenant.id, file_id=file_id)
    if row.purpose == "fine-tune":  # result files live in run directories and go with the job's run
        storage.delete(row.storage_key)
    return Deleted(id=file_id, object="file")
