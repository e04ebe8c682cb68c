"""``/v1/admin``: tenants (quotas, caps, storage usage) and their API keys (admin key only). Keys are shown once;
only hashes are stored."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter

from service import auth, usage
from service import repository as repo
from service.caps import merge_limits
from service.deps import AdminDep, SessionDep, SettingsDep, StorageDep
from service.errors import InvalidRequest
from service.mlflow_tenants import provision_tenant
from service.schemas import (
    KeyCreate,
    KeyCreated,
    KeyPublic,
    TenantCreate,
    TenantCreated,
    TenantList,
    TenantMlflow,
    TenantPublic,
    TenantUpdate,
    UsageReconciled,
    key_public,
    tenant_public,
)

router = APIRouter(prefix="/v1/admin", tags=["admin"])


def issue_key(session: SessionDep, tenant_id: str, name: str) -> KeyCreated:
    new = auth.generate_key()
    row = repo.add_key(session, key_id=new.key_id, tenant_id=tenant_id, key_hash=new.key_hash, name=name)
    return KeyCreated(**key_public(row).model_dump(), key=new.plaintext)


@router.post("/tenants", operation_id="admin-tenants-create", status_code=201)
def create_tenant(body: TenantCreate, _admin: AdminDep, session: SessionDep, settings: SettingsDep) -> TenantCreated:
    """Create a tenant and its first API key (and, when configured, its read-only MLflow user and experiment;
    an MLflow failure rolls the tenant back)."""
    tenant = repo.create_tenant(
        session, name=body.name,
        max_active_jobs=body.max_active_jobs if body.max_active_jobs is not None else settings.default_max_active_jobs,
        max_stored_bytes=body.max_stored_bytes if body.max_stored_bytes is not None
        else settings.default_max_stored_bytes,
        limits=merge_limits(None, body.limits) if body.limits is not None else None)
    key = issue_key(session, tenant.id, "first key")
    access = provision_tenant(settings, tenant.id)
    mlflow = TenantMlflow(**asdict(access)) if access is not None else None
    return TenantCreated(tenant=tenant_public(tenant, settings), key=key, mlflow=mlflow)


@router.get("/tenants", operation_id="admin-tenants-list")
def list_tenants(_admin: AdminDep, session: SessionDep, settings: SettingsDep) -> TenantList:
    return TenantList(data=[tenant_public(t, settings) for t in repo.list_tenants(session)])


@router.get("/tenants/{tenant_id}", operation_id="admin-tenants-retrieve")
def get_tenant(tenant_id: str, _admin: AdminDep, session: SessionDep, settings: SettingsDep) -> TenantPublic:
    """The tenant's quotas, cap overrides, caps in force and charged storage (``used_bytes``)."""
    return tenant_public(repo.get_tenant(session, tenant_id=tenant_id), settings)


@router.patch("/tenants/{tenant_id}", operation_id="admin-tenants-update")
def update_tenant(tenant_id: str, body: TenantUpdate, _admin: AdminDep, session: SessionDep,
                  settings: SettingsDep) -> TenantPublic:
    """Change quotas and cap overrides. ``limits`` is merged into the tenant's overrides (a cap set to null drops
    its override; ``limits: null`` drops them all); an override may be below or above the global cap. Jobs already
    submitted keep their values."""
    if not body.model_fields_set:
        raise InvalidRequest("nothing to update: give max_active_jobs, max_stored_bytes and/or limits",
                             param="body", code="empty_update")
    tenant = repo.get_tenant(session, tenant_id=tenant_id)
    limits = None
    if "limits" in body.model_fields_set:  # limits: null clears every override
        limits = merge_limits(tenant.limits, body.limits) if body.limits is not None else {}
    tenant = repo.update_tenant(session, tenant_id=tenant_id, limits=limits, max_active_jobs=body.max_active_jobs,
                                max_stored_bytes=body.max_stored_bytes)
    return tenant_public(tenant, settings)


@router.post("/tenants/{tenant_id}/usage/reconcile", operation_id="admin-tenants-usage-reconcile")
def reconcile_usage(tenant_id: str, _admin: AdminDep, session: SessionDep, storage: StorageDep,
                    settings: SettingsDep) -> UsageReconciled:
    """Recompute the tenant's charged storage from its files and run directories; remove uploaded objects
    left without a file row by a crash (older than ``usage_orphan_grace_s``)."""
    repo.get_tenant(session, tenant_id=tenant_id)
    return UsageReconciled(**usage.reconcile(session, storage, tenant_id, settings.usage_orphan_grace_s))


@router.post("/tenants/{tenant_id}/keys", operation_id="admin-keys-create", status_code=201)
def create_key(tenant_id: str, body: KeyCreate, _admin: AdminDep, session: SessionDep) -> KeyCreated:
    """Issue a key; with ``revoke_existing`` this is a rotation (the tenant's other keys are revoked)."""
    repo.get_tenant(session, tenant_id=tenant_id)
    if body.revoke_existing:
        for old in repo.list_keys(session, tenant_id=tenant_id):
            repo.revoke_key(session, key_id=old.id)
    return issue_key(session, tenant_id, body.name)


@router.get("/tenants/{tenant_id}/keys", operation_id="admin-keys-list")
def list_keys(tenant_id: str, _admin: AdminDep, session: SessionDep) -> list[KeyPublic]:
    repo.get_tenant(session, tenant_id=tenant_id)
    return [key_public(k) for k in repo.list_keys(session, tenant_id=tenant_id)]


@router.delete("/keys/{key_id}", operation_id="admin-keys-revoke")
def revoke_key(key_id: str, _admin: AdminDep, session: SessionDep) -> KeyPublic:
    return key_public(repo.revoke_key(session, key_id=key_id))
