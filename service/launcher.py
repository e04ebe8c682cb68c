"""Launching training jobs on Ray through Ray Jobs (``JobSubmissionClient`` against the dashboard).

Why Ray Jobs rather than a detached actor: a Ray job is a separate driver process the cluster supervises, with
its own logs, status and ``stop_job``; it outlives the API process (a restart loses nothing), it runs the exact
command a user can run by hand (``python -m workflows.finetune --spec SPEC.json``) and it needs no Ray client
connection held open by the API. The job id of the service is the base of the submission id
(``{job_id}-a{attempt}``), so a retry never collides with the dead attempt. Credentials reach the driver and,
through Ray Train's runtime env, every worker via ``runtime_env.env_vars``.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
_PASSTHROUGH_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                    "AWS_DEFAULT_REGION", "AWS_REGION")


class Launcher(Protocol):
    """What the scheduler needs from a cluster."""

    def submit(self, submission_id: str, spec_uri: str) -> None: ...
    def status(self, submission_id: str) -> str | None:
        """PENDING / RUNNING / SUCCEEDED / FAILED / STOPPED, or None when the cluster does not know the job."""
        ...
    def stop(self, submission_id: str) -> None: ...


class LauncherUnavailable(RuntimeError):
    """The cluster could not be reached (nothing is concluded about the job)."""


class RayJobsLauncher:
    """Ray Jobs submission (see the module docstring)."""

    def __init__(self, address: str, entrypoint: str, num_cpus: float, env: dict[str, str],
                 pythonpath: str | None = None) -> None:
        self.address, self.entrypoint, self.num_cpus = address, entrypoint, num_cpus
        project_root = str(Path(__file__).resolve().parent.parent)
        self.env = {k: os.environ[k] for k in _PASSTHROUGH_ENV if k in os.environ}
        self.env["PYTHONPATH"] = pythonpath or project_root
        self.env.update(env)
        self._client: Any | None = None

    def _jobs(self) -> Any:
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            try:
                self._client = JobSubmissionClient(self.address)
            except Exception as exc:
                raise LauncherUnavailable(f"Ray dashboard at {self.address} unreachable: {exc}") from exc
        return self._client

    def command(self, spec_uri: str) -> str:
        return self.entrypoint.format(python=shlex.quote(sys.executable), spec=shlex.quote(spec_uri))

    def submit(self, submission_id: str, spec_uri: str) -> None:
        try:
            self._jobs().submit_job(entrypoint=self.command(spec_uri), submission_id=submission_id,
                                    entrypoint_num_cpus=self.num_cpus, runtime_env={"env_vars": self.env})
        except LauncherUnavailable:
            raise
        except Exception as exc:
            if "already exists" in str(exc):  # a previous leader submitted it and died before recording it
                return
            raise LauncherUnavailable(f"submitting {submission_id} failed: {exc}") from exc

    def status(self, submission_id: str) -> str | None:
        try:
            return str(self._jobs().get_job_status(submission_id).value)
        except LauncherUnavailable:
            raise
        except Exception as exc:
            if "does not exist" in str(exc) or "not found" in str(exc).lower():
                return None
            raise LauncherUnavailable(f"status of {submission_id}: {exc}") from exc

    def stop(self, submission_id: str) -> None:
        try:
            self._jobs().stop_job(submission_id)
        except Exception as exc:
            log.warning("stop_job(%s) failed: %s", submission_id, exc)

    def logs(self, submission_id: str) -> str:
        try:
            return str(self._jobs().get_job_logs(submission_id))
        except Exception as exc:
            return f"(logs unavailable: {exc})"
