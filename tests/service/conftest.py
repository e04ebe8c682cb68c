"""Servers for the service tests: a real local Ray head (dashboard + Ray Jobs) and the API under uvicorn."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.net import free_port, wait_for_port


@pytest.fixture(scope="session")
def ray_dashboard() -> Iterator[str]:
    """``ray start --head --block`` with 2 CPUs on free ports; its dashboard URL. The whole process group
    (only what this fixture started) is terminated afterwards."""
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    dash, gcs = free_port(), free_port()
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus", "2",
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--port", str(gcs), "--temp-dir", temp_dir, "--disable-usage-stats",
           "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port()),
           "--metrics-export-port", str(free_port())]
    log = open(Path(temp_dir) / "head.log", "wb")
    # A private token for this cluster: the API process (and its children) must present it.
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    patch = pytest.MonkeyPatch()
    for name, value in token.items():
        patch.setenv(name, value)
    _reload_ray_auth()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    try:
        wait_for_port(dash, proc, timeout=120)
        url = f"http://127.0.0.1:{dash}"
        _wait_jobs_api(url, proc)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        patch.undo()
        _reload_ray_auth()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _reload_ray_auth() -> None:
    """Make this process's Ray client read RAY_AUTH_MODE / RAY_AUTH_TOKEN again.

    Ray copies them into process-wide caches when it is first imported (a test module importing ``workflows`` at
    collection time is enough), so changing the environment afterwards has no effect until the caches are
    reloaded; this is what Ray's own ``authentication_test_utils.reset_auth_token_state`` does.
    """
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _wait_jobs_api(url: str, proc: subprocess.Popen[bytes], timeout: float = 90) -> None:
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout
    while True:
        try:
            JobSubmissionClient(url).list_jobs()
            return
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(1)


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
