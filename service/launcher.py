"""Launching training jobs on Ray through Ray Jobs (``JobSubmissionClient`` against the dashboard).

Why Ray Jobs rather than a detached actor: a Ray job is a separate driver process the cluster supervises, with
its own logs, status and ``stop_job``; it outlives the API process (a restart loses nothing), it runs the exact
command a user can run by hand (``python -m workflows.finetune --spec SPEC.json``) and it needs no Ray client
connection held open by the API. The job id of the service is the base of the submission id
(``{job_id}-a{attempt}``), so a retry never collides with the dead attempt.

**No secrets in the runtime env.** A Ray job's ``runtime_env`` is shown by the dashboard and by
``JobSubmissionClient.get_job_info`` to anyone who reaches the Jobs API, so ``submission_env`` puts only
``PYTHONPATH`` and the configured ``job_env`` there, and drops any secret-named variable (``looks_secret``). The
driver takes its S3 keys and the MLflow login it logs with from its node's environment (KubeRay: the pods' Secret;
``qwenvl up``: the environment the Ray nodes start with) and hands its workers only what they need
(``workflows.finetune.worker_environment``).
"""

from __future__ import annotations

import logging
import re
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from qwenvl_core.secret_names import looks_secret

log = logging.getLogger(__name__)

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
_SUBMISSION = re.compile(r"(?P<job>ftjob-[0-9a-f]+)-a[1-9][0-9]*")


def submission_id(job_id: str, attempt: int) -> str:
    """The Ray job id of attempt ``attempt`` (1, 2, ...) of job ``job_id``."""
    return f"{job_id}-a{attempt}"


def job_of_submission(submission: str) -> str | None:
    """The job id a Ray job id names (``submission_id``'s inverse); None for a Ray job not named by us."""
    match = _SUBMISSION.fullmatch(submission)
    return match["job"] if match else None


def submission_env(env: Mapping[str, str], pythonpath: str) -> dict[str, str]:
    """The Ray job's ``runtime_env.env_vars``: ``PYTHONPATH`` and ``env`` (the service's ``job_env``) without any
    secret-named variable (see the module docstring); a dropped name is logged, never its value."""
    dropped = sorted(name for name in env if looks_secret(name))
    if dropped:
        log.warning("not passing %s to Ray jobs: a job's runtime env is visible in the Ray dashboard; give "
                    "secrets to the Ray nodes' environment instead", ", ".join(dropped))
    return {"PYTHONPATH": pythonpath, **{k: v for k, v in env.items() if k not in dropped}}


class Launcher(Protocol):
    """What the scheduler needs from a cluster."""

    def submit(self, submission_id: str, spec_uri: str) -> None: ...
    def status(self, submission_id: str) -> str | None:
        """PENDING / RUNNING / SUCCEEDED / FAILED / STOPPED; None only when the cluster says the job does not exist
        (the scheduler re-queues it); ``LauncherUnavailable`` when the answer is unknown (nothing is concluded)."""
        ...
    def stop(self, submission_id: str) -> None: ...
    def live_submissions(self) -> set[str]:
        """The submission ids of the cluster's jobs that are PENDING or RUNNING (``LauncherUnavailable`` when it
        cannot tell)."""
        ...


class LauncherUnavailable(RuntimeError):
    """The cluster could not be reached (nothing is concluded about the job)."""


def _job_does_not_exist(error: str, submission_id: str) -> bool:
    """Ray's dashboard answers an unknown job with 404 and the text "Job <id> does not exist"; the Jobs SDK raises
    it as "Request failed with status code 404: Job <id> does not exist."."""
    return "status code 404" in error and f"Job {submission_id} does not exist" in error


class RayJobsLauncher:
    """Ray Jobs submission (see the module docstring)."""

    def __init__(self, address: str, entrypoint: str, num_cpus: float, env: dict[str, str],
                 pythonpath: str | None = None) -> None:
        self.address, self.entrypoint, self.num_cpus = address, entrypoint, num_cpus
        project_root = str(Path(__file__).resolve().parent.parent)
        self.env = submission_env(env, pythonpath or project_root)
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
        """The Ray job's status; None only on Ray's explicit answer that the job does not exist (HTTP 404
        "Job <id> does not exist"). Any other failure (a proxy's 404 "Not Found", a timeout, a 5xx) says nothing
        about the job: ``LauncherUnavailable``, which the scheduler treats as unknown and never re-queues on."""
        try:
            return str(self._jobs().get_job_status(submission_id).value)
        except LauncherUnavailable:
            raise
        except Exception as exc:
            if _job_does_not_exist(str(exc), submission_id):
                return None
            raise LauncherUnavailable(f"status of {submission_id}: {exc}") from exc

    def stop(self, submission_id: str) -> None:
        try:
            self._jobs().stop_job(submission_id)
        except Exception as exc:
            log.warning("stop_job(%s) failed: %s", submission_id, exc)

    def live_submissions(self) -> set[str]:
        try:
            jobs = self._jobs().list_jobs()
        except LauncherUnavailable:
            raise
        except Exception as exc:
            raise LauncherUnavailable(f"listing the cluster's jobs: {exc}") from exc
        return {str(job.submission_id) for job in jobs
                if job.submission_id and str(job.status.value) not in TERMINAL}

    def logs(self, submission_id: str) -> str:
        try:
            return str(self._jobs().get_job_logs(submission_id))
        except Exception as exc:
            return f"(logs unavailable: {exc})"
