"""``/health`` (liveness) and ``/ready`` (database reachable; who leads the scheduler)."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from service import repository as repo
from service.deps import SessionDep
from service.scheduler import LEASE
from service.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/health", operation_id="health-live")
def health() -> Health:
    return Health(status="ok", database="not checked")


@router.get("/ready", operation_id="health-ready")
def ready(session: SessionDep) -> Health:
    session.execute(text("SELECT 1"))
    return Health(status="ok", database="ok", scheduler_leader=repo.lease_holder(session, name=LEASE))
