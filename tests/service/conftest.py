"""Servers for the service tests: the API under uvicorn (the real local Ray head, ``ray_dashboard``, is the shared
fixture of ``tests/fixtures/ray_head.py``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.fixtures.net import free_port, wait_for_port


class ApiServer:
    """``python -m service`` in a subprocess (its own process group), restartable with the same environment."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env, self.log_path, self.port = env, log_path, free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "service", "--port", str(self.port)], env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_for_port(self.port, self.proc, timeout=120)
        httpx.get(f"{self.url}/ready", timeout=30).raise_for_status()

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, the lease is left behind like after a crash."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""


def server_env(data_dir: Path, model_dir: Path, ray_url: str | None, **extra: str) -> dict[str, str]:
    import json

    from tests.service.helpers import FAKE_WORKFLOW

    env = {**os.environ, "QWENVL_DATA_DIR": str(data_dir), "QWENVL_SCHEDULER_INTERVAL_S": "0.3",
           "QWENVL_LEASE_TTL_S": "3", "QWENVL_BASE_MODELS": json.dumps({"qwen-vl-tiny": str(model_dir)}),
           "QWENVL_JOB_ENTRYPOINT": f"{{python}} {FAKE_WORKFLOW} --spec {{spec}}", **extra}
    if ray_url:
        env["QWENVL_RAY_ADDRESS"] = ray_url
    return env
