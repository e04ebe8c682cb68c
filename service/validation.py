"""File validation right after upload, off the event loop and out of the API process.

``Validator`` owns a few threads (one by default) serving a ``TurnQueue``: uploads wait per tenant and the tenants
take turns, so one tenant's backlog of uploads never delays another tenant's next one by more than one validation
per tenant with waiting uploads. Each validation runs ``service.validation_worker`` in a child process (the data
library needs torch; the API must not import it), then stores the report on the file row: status ``processed``
when the report has no errors, ``error`` otherwise. The estimate endpoint runs the same worker with
``run_worker_async`` (awaited on the event loop, killed on timeout or when the client goes away). Workers are
started from threads, never forked from the event loop (``_start_worker``), and stay in the API's process group,
so stopping the group stops them too; a worker ended that way (SIGTERM, SIGINT, SIGHUP) gives no verdict: the file
stays ``uploaded`` and is validated again (``WorkerInterrupted``), where a crash of the worker is an ``error``.
Workers are background work: ``SCHED_IDLE`` (Linux), niced by ``WORKER_NICE`` and with one math thread each, so
uploads and estimates do not take the CPU from API and chat requests (measured: ``bench/tenant_isolation.py``, ``bench/worker_priority.py``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from typing import Any

import anyio
from sqlalchemy.orm import Session, sessionmaker

from service import repository as repo
from service.errors import InvalidRequest, Unavailable
from service.fair_queue import TurnQueue
from service.storage import TenantStorage

log = logging.getLogger(__name__)


def _worker_command(storage: TenantStorage, key: str, name: str, model_dir: str | None, epochs: int | None,
                    tokens_per_second: float | None, pixels: dict[str, int] | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "service.validation_worker", "--store", storage.root_uri, "--key", key,
           "--name", name]
    if model_dir:
        cmd += ["--model", model_dir]
    if epochs:
        cmd += ["--epochs", str(epochs)]
    if tokens_per_second:
        cmd += ["--tokens-per-second", str(tokens_per_second)]
    for option, value in (pixels or {}).items():  # min_pixels / max_pixels of the job being estimated
        cmd += [f"--{option.replace('_', '-')}", str(value)]
    return cmd


# Workers (validation after upload, estimates) are background work: they run at a lower CPU priority and with
# one math thread, so a tenant's uploads and estimates cannot take the CPU from other tenants' API and chat requests.
WORKER_NICE = 10
_WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _worker_env() -> dict[str, str]:
    return {**os.environ, **_WORKER_ENV}


def _lower_priority(pid: int) -> None:
    """Make a worker just started background work (from the parent: no ``preexec_fn`` in a threaded process):
    ``SCHED_IDLE`` where the platform has it, and reniced. A niced worker still holds the CPU for its time slice
    (milliseconds) when an API thread wakes, at every hand-over of every request; a ``SCHED_IDLE`` one is preempted
    at once, and runs on what the API leaves idle."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, min(os.getpriority(os.PRIO_PROCESS, pid) + WORKER_NICE, 19))
        if hasattr(os, "SCHED_IDLE"):
            os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
    except OSError:  # it already exited, or the platform refuses: the worker runs at normal priority
        pass


# Signals that stop processes for a restart (a process manager, a terminal), never for what the worker read
_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


class WorkerInterrupted(Unavailable):
    """The worker was stopped by a restart's signal before it produced a report: no verdict on the file."""


def _worker_output(returncode: int, stdout: str, stderr: str, key: str, name: str) -> dict[str, Any]:
    if -returncode in _STOP_SIGNALS:  # (a signal number any int may be compared with, named or not)
        raise WorkerInterrupted(f"the validation of {name} was interrupted ({signal.Signals(-returncode).name}); "
                                "try again")
    if returncode != 0:
        tail = stderr.strip().splitlines()[-1:] or ["no output"]
        if "DataError" in stderr or "QwenVLError" in stderr:
            raise InvalidRequest(f"{name}: {tail[0]}")
        log.error("validation worker failed for %s: %s", key, stderr[-2000:])
        raise Unavailable(f"the validation worker failed for {name}: {tail[0]}")
    result: dict[str, Any] = json.loads(stdout)
    return result


def _start_worker(cmd: list[str]) -> subprocess.Popen[str]:
    """Start a worker as background work (``_lower_priority``). Called from a thread, never on the event loop:
    ``subprocess.Popen`` starts the child with ``vfork`` (under a millisecond), while asyncio's subprocess under
    uvloop ``fork``s the whole API process on the loop's thread (5-25 ms with the serving engine's ~2 GB mapped,
    every request of every tenant waiting)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_worker_env())
    _lower_priority(proc.pid)
    return proc


def _stop(proc: subprocess.Popen[str]) -> None:
    """Kill a worker that still runs and reap it (its pipes close in the thread still in ``communicate``)."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def run_worker(storage: TenantStorage, key: str, name: str, timeout_s: float, model_dir: str | None = None,
               epochs: int | None = None, tokens_per_second: float | None = None) -> dict[str, Any]:
    """The worker's JSON output for one stored object; ``Unavailable`` when the worker itself fails or runs
    longer than ``timeout_s`` (then it is killed)."""
    proc = _start_worker(_worker_command(storage, key, name, model_dir, epochs, tokens_per_second))
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"validating {name} took longer than {timeout_s:.0f} s") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return _worker_output(proc.returncode, stdout, stderr, key, name)


async def run_worker_async(storage: TenantStorage, key: str, name: str, timeout_s: float,
                           model_dir: str | None = None, epochs: int | None = None,
                           tokens_per_second: float | None = None, pixels: dict[str, int] | None = None
                           ) -> dict[str, Any]:
    """``run_worker`` for the event loop: ``TimeoutError`` after ``timeout_s``; on timeout or cancellation (a
    client that went away) the worker is killed and reaped. A thread starts it and waits for its output (the
    estimate slots bound how many run at once). ``pixels``: the job's ``min_pixels`` / ``max_pixels`` for the base
    model's processor."""
    cmd = _worker_command(storage, key, name, model_dir, epochs, tokens_per_second, pixels)
    proc = await anyio.to_thread.run_sync(_start_worker, cmd)  # a cancellation meanwhile waits for the start and
    try:  # is raised at the next await, inside the try: the worker is killed either way
        with anyio.fail_after(timeout_s):
            stdout, stderr = await anyio.to_thread.run_sync(proc.communicate, abandon_on_cancel=True)
    finally:
        if proc.poll() is None:  # timed out or cancelled: the abandoned communicate() returns once it is killed
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_stop, proc)
    return _worker_output(proc.returncode, stdout, stderr, key, name)


class Validator:
    """Validates uploaded files in the background, tenants in turn (one at a time by default: the machine is
    small)."""

    def __init__(self, sessions: sessionmaker[Session], storage: TenantStorage, timeout_s: float,
                 workers: int = 1) -> None:
        self.sessions, self.storage, self.timeout_s = sessions, storage, timeout_s
        self._queue: TurnQueue[str] = TurnQueue()
        self._inflight: set[str] = set()  # waiting or being validated in this process
        self._lock = threading.Lock()
        self._workers = workers
        self._threads: list[threading.Thread] = []

    def submit(self, file_id: str, tenant_id: str) -> None:
        """Validate ``file_id`` (of ``tenant_id``) soon, unless it is already waiting or being validated in this
        process. The threads start with the first upload (no work at import or app creation)."""
        with self._lock:
            if file_id in self._inflight:
                return
            self._inflight.add(file_id)
            if len(self._threads) < self._workers:
                thread = threading.Thread(target=self._serve, name=f"qwenvl-validate-{len(self._threads)}",
                                          daemon=True)
                self._threads.append(thread)
                thread.start()
        self._queue.put(tenant_id, file_id)

    def in_flight(self, file_id: str) -> bool:
        with self._lock:
            return file_id in self._inflight

    def in_flight_ids(self) -> list[str]:
        with self._lock:
            return list(self._inflight)

    def _serve(self) -> None:
        while (file_id := self._queue.get()) is not None:
            self._validate(file_id)

    def _validate(self, file_id: str) -> None:
        try:
            with self.sessions() as s:
                row = repo.file_by_id(s, file_id=file_id)
                if row is None or row.status != "uploaded":
                    return
                key, name = row.storage_key, row.filename
            verdict = self._report(key, name)
            if verdict is None:  # interrupted (the API is being restarted): stays ``uploaded``, validated again
                log.info("validation of %s was interrupted; it stays uploaded", file_id)
                return
            status, report = verdict
            with self.sessions() as s, s.begin():
                repo.set_file_validation(s, file_id=file_id, status=status, report=report)
        except Exception:
            log.exception("validation of %s failed", file_id)
        finally:
            with self._lock:
                self._inflight.discard(file_id)

    def _report(self, key: str, name: str) -> tuple[str, dict[str, Any]] | None:
        """``(status, report)``, or None when the worker was interrupted (no verdict)."""
        try:
            report = run_worker(self.storage, key, name, self.timeout_s)["report"]
        except WorkerInterrupted:
            return None
        except (Unavailable, InvalidRequest) as exc:
            report = {"ok": False, "error_count": 1, "errors": [{"code": "validation_failed", "message": exc.message,
                                                                 "file": name, "line": None, "text": exc.message}]}
        return ("processed" if report.get("ok") else "error"), report

    def shutdown(self) -> None:
        """Drop the waiting uploads (the scheduler submits them again after a restart: they stay ``uploaded``)
        and wait for the validations running now."""
        for file_id in self._queue.close():
            with self._lock:
                self._inflight.discard(file_id)
        for thread in self._threads:
            thread.join()
