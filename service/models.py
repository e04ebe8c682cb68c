"""SQLAlchemy 2 table models of the control plane. Only ``repository`` reads and writes them.

Every tenant-owned row carries ``tenant_id``; public ids are strings (``file-…``, ``ftjob-…``; an event's
``ftevent-{ref}``), never the integer ``pk``, which only orders rows. JSON columns hold documents the API returns
as they are (validation reports, metrics).
"""

from __future__ import annotations

import secrets
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

PK = BigInteger().with_variant(Integer, "sqlite")  # SQLite only auto-increments INTEGER PRIMARY KEY


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    max_active_jobs: Mapped[int] = mapped_column(Integer)
    max_stored_bytes: Mapped[int] = mapped_column(BigInteger)
    limits: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # per-tenant caps (service.caps)
    used_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # uploads + run outputs


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # the lookup part embedded in the key
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64))  # sha256 hex of the whole key
    name: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[int] = mapped_column(BigInteger)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class File(Base):
    __tablename__ = "files"
    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(1024))
    status: Mapped[str] = mapped_column(String(16))  # uploaded | processed | error
    validation: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    __table_args__ = (Index("ix_files_tenant_pk", "tenant_id", "pk"), Index("ix_files_status", "status"))


class Job(Base):
    __tablename__ = "jobs"
    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(256))
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64), nullable=True)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(BigInteger)
    meta: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)  # method + extensions as given (normalised)
    status: Mapped[str] = mapped_column(String(24))
    created_at: Mapped[int] = mapped_column(BigInteger)
    started_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(512), nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    estimated_finish: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    result_files: Mapped[list[str]] = mapped_column(JSON, default=list)
    output_uri: Mapped[str] = mapped_column(String(1024))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    submission_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    cancel_requested_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_event_seq: Mapped[int] = mapped_column(Integer, default=-1)
    stored_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # run dir, last accounted
    max_wall_clock_s: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # resolved at submit time
    parent_model: Mapped[str | None] = mapped_column(String(512), nullable=True)  # continued from (0004)
    # pause / resume (0005): see service/migrations/versions/0005_pause.py
    pause_requested_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    paused_from: Mapped[str | None] = mapped_column(String(24), nullable=True)
    paused_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    paused_s: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    pauses: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # attempts that never reached Ray (0007): see service/migrations/versions/0007_unsubmitted_attempts.py
    unsubmitted_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    __table_args__ = (Index("ix_jobs_tenant_pk", "tenant_id", "pk"), Index("ix_jobs_status", "status"))


class JobEvent(Base):
    __tablename__ = "job_events"
    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)  # the run's seq; service-side events use negative seqs
    created_at: Mapped[int] = mapped_column(BigInteger)
    level: Mapped[str] = mapped_column(String(8))
    type: Mapped[str] = mapped_column(String(16))  # message | metrics | checkpoint | state
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # The public id's tail (``ftevent-{ref}``, a checkpoint's ``ftckpt-{ref}``): random, so ids say nothing of
    # other tenants' activity; rows from before migration 0006 have their pk in decimal
    ref: Mapped[str | None] = mapped_column(String(24), default=lambda: secrets.token_hex(12))
    __table_args__ = (UniqueConstraint("job_id", "seq", name="uq_job_events_job_seq"),
                      Index("ix_job_events_job_pk", "job_id", "pk"),
                      Index("ix_job_events_ref", "ref", unique=True))


class Model(Base):
    __tablename__ = "models"
    id: Mapped[str] = mapped_column(String(512), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    base_model: Mapped[str] = mapped_column(String(256))
    job_id: Mapped[str] = mapped_column(String(64))
    adapter_uri: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[int] = mapped_column(BigInteger)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    parent_model: Mapped[str | None] = mapped_column(String(512), nullable=True)  # its job's parent (0004)


class Lease(Base):
    __tablename__ = "leases"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[float] = mapped_column(Float)
    epoch: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # fencing token (0003)
