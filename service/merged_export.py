"""Merged exports of fine-tuned models: the base model with the adapter merged in, as one ``.tar``, made once.

The merge is CPU work on the whole model, so it never runs in the API process (which does not import torch): a
worker subprocess (``python -m qwenvl_core.models.merge``, background priority and one math thread like the
validation workers, in the API's process group) loads the base and the adapter, merges, and packs the model
directory into a scratch directory of the API's temporary directory; the archive is then stored next to the
adapter (``{adapter}.merged.tar``, in the job's run directory, so it is charged to the tenant like the run) and
every download, this one included, streams that object. Later downloads only stream.

One merge per adapter at a time and at most ``MAX_CONCURRENT_MERGES`` per API process (a merge holds the model
in memory), given in the order the downloads asked; a download waiting for one gives up after ``merge_timeout_s``.
A tenant has one merge at a time, running or waiting (more downloads of that same model wait for it): a download
of another model meanwhile answers 429 ``merge_in_progress``, so that no tenant queues merges ahead of the others'
(nor holds more than one of the API's request threads waiting). Failures answer without paths or tracebacks (those
go to the log): 504 ``merge_timeout`` (the worker is killed), 503 ``merge_failed`` (out of memory, an adapter that
does not fit its base), 503 ``base_model_unavailable``, 403 ``storage_quota_exceeded``.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.orm import Session

from qwenvl_core.scratch import ScratchDir
from service import repository as repo
from service.errors import PermissionDenied, QuotaExceeded, TimedOut, Unavailable
from service.models import Tenant
from service.storage import TenantStorage
from service.usage import charge_run_storage
from service.validation import _lower_priority, _worker_env

log = logging.getLogger(__name__)

MERGED_SUFFIX = ".merged.tar"
MAX_CONCURRENT_MERGES = 1
BUSY_RETRY_AFTER_S = 30


def cache_key(storage: TenantStorage, adapter_uri: str) -> str:
    """The store key of an adapter's merged export: ``{adapter}.merged.tar``, a sibling of the adapter directory."""
    return storage.key_of_uri(adapter_uri.rstrip("/")) + MERGED_SUFFIX


class _Waiter:
    def __init__(self, key: str) -> None:
        self.key = key


class _Merges:
    """The merges of this process: one per key, at most ``MAX_CONCURRENT_MERGES`` together, started in the order
    they were asked for; one key per tenant at a time (module docstring)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running: set[str] = set()
        self._queue: deque[_Waiter] = deque()  # downloads waiting to merge, oldest first
        self._tenants: dict[str, tuple[str, int]] = {}  # tenant -> (its key, its downloads waiting or merging)

    def _turn_of(self, waiter: _Waiter) -> bool:
        if len(self._running) >= MAX_CONCURRENT_MERGES:
            return False
        return next((w for w in self._queue if w.key not in self._running), None) is waiter

    @contextmanager
    def claim(self, key: str, tenant_id: str, timeout_s: float, model_id: str) -> Iterator[None]:
        deadline = time.monotonic() + timeout_s
        waiter = _Waiter(key)
        with self._cond:
            held = self._tenants.get(tenant_id)
            if held is not None and held[0] != key:
                raise QuotaExceeded(f"the merged export of another of your models is being made; merged exports are "
                                    f"made one at a time per tenant: retry {model_id} when that one is done",
                                    param="model", code="merge_in_progress", retry_after_s=BUSY_RETRY_AFTER_S)
            self._tenants[tenant_id] = (key, (held[1] if held else 0) + 1)
            self._queue.append(waiter)
            started = False
            try:
                while not self._turn_of(waiter):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimedOut(f"the merged export of {model_id} waited {timeout_s:g} s for other merges "
                                       "to finish; retry later", param="model", code="merge_timeout")
                    self._cond.wait(remaining)
                self._running.add(key)
                started = True
            finally:
                self._queue.remove(waiter)
                if not started:  # timed out: this download gives its place up
                    self._release_tenant(tenant_id)
                self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._running.discard(key)
                self._release_tenant(tenant_id)
                self._cond.notify_all()

    def _release_tenant(self, tenant_id: str) -> None:
        key, count = self._tenants[tenant_id]
        if count > 1:
            self._tenants[tenant_id] = (key, count - 1)
        else:
            del self._tenants[tenant_id]


_MERGES = _Merges()


def _weights_bytes(base_dir: str) -> int:
    directory = Path(base_dir)
    return sum(p.stat().st_size for p in directory.glob("*.safetensors")) if directory.is_dir() else 0


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.1f} GiB"


def _failure(model_id: str, returncode: int, stderr: str, weights: int) -> Unavailable:
    log.error("merge worker for %s exited %s: %s", model_id, returncode, stderr[-4000:])
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        reason = (f"the merge worker was killed ({name}), most likely out of memory: merging holds the whole model "
                  f"({_gib(weights)} of base weights) in memory")
    elif "does not fit the base model" in stderr:
        reason = "the adapter does not fit its base model as this server has it configured"
    else:
        reason = f"the merge worker failed (exit status {returncode})"
    return Unavailable(f"merging {model_id} failed: {reason}; the PEFT adapter (format=peft) is still available",
                       param="model", code="merge_failed")


def _run_worker(base_dir: str, adapter_uri: str, archive: Path, timeout_s: float, model_id: str) -> None:
    cmd = [sys.executable, "-m", "qwenvl_core.models.merge", "--base", base_dir, "--adapter", adapter_uri,
           "--archive", str(archive)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_worker_env())
    _lower_priority(proc.pid)
    try:
        _, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise TimedOut(f"merging {model_id} took longer than {timeout_s:g} s (the base model has "
                       f"{_gib(_weights_bytes(base_dir))} of weights) and was stopped; ask the operator to raise "
                       "QWENVL_MERGE_TIMEOUT_S, or download the PEFT adapter (format=peft)", param="model",
                       code="merge_timeout") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    if proc.returncode != 0:
        raise _failure(model_id, proc.returncode, stderr, _weights_bytes(base_dir))


def _require_headroom(s: Session, tenant: Tenant, model_id: str) -> None:
    used = repo.used_bytes(s, tenant_id=tenant.id)
    if used >= tenant.max_stored_bytes:
        raise PermissionDenied(f"storage quota exceeded: {used} of {tenant.max_stored_bytes} bytes used; the merged "
                               f"export of {model_id} is stored with its job's outputs and could not be; delete "
                               "files first or ask the operator for a larger quota", code="storage_quota_exceeded")


def ensure_merged(s: Session, storage: TenantStorage, tenant: Tenant, *, model_id: str, adapter_uri: str,
                  base_dir: str | None, job_id: str, timeout_s: float) -> str:
    """The store key of the merged export of an adapter, merging it first unless it is already stored."""
    key = cache_key(storage, adapter_uri)
    if storage.size(key) is not None:
        return key
    if not base_dir:
        raise Unavailable(f"the base model of {model_id} is no longer configured on this server, so it cannot be "
                          "merged; the PEFT adapter (format=peft) is still available", param="model",
                          code="base_model_unavailable")
    _require_headroom(s, tenant, model_id)
    s.commit()  # no database transaction (or pooled connection) held open while the merge runs
    with _MERGES.claim(key, tenant.id, timeout_s, model_id):
        if storage.size(key) is not None:  # merged by the download this one waited for
            return key
        with ScratchDir("merge") as scratch:  # a merged model is the base model's size: swept if the API dies
            archive = scratch / "model.tar"
            _run_worker(base_dir, adapter_uri, archive, timeout_s, model_id)
            with archive.open("rb") as src:
                storage.put(key, src)
    job = repo.job_by_id(s, job_id=job_id)
    if job is not None and job.tenant_id == tenant.id:
        charge_run_storage(s, storage, job)
        s.commit()
    return key
