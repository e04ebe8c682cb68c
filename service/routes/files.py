"""``/v1/files``: upload (multipart, streamed to storage, validated right after), list, get, content, delete."""

from __future__ import annotations

import logging
import os
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Form, Query, Request, UploadFile

from service import repository as repo
from service import usage
from service.deps import Ctx, SessionDep, StorageDep, TenantDep
from service.downloads import ObjectResponse
from service.errors import Conflict, InvalidRequest, PayloadTooLarge
from service.schemas import Deleted, FileList, FilePublic, file_public
from service.storage import TenantStorage, safe_filename

router = APIRouter(prefix="/v1/files", tags=["files"])
log = logging.getLogger(__name__)
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


async def _one_of_each_part(request: Request) -> None:
    """A multipart body with two ``file`` or two ``purpose`` parts is a 400 naming the part (the form would keep
    the last one and drop the others unsaid). The form is the one the route reads (Starlette parses it once)."""
    form = await request.form()
    for part in ("file", "purpose"):
        if len(form.getlist(part)) > 1:
            raise InvalidRequest(f"the upload has {len(form.getlist(part))} {part!r} parts; send one file per upload, "
                                 "with one purpose", param=part, code="duplicate_part")


@router.post("", operation_id="files-create", dependencies=[Depends(_one_of_each_part)])
def create_file(file: UploadFile, purpose: Annotated[str, Form()], tenant: TenantDep, session: SessionDep,
                storage: StorageDep, ctx: Ctx) -> FilePublic:
    """Upload a .jsonl/.json data file or a .zip/.tar.gz bundle; validation starts right after."""
    name = _check_upload(file, purpose, ctx.settings.max_upload_bytes)
    size = _spooled_size(file)
    # Reserve (committed) -> write the object -> insert the row (committed): the file is visible only with its
    # row, and a crash in between leaves an object that is still charged (reconciliation removes it).
    usage.reserve_upload(session, tenant, size)
    file_id = repo.new_id("file")
    key = storage.file_key(tenant.id, file_id, name)
    written = False
    try:
        stored = storage.put(key, file.file)
        written = True
        row = repo.add_file(session, file_id=file_id, tenant_id=tenant.id, filename=name, purpose=purpose,
                            size=stored.size, sha256=stored.sha256, storage_key=stored.key)
        if stored.size != size:
            repo.add_used_bytes(session, tenant_id=tenant.id, delta=stored.size - size)
        session.commit()  # the validator reads the row from its own session
    except BaseException:
        usage.release_upload(session, tenant.id, size)
        if written:
            _remove_object(storage, key)
        raise
    ctx.validator.submit(file_id, tenant.id)
    return file_public(row)


def _spooled_size(file: UploadFile) -> int:
    """Bytes of the received upload (the multipart parser spooled it whole before the route runs)."""
    if file.size is not None:
        return file.size
    file.file.seek(0, os.SEEK_END)
    size = file.file.tell()
    file.file.seek(0)
    return size


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
def file_content(file_id: str, tenant: TenantDep, session: SessionDep, storage: StorageDep) -> ObjectResponse:
    row = repo.get_file(session, tenant_id=tenant.id, file_id=file_id)
    stream = storage.open(row.storage_key)
    headers = {"Content-Disposition": f'attachment; filename="{row.filename}"', "Content-Length": str(row.bytes)}
    return ObjectResponse(stream, media_type="application/octet-stream", headers=headers)


@router.delete("/{file_id}", operation_id="files-delete")
def delete_file(file_id: str, tenant: TenantDep, session: SessionDep, storage: StorageDep) -> Deleted:
    """Delete a file; 409 ``file_in_use`` (naming the jobs) while an unfinished job trains or validates on it."""
    repo.get_file(session, tenant_id=tenant.id, file_id=file_id)  # 404 for unknown and other tenants' ids
    users = repo.jobs_using_file(session, tenant_id=tenant.id, file_id=file_id)
    if users:
        raise Conflict(f"file {file_id} is used by unfinished fine-tuning job(s) {', '.join(users)}; cancel them or "
                       "wait until they finish, then delete it", param="file_id", code="file_in_use")
    row = repo.delete_file(session, tenant_id=tenant.id, file_id=file_id)  # also releases an upload's bytes
    session.commit()  # row first: a crash before the object goes leaves an orphan object (reconciliation removes
    # it), never a row pointing at nothing
    if row.purpose == repo.UPLOAD_PURPOSE:  # result files live in run directories and go with the job's run
        _remove_object(storage, row.storage_key)
    return Deleted(id=file_id, object="file")


def _remove_object(storage: TenantStorage, key: str) -> None:
    try:
        storage.delete(key)
    except Exception:  # best effort after the commit: the object is an orphan now, swept by reconciliation
        log.warning("could not remove the object %s of a deleted file", key, exc_info=True)
