"""Bearer API keys: how keys look, how they are hashed and checked. Plaintext keys are never stored.

A tenant key is ``sk-qv-<key id>_<secret>``: the 12-hex-digit key id finds the row, the sha256 of the whole key
(256 bits of entropy, so a plain hash is enough; no slow KDF needed) is compared in constant time. The admin key
comes from settings and is compared in constant time too.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from service import repository as repo
from service.errors import Unauthorized

KEY_PREFIX = "sk-qv-"


@dataclass(frozen=True)
class NewKey:
    key_id: str
    plaintext: str
    key_hash: str


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def generate_key() -> NewKey:
    short = secrets.token_hex(6)
    plaintext = f"{KEY_PREFIX}{short}_{secrets.token_urlsafe(32)}"
    return NewKey(key_id=f"key-{short}", plaintext=plaintext, key_hash=hash_key(plaintext))


def key_id_of(plaintext: str) -> str | None:
    """The key id embedded in a tenant key, or None if the string is not shaped like one."""
    if not plaintext.startswith(KEY_PREFIX) or "_" not in plaintext:
        return None
    short = plaintext[len(KEY_PREFIX):].split("_", 1)[0]
    return f"key-{short}" if len(short) == 12 else None


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("malformed Authorization header: expected 'Bearer <key>'")
    return token.strip()


def tenant_of_key(s: Session, plaintext: str) -> Any:
    """The tenant row of a valid, unrevoked key; ``Unauthorized`` otherwise (also when the tenant is gone).

    One query (the key joined with its tenant): every tenant request runs it."""
    key_id = key_id_of(plaintext)
    found = repo.key_with_tenant(s, key_id=key_id) if key_id else None
    if found is None or not hmac.compare_digest(found[0].key_hash, hash_key(plaintext)):
        raise Unauthorized("invalid API key")
    key, tenant = found
    if key.revoked_at is not None:
        raise Unauthorized(f"API key {key.id} has been revoked", code="revoked_api_key")
    return tenant


def is_admin_key(plaintext: str, admin_key: str | None) -> bool:
    return bool(admin_key) and hmac.compare_digest(plaintext.encode(), str(admin_key).encode())
