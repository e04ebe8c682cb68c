"""Storage accounting: what each tenant is charged (``tenants.used_bytes``) against its ``max_stored_bytes``.

Charged are the tenant's uploads and its jobs' run directories (checkpoints, adapter, events, result):

- an upload *reserves* its bytes before its object is written (``reserve_upload``: one conditional UPDATE,
  committed, so two concurrent uploads cannot both squeeze into the last free bytes) and releases them if it
  fails; deleting a file releases them (``repository.delete_file``);
- a run is charged by ``charge_run_storage``, which lists the run directory and adds the difference to the last
  accounted size (``jobs.stored_bytes``); the scheduler calls it after ingesting checkpoint events and when a
  job finishes. Run directories are never deleted (a deleted model keeps its run), so they stay charged;
- ``reconcile`` recomputes a tenant's usage from scratch (admin endpoint): it re-lists every launched job's
  run directory, removes uploaded objects that have no file row (left by a crash between writing the object and
  inserting its row, or between deleting a row and its object) once older than ``usage_orphan_grace_s``, and
  sets ``used_bytes`` to the uploads plus the runs (plus younger row-less objects: uploads about to get their
  row). An upload whose object is not yet written when it runs goes uncounted until the next reconciliation.

A tenant at or over its quota gets 403 ``storage_quota_exceeded`` on new uploads (``reserve_upload``) and new
jobs (``require_headroom``); running jobs go on, and their outputs are still charged.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from service import repository as repo
from service.errors import PermissionDenied
from service.models import Job, Tenant
from service.storage import TenantStorage

log = logging.getLogger(__name__)


def _quota_error(used: int, limit: int, what: str) -> PermissionDenied:
    return PermissionDenied(f"storage quota exceeded: {used} of {limit} bytes used (uploads and job outputs){what}; "
                            "delete files first or ask the operator for a larger quota", code="storage_quota_exceeded")


def reserve_upload(s: Session, tenant: Tenant, size: int) -> None:
    """Charge an upload of ``size`` bytes before it is written, and commit; 403 when it does not fit."""
    if not repo.reserve_bytes(s, tenant_id=tenant.id, size=size):
        s.rollback()
        raise _quota_error(repo.used_bytes(s, tenant_id=tenant.id), tenant.max_stored_bytes,
                           f", the upload is {size} bytes")
    s.commit()


def release_upload(s: Session, tenant_id: str, size: int) -> None:
    """Give back a reservation whose upload failed (in its own transaction)."""
    s.rollback()
    repo.add_used_bytes(s, tenant_id=tenant_id, delta=-size)
    s.commit()


def require_headroom(s: Session, tenant: Tenant) -> None:
    """403 when the tenant has no storage left for a new job's outputs."""
    used = repo.used_bytes(s, tenant_id=tenant.id)
    if used >= tenant.max_stored_bytes:
        raise _quota_error(used, tenant.max_stored_bytes, "; a new job could not store its outputs")


def run_bytes(storage: TenantStorage, run_uri: str) -> int:
    """Bytes of every object under a run directory (one listing)."""
    prefix = storage.key_of_uri(run_uri).rstrip("/") + "/"
    return sum(o.size for o in storage.store.list_objects(prefix))


def charge_run_storage(s: Session, storage: TenantStorage, job: Job) -> None:
    """Charge the job's tenant for the change of the run directory's size since it was last accounted."""
    old, new = job.stored_bytes or 0, run_bytes(storage, job.output_uri)
    if new != old and repo.swap_job_stored_bytes(s, job_id=job.id, old=old, new=new):
        repo.add_used_bytes(s, tenant_id=job.tenant_id, delta=new - old)
        set_committed_value(job, "stored_bytes", new)  # already written by the swap


def sweep_orphan_uploads(s: Session, storage: TenantStorage, tenant_id: str, grace_s: float
                         ) -> tuple[list[str], int]:
    """Delete uploaded objects without a file row older than ``grace_s``; (their keys, bytes of the younger
    ones, which are most likely uploads about to insert their row and so stay charged)."""
    prefix = storage.files_prefix(tenant_id)
    objects = storage.store.list_objects(prefix)
    file_of = {o.key: o.key[len(prefix):].split("/", 1)[0] for o in objects}
    known = repo.existing_file_ids(s, tenant_id=tenant_id, file_ids=sorted(set(file_of.values())))
    cutoff = time.time() - grace_s
    removed, young = [], 0
    for obj in (o for o in objects if file_of[o.key] not in known):
        if obj.modified_at < cutoff:
            storage.delete(obj.key)
            removed.append(obj.key)
        else:
            young += obj.size
    return removed, young


def reconcile(s: Session, storage: TenantStorage, tenant_id: str, grace_s: float) -> dict[str, object]:
    """Recompute the tenant's usage (module docstring); commits. What was found, for the admin answer."""
    before = repo.used_bytes(s, tenant_id=tenant_id)
    for job in repo.launched_jobs(s, tenant_id=tenant_id):
        charge_run_storage(s, storage, job)
    s.commit()
    removed, young = sweep_orphan_uploads(s, storage, tenant_id, grace_s)
    repo.recount_used_bytes(s, tenant_id=tenant_id)
    repo.add_used_bytes(s, tenant_id=tenant_id, delta=young)
    after, uploaded = repo.used_bytes(s, tenant_id=tenant_id), repo.stored_bytes(s, tenant_id=tenant_id)
    s.commit()
    if after != before or removed:
        log.warning("usage of tenant %s reconciled: %d -> %d bytes; orphan uploads removed: %s", tenant_id, before,
                    after, removed)
    return {"tenant_id": tenant_id, "used_bytes_before": before, "used_bytes": after, "uploaded_bytes": uploaded,
            "run_bytes": after - uploaded - young, "orphans_removed": removed}
