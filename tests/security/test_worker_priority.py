"""Background workers (file validation after upload, estimates) cannot take the CPU from other tenants' requests:
they run niced, with one math thread. Measured effect: ``bench/tenant_isolation.py`` (docs/benchmarks.md)."""

from __future__ import annotations

import os
import subprocess
import sys

from service import validation


def test_a_worker_runs_at_a_lower_priority_with_one_math_thread() -> None:
    code = "import os, sys; print(os.environ['OMP_NUM_THREADS'], flush=True); sys.stdin.read()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=validation._worker_env())
    try:
        validation._lower_priority(proc.pid)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "1"
        ours = os.getpriority(os.PRIO_PROCESS, 0)
        assert os.getpriority(os.PRIO_PROCESS, proc.pid) == min(ours + validation.WORKER_NICE, 19)
    finally:
        proc.communicate("")


def test_renicing_a_worker_that_already_exited_is_harmless() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    validation._lower_priority(proc.pid)  # no exception: the pid is gone
