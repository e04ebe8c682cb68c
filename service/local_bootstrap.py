"""First start of the embedded local stack: an admin key and a default tenant with its key, written into the
data directory with mode 0600 so a local user can start at once (``$QWENVL_DATA_DIR/admin_key``,
``$QWENVL_DATA_DIR/api_key``); the data directory itself is created with mode 0700 (``service.private_files``). Production
mode never calls this: there the admin key must be given.
"""

from __future__ import annotations

import secrets

from pydantic import SecretStr
from sqlalchemy.orm import Session, sessionmaker

from service import auth
from service import repository as repo
from service.private_files import private_dir, write_secret
from service.settings import Settings

ADMIN_KEY_FILE = "admin_key"
API_KEY_FILE = "api_key"
DEFAULT_TENANT = "default"


def bootstrap_local(settings: Settings, sessions: sessionmaker[Session]) -> Settings:
    """Settings with the admin key filled in; creates the default tenant and its key on the first start."""
    data_dir = private_dir(settings.data_dir)
    if settings.admin_key is None:
        admin_file = data_dir / ADMIN_KEY_FILE
        if not admin_file.is_file():
            write_secret(admin_file, f"sk-qv-admin-{secrets.token_urlsafe(32)}")
        settings = settings.model_copy(update={"admin_key": SecretStr(admin_file.read_text().strip())})
    with sessions() as s, s.begin():
        if repo.find_tenant_by_name(s, name=DEFAULT_TENANT) is None and not repo.list_tenants(s):
            tenant = repo.create_tenant(s, name=DEFAULT_TENANT, max_active_jobs=settings.default_max_active_jobs,
                                        max_stored_bytes=settings.default_max_stored_bytes)
            key = auth.generate_key()
            repo.add_key(s, key_id=key.key_id, tenant_id=tenant.id, key_hash=key.key_hash, name="local bootstrap")
            write_secret(data_dir / API_KEY_FILE, key.plaintext)
    return settings
