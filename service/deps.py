"""FastAPI dependencies as ``Annotated`` aliases: the context, a DB session per request, the caller's tenant.

A request's session commits when the handler returns, before the response is sent (``scope="function"``: a
client that gets a 200 for a created job can read it at once), and rolls back when it raises. ``TenantDep`` accepts
only tenant keys; ``AdminDep`` only the admin key from settings.

Dependencies that do no I/O are ``async def``: FastAPI runs every plain ``def`` dependency in its thread pool, and
each such hop costs CPU and a wait for a free thread, the GIL and the event loop. The session is opened on the event
loop (no I/O: SQLAlchemy connects on the first query) and committed (or rolled back) and closed in one thread-pool
hop. With the one-query key check (``auth.tenant_of_key``) a job listing costs ~20% less CPU (docs/benchmarks.md,
tenant isolation, fourth session).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service import auth
from service.context import ServiceContext
from service.errors import Unauthorized
from service.models import Tenant
from service.settings import Settings
from service.storage import TenantStorage

_bearer = HTTPBearer(auto_error=False, description="A tenant API key (sk-qv-...) or, for /v1/admin, the admin key.")


async def get_context(request: Request) -> ServiceContext:
    ctx: ServiceContext = request.app.state.ctx
    return ctx


Ctx = Annotated[ServiceContext, Depends(get_context)]


async def get_settings(ctx: Ctx) -> Settings:
    return ctx.settings


async def get_storage(ctx: Ctx) -> TenantStorage:
    return ctx.storage


async def get_session(ctx: Ctx) -> AsyncIterator[Session]:
    session = ctx.sessions()
    commit = False
    try:
        yield session
        commit = True
    finally:
        with anyio.CancelScope(shield=True):  # a cancelled request (client gone) still returns its connection
            await anyio.to_thread.run_sync(_end, session, commit)


def _end(session: Session, commit: bool) -> None:
    """Commit (or roll back) and close: the database I/O at the end of a request, in one thread-pool hop."""
    try:
        if commit:
            session.commit()
        else:
            session.rollback()
    finally:
        session.close()


SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[TenantStorage, Depends(get_storage)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]  # committed before the response is sent
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _token(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or not credentials.credentials:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
    return credentials.credentials


def current_tenant(credentials: Credentials, session: SessionDep) -> Tenant:
    tenant: Tenant = auth.tenant_of_key(session, _token(credentials))
    return tenant


async def require_admin(credentials: Credentials, settings: SettingsDep) -> None:
    admin = settings.admin_key.get_secret_value() if settings.admin_key else None
    if not auth.is_admin_key(_token(credentials), admin):
        raise Unauthorized("this endpoint needs the admin key", code="invalid_admin_key")


TenantDep = Annotated[Tenant, Depends(current_tenant)]
AdminDep = Annotated[None, Depends(require_admin)]
