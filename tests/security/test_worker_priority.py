"""Background workers (file validation after upload, estimates) cannot take the CPU from other tenants' requests:
they run under ``SCHED_IDLE`` (Linux) and niced, with one math thread, and are started off the event loop.
Measured effect: ``bench/tenant_isolation.py`` (docs/benchmarks.md)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from service import validation


def test_a_worker_runs_as_idle_priority_background_work_with_one_math_thread() -> None:
    code = "import os, sys; print(os.environ['OMP_NUM_THREADS'], flush=True); sys.stdin.read()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=validation._worker_env())
    try:
        validation._lower_priority(proc.pid)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "1"
        ours = os.getpriority(os.PRIO_PROCESS, 0)
        assert os.getpriority(os.PRIO_PROCESS, proc.pid) == min(ours + validation.WORKER_NICE, 19)
        if hasattr(os, "SCHED_IDLE"):  # Linux: preempted at once by any API thread that wakes
            assert os.sched_getscheduler(proc.pid) == os.SCHED_IDLE
    finally:
        proc.communicate("")


def test_renicing_a_worker_that_already_exited_is_harmless() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    validation._lower_priority(proc.pid)  # no exception: the pid is gone


def test_an_estimate_worker_is_started_off_the_event_loop_and_reports(monkeypatch, tmp_path) -> None:
    """``python -m service`` runs on uvloop, whose subprocess support forks the whole API process on the loop's
    thread (milliseconds per GB mapped, every request waiting): the worker must be started from a thread."""
    import json
    import threading

    from service.storage import TenantStorage

    uvloop = pytest.importorskip("uvloop")  # what uvicorn runs on where it installs (Linux, macOS)

    storage = TenantStorage(str(tmp_path / "store"))
    line = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    key = storage.file_key("tenant", "file-1", "train.jsonl")
    storage.store.put_bytes(key, (line + "\n").encode() * 3)
    started_on: list[int] = []
    start = validation._start_worker

    def recording_start(cmd: list[str]) -> subprocess.Popen[str]:
        started_on.append(threading.get_ident())
        return start(cmd)

    monkeypatch.setattr(validation, "_start_worker", recording_start)

    async def estimate() -> tuple[int, dict]:
        return threading.get_ident(), await validation.run_worker_async(storage, key, "train.jsonl", 120)

    loop_thread, out = uvloop.run(estimate())
    assert started_on and started_on[0] != loop_thread
    assert out["report"]["ok"] and out["report"]["valid_samples"] == 3, out


def test_a_cancellation_while_the_worker_starts_still_kills_it(monkeypatch, tmp_path) -> None:
    """A client that goes away while its estimate's worker is being started: the worker is killed and reaped, not
    left running unowned."""
    import time

    import anyio

    from service.storage import TenantStorage

    storage = TenantStorage(str(tmp_path / "store"))
    key = storage.file_key("tenant", "file-1", "train.jsonl")
    storage.store.put_bytes(key, b'{"messages": []}\n')
    started: list[subprocess.Popen[str]] = []
    start = validation._start_worker

    def slow_start(cmd: list[str]) -> subprocess.Popen[str]:
        started.append(start(cmd))
        time.sleep(0.5)  # the cancellation arrives while the thread is still in here
        return started[-1]

    monkeypatch.setattr(validation, "_start_worker", slow_start)

    async def cancelled_estimate() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(validation.run_worker_async, storage, key, "train.jsonl", 120)
            await anyio.sleep(0.1)
            group.cancel_scope.cancel()

    anyio.run(cancelled_estimate)
    assert len(started) == 1 and started[0].poll() is not None  # killed and reaped
