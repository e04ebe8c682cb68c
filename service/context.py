"""What one API process holds: settings, database, storage, validator, scheduler and the adapter hooks.

``create_app`` builds one ``ServiceContext`` and stores it on ``app.state``; dependencies in ``deps`` hand its
parts to routes. Nothing here is created at import time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.settings import Settings
from service.storage import TenantStorage

if TYPE_CHECKING:
    from service.scheduler import Scheduler
    from service.validation import Validator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterReady:
    """Told to the serving layer when a fine-tune produced a servable adapter."""

    model_id: str  # ft:{base}:{tenant}:{suffix}:{job_id}
    tenant_id: str
    base_model: str
    base_model_path: str
    adapter_uri: str  # a PEFT directory (local path or s3:// URI)
    job_id: str


AdapterHook = Callable[[AdapterReady], None]


@dataclass(frozen=True)
class AdapterDeleted:
    """Told to the serving layer when a tenant deleted an adapter (after the deletion is committed)."""

    model_id: str
    tenant_id: str
    base_model: str


AdapterDeletedHook = Callable[[AdapterDeleted], None]


@dataclass
class ServiceContext:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    storage: TenantStorage
    validator: Validator
    scheduler: Scheduler
    adapter_hooks: list[AdapterHook] = field(default_factory=list)
    deleted_hooks: list[AdapterDeletedHook] = field(default_factory=list)
    # The base models the attached model servers deploy (``mount_chat`` sets it); None: no chat on this API.
    served_models: Callable[[], list[str]] | None = None

    def notify_adapter_ready(self, event: AdapterReady) -> None:
        """Call every registered hook; a failing hook is logged and does not fail the job."""
        for hook in list(self.adapter_hooks):
            try:
                hook(event)
            except Exception:
                log.exception("on_adapter_ready hook %r failed for %s", hook, event.model_id)

    def notify_adapter_deleted(self, event: AdapterDeleted) -> None:
        """Call every deletion hook (serving evicts the adapter); failures are logged, the deletion stands."""
        for hook in list(self.deleted_hooks):
            try:
                hook(event)
            except Exception:
                log.exception("adapter-deleted hook %r failed for %s", hook, event.model_id)
