"""Merged exports of fine-tuned models: the base model with the adapter merged in, as one ``.tar``, made once.

The merge is CPU work on the whole model, so it never runs in the API process (which does not import torch): a
worker subprocess (``python -m qwenvl_core.models.merge``, background priority and one math thread like the
validation workers, in the API's process group) loads the base and the adapter, merges, and packs the model
directory into a scratch directory of the API's temporary directory; the archive is then stored next to the
adapter (``{adapter}.merged.tar``, in the job's run directory, so it is charged to the tenant like the run) and
every download, this one included, streams that object. Later downloads only stream.

One merge per adapter at a time and at most ``MAX_CONCURRENT_MERGES`` per API process (a merge holds the model
in memory); a download waiting for one gives up after ``merge_timeout_s``. Failures answer without paths or
tracebacks (those go to the log): 504 ``merge_timeout`` (the worker is killed), 503 ``merge_failed`` (out of
memory, an adapter that does not fit its base), 503 ``base_model_unavailable``, 403 ``storage_quota_exceeded``.
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.orm import Session

from service import repository as repo
from service.errors import PermissionDenied, TimedOut, Unavailable
from service.models import Tenant
from service.storage import TenantStorage
from service.usage import charge_run_storage
from service.validation import _lower_priority, _worker_env

log = logging.getLogger(__name__)

MERGED_SUFFIX = ".merged.tar"
MAX_CONCURRENT_MERGES = 1


def cache_key(storage: TenantStorage, adapter_uri: str) -> str:
    """The store key of an adapter's merged export: ``{adapter}.merged.tar``, a sibling of the adapter directory."""
    return storage.key_of_uri(adapter_uri.rstrip("/")) + MERGED_SUFFIX


class _Merges:
    """The merges running in this process: one per key, at most ``MAX_CONCURRENT_MERGES`` together."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._keys: set[str] = set()

    @contextmanager
    def claim(self, key: str, timeout_s: float, model_id: str) -> Iterator[None]:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while key in self._keys or len(self._keys) >= MAX_CONCURRENT_MERGES:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimedOut(f"the merged export of {model_id} waited {timeout_s:g} s for other merges to "
                                   "finish; retry later", param="model", code="merge_timeout")
                self._cond.wait(remaining)
            self._keys.add(key)
        try:
            yield
        finally:
            with self._cond:
                self._keys.discard(key)
                self._cond.notify_all()


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
    with _MERGES.claim(key, timeout_s, model_id):
        if storage.size(key) is not None:  # merged by the download this one waited for
            return key
        scratch = Path(tempfile.mkdtemp(prefix="qwenvl-merge-"))
        try:
            archive = scratch / "model.tar"
            _run_worker(base_dir, adapter_uri, archive, timeout_s, model_id)
            with archive.open("rb") as src:
                storage.put(key, src)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    job = repo.job_by_id(s, job_id=job_id)
    if job is not None and job.tenant_id == tenant.id:
        charge_run_storage(s, storage, job)
        s.commit()
    return key
