"""The only module that touches the metadata database: keyword-only functions over a ``Session``.

Lookups of tenant-owned rows always filter by ``tenant_id`` and raise ``NotFound`` otherwise, so another
tenant's ids answer exactly like ids that do not exist. Callers own transactions (``session.begin()``).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Collection, Sequence
from typing import Any

from sqlalchemy import ColumnElement, Select, case, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from service.errors import Conflict, NotFound
from service.models import ApiKey, File, Job, JobEvent, Lease, Model, Tenant

ACTIVE_JOB_STATES = ("validating_files", "queued", "running", "paused")  # paused: unfinished, resumes on its files
UPLOAD_PURPOSE = "fine-tune"  # uploaded files; other purposes (results) live in run dirs, charged with the run


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def decimal_id(text: str) -> int | None:
    """The number of an id's decimal part (a checkpoint model's step, ``ckpt-step-N``): ASCII
    digits only, at most 18 of them so that it fits the database's BIGINT; None for anything else (``²``, ``٣``,
    a 25-digit number), which callers answer as an unknown id."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None


def now() -> int:
    return int(time.time())


# ----- tenants and keys ---------------------------------------------------------------------------------------
def create_tenant(s: Session, *, name: str, max_active_jobs: int, max_stored_bytes: int,
                  limits: dict[str, Any] | None = None) -> Tenant:
    if s.scalar(select(Tenant).where(Tenant.name == name)) is not None:
        raise Conflict(f"a tenant named {name!r} already exists", param="name", code="tenant_exists")
    tenant = Tenant(id=new_id("tenant"), name=name, created_at=now(), max_active_jobs=max_active_jobs,
                    max_stored_bytes=max_stored_bytes, limits=limits or None, used_bytes=0)
    s.add(tenant)
    s.flush()
    return tenant


def update_tenant(s: Session, *, tenant_id: str, limits: dict[str, Any] | None = None,
                  max_active_jobs: int | None = None, max_stored_bytes: int | None = None) -> Tenant:
    """Set the given fields (None leaves a field as it is; ``limits`` replaces the whole override document)."""
    tenant = get_tenant(s, tenant_id=tenant_id)
    if limits is not None:
        tenant.limits = limits or None
    if max_active_jobs is not None:
        tenant.max_active_jobs = max_active_jobs
    if max_stored_bytes is not None:
        tenant.max_stored_bytes = max_stored_bytes
    s.flush()
    return tenant


def get_tenant(s: Session, *, tenant_id: str) -> Tenant:
    tenant = s.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound(f"no tenant with id {tenant_id!r}", param="tenant_id")
    return tenant


def find_tenant_by_name(s: Session, *, name: str) -> Tenant | None:
    return s.scalar(select(Tenant).where(Tenant.name == name))


def list_tenants(s: Session) -> Sequence[Tenant]:
    return s.scalars(select(Tenant).order_by(Tenant.created_at, Tenant.id)).all()


def add_key(s: Session, *, key_id: str, tenant_id: str, key_hash: str, name: str = "") -> ApiKey:
    key = ApiKey(id=key_id, tenant_id=tenant_id, key_hash=key_hash, name=name, created_at=now())
    s.add(key)
    s.flush()
    return key


def key_with_tenant(s: Session, *, key_id: str) -> tuple[ApiKey, Tenant] | None:
    """The key and its tenant in one query; None when either is missing."""
    row = s.execute(select(ApiKey, Tenant).join(Tenant, Tenant.id == ApiKey.tenant_id)
                    .where(ApiKey.id == key_id)).first()
    return (row[0], row[1]) if row is not None else None


def revoke_key(s: Session, *, key_id: str) -> ApiKey:
    key = s.get(ApiKey, key_id)
    if key is None:
        raise NotFound(f"no API key with id {key_id!r}", param="key_id")
    if key.revoked_at is None:
        key.revoked_at = now()
    return key


def list_keys(s: Session, *, tenant_id: str) -> Sequence[ApiKey]:
    return s.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.created_at)).all()


# ----- files --------------------------------------------------------------------------------------------------
def add_file(s: Session, *, file_id: str, tenant_id: str, filename: str, purpose: str, size: int, sha256: str,
             storage_key: str, status: str = "uploaded") -> File:
    row = File(id=file_id, tenant_id=tenant_id, filename=filename, purpose=purpose, bytes=size, sha256=sha256,
               storage_key=storage_key, status=status, created_at=now())
    s.add(row)
    s.flush()
    return row


def get_file(s: Session, *, tenant_id: str, file_id: str, param: str = "file_id") -> File:
    row = s.scalar(select(File).where(File.id == file_id, File.tenant_id == tenant_id))
    if row is None:
        raise NotFound(f"no file with id {file_id!r}", param=param, code="file_not_found")
    return row


def _after(query: Select[Any], id_column: Any, pk_column: Any, tenant_column: Any, tenant_id: str,
           after: str) -> Select[Any]:
    """Rows older than the row ``after`` (lists are newest first, OpenAI's cursor semantics)."""
    cursor = select(pk_column).where(id_column == after, tenant_column == tenant_id).scalar_subquery()
    return query.where(pk_column < cursor)


def list_files(s: Session, *, tenant_id: str, purpose: str | None, limit: int, after: str | None
               ) -> tuple[Sequence[File], bool]:
    query = select(File).where(File.tenant_id == tenant_id)
    if purpose:
        query = query.where(File.purpose == purpose)
    if after is not None:
        get_file(s, tenant_id=tenant_id, file_id=after, param="after")
        query = _after(query, File.id, File.pk, File.tenant_id, tenant_id, after)
    rows = s.scalars(query.order_by(File.pk.desc()).limit(limit + 1)).all()
    return rows[:limit], len(rows) > limit


def delete_file(s: Session, *, tenant_id: str, file_id: str) -> File:
    """Delete the row and, for an upload, release its bytes from the tenant's usage (same transaction). Of two
    concurrent deletes one wins; the other answers 404 and releases nothing."""
    row = get_file(s, tenant_id=tenant_id, file_id=file_id)
    gone = s.execute(delete(File).where(File.pk == row.pk).execution_options(synchronize_session=False))
    if not gone.rowcount:  # type: ignore[attr-defined]
        raise NotFound(f"no file with id {file_id!r}", param="file_id", code="file_not_found")
    s.expunge(row)
    if row.purpose == UPLOAD_PURPOSE:
        add_used_bytes(s, tenant_id=tenant_id, delta=-row.bytes)
    return row


def stored_bytes(s: Session, *, tenant_id: str) -> int:
    """Bytes of the tenant's uploaded files (result files are part of their job's run directory)."""
    return int(s.scalar(select(func.coalesce(func.sum(File.bytes), 0)).where(
        File.tenant_id == tenant_id, File.purpose == UPLOAD_PURPOSE)) or 0)


def existing_file_ids(s: Session, *, tenant_id: str, file_ids: Sequence[str]) -> set[str]:
    if not file_ids:
        return set()
    return set(s.scalars(select(File.id).where(File.tenant_id == tenant_id, File.id.in_(list(file_ids)))))


def files_to_validate(s: Session, *, skip: Collection[str] = (), limit: int = 10) -> Sequence[File]:
    """The oldest uploads still to validate, except ``skip`` (those already queued)."""
    query = select(File).where(File.status == "uploaded")
    if skip:
        query = query.where(File.id.not_in(list(skip)))
    return s.scalars(query.order_by(File.pk).limit(limit)).all()


def set_file_validation(s: Session, *, file_id: str, status: str, report: dict[str, Any]) -> None:
    s.execute(update(File).where(File.id == file_id).values(status=status, validation=report))


def file_by_id(s: Session, *, file_id: str) -> File | None:
    return s.scalar(select(File).where(File.id == file_id))


# ----- jobs ---------------------------------------------------------------------------------------------------
def add_job(s: Session, **fields: Any) -> Job:
    job = Job(created_at=now(), status="validating_files", attempt=0, last_event_seq=-1, result_files=[], **fields)
    s.add(job)
    s.flush()
    return job


def get_job(s: Session, *, tenant_id: str, job_id: str, param: str = "fine_tuning_job_id") -> Job:
    job = s.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))
    if job is None:
        raise NotFound(f"no fine-tuning job with id {job_id!r}", param=param, code="job_not_found")
    return job


def job_by_id(s: Session, *, job_id: str) -> Job | None:
    return s.scalar(select(Job).where(Job.id == job_id))


def list_jobs(s: Session, *, tenant_id: str, limit: int, after: str | None, metadata: dict[str, str] | None = None
              ) -> tuple[Sequence[Job], bool]:
    query = select(Job).where(Job.tenant_id == tenant_id)
    if after is not None:
        get_job(s, tenant_id=tenant_id, job_id=after, param="after")
        query = _after(query, Job.id, Job.pk, Job.tenant_id, tenant_id, after)
    if not metadata:
        rows = s.scalars(query.order_by(Job.pk.desc()).limit(limit + 1)).all()
        return rows[:limit], len(rows) > limit
    matching = [j for j in s.scalars(query.order_by(Job.pk.desc())).all()
                if all((j.meta or {}).get(k) == v for k, v in metadata.items())]
    return matching[:limit], len(matching) > limit


def count_active_jobs(s: Session, *, tenant_id: str) -> int:
    return int(s.scalar(select(func.count()).select_from(Job).where(
        Job.tenant_id == tenant_id, Job.status.in_(ACTIVE_JOB_STATES))) or 0)


def jobs_in_states(s: Session, *, states: Sequence[str]) -> Sequence[Job]:
    return s.scalars(select(Job).where(Job.status.in_(states)).order_by(Job.pk)).all()


def update_job_if(s: Session, *, job_id: str, status: str, conditions: Sequence[ColumnElement[bool]] = (),
                  values: dict[str, Any]) -> bool:
    """The compare-and-set write of job state: ``UPDATE jobs SET values WHERE id = job_id AND status = status AND
    conditions``; False when the row had moved on meanwhile (rowcount 0). Only ``service.job_states`` calls it."""
    stmt = (update(Job).where(Job.id == job_id, Job.status == status, *conditions).values(**values)
            .execution_options(synchronize_session=False))
    return bool(s.execute(stmt).rowcount)  # type: ignore[attr-defined]


def jobs_using_file(s: Session, *, tenant_id: str, file_id: str) -> list[str]:
    """Ids of the tenant's unfinished jobs (validating_files, queued, running, paused) that train or validate on ``file_id``."""
    return list(s.scalars(select(Job.id).where(
        Job.tenant_id == tenant_id, Job.status.in_(ACTIVE_JOB_STATES),
        (Job.training_file == file_id) | (Job.validation_file == file_id)).order_by(Job.pk)))


def running_per_tenant(s: Session) -> dict[str, int]:
    rows = s.execute(select(Job.tenant_id, func.count()).where(Job.status == "running").group_by(Job.tenant_id))
    return {tenant: int(n) for tenant, n in rows}


# ----- events -------------------------------------------------------------------------------------------------
def add_events(s: Session, *, job_id: str, events: Sequence[dict[str, Any]]) -> int:
    """Insert events (dicts with seq, created_at, level, type, message, data) not yet stored; returns how many."""
    if not events:
        return 0
    seqs = [e["seq"] for e in events]
    known = set(s.scalars(select(JobEvent.seq).where(JobEvent.job_id == job_id, JobEvent.seq.in_(seqs))))
    fresh = [dict(e, job_id=job_id) for e in events if e["seq"] not in known]
    if fresh:
        s.execute(insert(JobEvent), fresh)
    return len(fresh)


def next_service_seq(s: Session, *, job_id: str) -> int:
    """Sequence numbers of events the service writes itself are negative, so they never collide with the run's."""
    lowest = s.scalar(select(func.min(JobEvent.seq)).where(JobEvent.job_id == job_id))
    return min(-1, (lowest or 0) - 1)


def list_events(s: Session, *, job_id: str, limit: int, after: str | None, types: Sequence[str] | None = None,
                latest_per_step: bool = False, steps: Sequence[int] | None = None,
                after_as: str | None = None) -> tuple[Sequence[JobEvent], bool]:
    """Newest first. ``latest_per_step`` keeps only the newest event of a type for each ``data.step``: a job that
    restarted from an earlier checkpoint saves some steps again, and its checkpoint list names each step once.
    ``steps`` keeps only events whose ``data.step`` is one of them. ``after_as``: the cursor as the client gave it
    (a checkpoint id), for the 404 of one that names nothing."""
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if types:
        query = query.where(JobEvent.type.in_(types))
    if steps is not None:
        query = query.where(JobEvent.data["step"].as_integer().in_(list(steps)))
    if latest_per_step:
        same = aliased(JobEvent)
        newest = select(func.max(same.pk)).where(same.job_id == job_id)
        if types:  # group only the listed types, not the job's many metrics events
            newest = newest.where(same.type.in_(types))
        query = query.where(JobEvent.pk.in_(newest.group_by(same.type, same.data["step"].as_integer())))
    if after is not None:
        ref = event_ref(after.removeprefix("ftevent-"))
        pk = None if ref is None else s.scalar(select(JobEvent.pk).where(JobEvent.ref == ref,
                                                                          JobEvent.job_id == job_id))
        if pk is None:
            raise NotFound(f"no {'checkpoint' if after_as else 'event'} with id {after_as or after!r} in this job",
                           param="after")
        query = query.where(JobEvent.pk < pk)
    rows = s.scalars(query.order_by(JobEvent.pk.desc()).limit(limit + 1)).all()
    return rows[:limit], len(rows) > limit


def checkpoint_event(s: Session, *, job_id: str | None = None, step: int | None = None, ref: str | None = None
                     ) -> JobEvent | None:
    """A ``checkpoint`` event: the one whose id is ``ftckpt-{ref}``, or the newest of ``job_id`` for ``step``."""
    query = select(JobEvent).where(JobEvent.type == "checkpoint")
    if ref is not None:
        query = query.where(JobEvent.ref == ref)
    if job_id is not None:
        query = query.where(JobEvent.job_id == job_id)
    if step is not None:
        query = query.where(JobEvent.data["step"].as_integer() == step)
    return s.scalar(query.order_by(JobEvent.pk.desc()).limit(1))


def event_ref(text: str) -> str | None:
    """An event id's tail (after ``ftevent-`` / ``ftckpt-``) when it can be one (ASCII letters and digits, at most
    24); None for anything else, which callers answer as an unknown id (nothing odd reaches the database)."""
    return text if 0 < len(text) <= 24 and text.isascii() and text.isalnum() else None


# ----- storage usage (tenants.used_bytes; see service.usage) ----------------------------------------------------
def reserve_bytes(s: Session, *, tenant_id: str, size: int) -> bool:
    """Add ``size`` to the tenant's usage only if it stays within ``max_stored_bytes``: one conditional UPDATE,
    so concurrent reservations cannot both pass. False when it would not fit."""
    result = s.execute(update(Tenant).where(Tenant.id == tenant_id,
                                            Tenant.used_bytes + size <= Tenant.max_stored_bytes)
                       .values(used_bytes=Tenant.used_bytes + size).execution_options(synchronize_session=False))
    return bool(result.rowcount)  # type: ignore[attr-defined]


def add_used_bytes(s: Session, *, tenant_id: str, delta: int) -> None:
    """Charge (or, negative, release) ``delta`` bytes atomically; usage never goes below 0."""
    if delta:
        total = Tenant.used_bytes + delta
        s.execute(update(Tenant).where(Tenant.id == tenant_id).values(used_bytes=case((total < 0, 0), else_=total))
                  .execution_options(synchronize_session=False))


def used_bytes(s: Session, *, tenant_id: str) -> int:
    """The tenant's charged bytes as stored now (not a possibly stale loaded row)."""
    return int(s.scalar(select(Tenant.used_bytes).where(Tenant.id == tenant_id)) or 0)


def swap_job_stored_bytes(s: Session, *, job_id: str, old: int, new: int) -> bool:
    """Compare-and-set of ``jobs.stored_bytes``: True when it was ``old`` and is now ``new``, so of two accountants
    of the same job only one applies the difference."""
    result = s.execute(update(Job).where(Job.id == job_id, Job.stored_bytes == old).values(stored_bytes=new)
                       .execution_options(synchronize_session=False))
    return bool(result.rowcount)  # type: ignore[attr-defined]


def recount_used_bytes(s: Session, *, tenant_id: str) -> int:
    """Set the tenant's usage to its uploads plus its jobs' accounted run bytes (one UPDATE); the new value."""
    uploads = (select(func.coalesce(func.sum(File.bytes), 0))
               .where(File.tenant_id == tenant_id, File.purpose == UPLOAD_PURPOSE).scalar_subquery())
    runs = select(func.coalesce(func.sum(Job.stored_bytes), 0)).where(Job.tenant_id == tenant_id).scalar_subquery()
    s.execute(update(Tenant).where(Tenant.id == tenant_id).values(used_bytes=uploads + runs)
              .execution_options(synchronize_session=False))
    return used_bytes(s, tenant_id=tenant_id)


def launched_jobs(s: Session, *, tenant_id: str) -> Sequence[Job]:
    """The tenant's jobs that were ever launched (only those have run outputs)."""
    return s.scalars(select(Job).where(Job.tenant_id == tenant_id, Job.started_at.is_not(None))
                     .order_by(Job.pk)).all()


# ----- models -------------------------------------------------------------------------------------------------
def add_model(s: Session, *, model_id: str, tenant_id: str, base_model: str, job_id: str, adapter_uri: str,
              parent_model: str | None = None) -> Model:
    existing = s.get(Model, model_id)
    if existing is not None:
        return existing
    row = Model(id=model_id, tenant_id=tenant_id, base_model=base_model, job_id=job_id, adapter_uri=adapter_uri,
                created_at=now(), deleted=False, parent_model=parent_model)
    s.add(row)
    s.flush()
    return row


def list_models(s: Session, *, tenant_id: str) -> Sequence[Model]:
    return s.scalars(select(Model).where(Model.tenant_id == tenant_id, Model.deleted.is_(False))
                     .order_by(Model.created_at, Model.id)).all()


def get_model(s: Session, *, tenant_id: str, model_id: str, param: str = "model") -> Model:
    row = s.scalar(select(Model).where(Model.id == model_id, Model.tenant_id == tenant_id, Model.deleted.is_(False)))
    if row is None:
        raise NotFound(f"the model {model_id!r} does not exist", param=param, code="model_not_found")
    return row


# ----- scheduler lease ----------------------------------------------------------------------------------------
def take_lease(s: Session, *, name: str, holder: str, ttl_s: float) -> int | None:
    """Take or extend the lease ``name`` for ``holder``: its epoch (fencing token) when ``holder`` holds it
    afterwards, else None. The epoch grows by one whenever the lease changes hands (a new row starts at 1)."""
    t = time.time()
    result = s.execute(update(Lease).where(Lease.name == name, (Lease.holder == holder) | (Lease.expires_at < t))
                       .values(epoch=case((Lease.holder == holder, Lease.epoch), else_=Lease.epoch + 1),
                               holder=holder, expires_at=t + ttl_s)
                       .execution_options(synchronize_session=False))
    if result.rowcount:  # type: ignore[attr-defined]
        return int(s.scalar(select(Lease.epoch).where(Lease.name == name)) or 0)
    if s.scalar(select(Lease.name).where(Lease.name == name)) is not None:
        return None
    try:
        with s.begin_nested():
            s.add(Lease(name=name, holder=holder, expires_at=t + ttl_s, epoch=1))
        return 1
    except IntegrityError:
        return None


def acquire_lease(s: Session, *, name: str, holder: str, ttl_s: float) -> bool:
    """Take or extend the lease ``name`` for ``holder``; True when ``holder`` holds it afterwards."""
    return take_lease(s, name=name, holder=holder, ttl_s=ttl_s) is not None


def renew_lease(s: Session, *, name: str, holder: str, epoch: int, ttl_s: float) -> bool:
    """Extend the lease only while ``holder`` still holds it with the same ``epoch`` (the fence): False once another
    process took it over, even if this holder got it back later. Run first in a transaction, the row stays locked
    (PostgreSQL: row lock; SQLite: the database write lock) until commit, so no takeover can interleave with the
    writes that follow in that transaction."""
    result = s.execute(update(Lease).where(Lease.name == name, Lease.holder == holder, Lease.epoch == epoch)
                       .values(expires_at=time.time() + ttl_s).execution_options(synchronize_session=False))
    return bool(result.rowcount)  # type: ignore[attr-defined]


def release_lease(s: Session, *, name: str, holder: str) -> None:
    """Let the lease expire now (the row stays, so its epoch keeps growing across holders)."""
    s.execute(update(Lease).where(Lease.name == name, Lease.holder == holder).values(expires_at=0.0)
              .execution_options(synchronize_session=False))


def lease_holder(s: Session, *, name: str) -> str | None:
    lease = s.get(Lease, name)
    return lease.holder if lease is not None and lease.expires_at >= time.time() else None
