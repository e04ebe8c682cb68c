"""``/health`` (liveness) and ``/ready`` (database reachable; whether a scheduler leader is present).

Both are unauthenticated (probes send no key). Who leads the scheduler (``host:pid``) is internal: ``/ready``
names it only to a caller presenting the admin key; any other caller, with or without a key, learns only that a
leader is present.
"""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from service import auth
from service import repository as repo
from service.deps import Credentials, SessionDep, SettingsDep
from service.scheduler import LEASE
from service.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/health", operation_id="health-live")
def health() -> Health:
    return Health(status="ok", database="not checked")


@router.get("/ready", operation_id="health-ready")
def ready(session: SessionDep, settings: SettingsDep, credentials: Credentials) -> Health:
    session.execute(text("SELECT 1"))
    holder = repo.lease_holder(session, name=LEASE)
    admin = settings.admin_key.get_secret_value() if settings.admin_key else None
    is_admin = credentials is not None and auth.is_admin_key(credentials.credentials, admin)
    return Health(status="ok", database="ok", scheduler_leader_present=holder is not None,
                  scheduler_leader=holder if is_admin else None)
