"""The scheduler end to end on a real local Ray head through Ray Jobs, with a real entrypoint
(``fake_workflow.py``) that honours the workflow contract: success with progress, events, checkpoints, adapter
registration and the serving hook; a Ray job dying without a result is retried; restart of the API process
(SIGKILL) while a job runs loses nothing; the launcher lists what the cluster runs (the scheduler stops strays).
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.context import AdapterReady
from service.launcher import LauncherUnavailable, RayJobsLauncher
from service.main import create_app
from tests.service.conftest import ApiServer, server_env
from tests.service.helpers import FAKE_WORKFLOW, auth, make_settings, upload, wait_file, wait_for

ENTRY = f"{{python}} {FAKE_WORKFLOW} --spec {{spec}}"


def _app(data_dir: Path, model_dir: Path, ray: str, **overrides: object) -> TestClient:
    settings = make_settings(data_dir, model_dir, scheduler_enabled=True, ray_address=ray, job_entrypoint=ENTRY,
                             **overrides)
    return TestClient(create_app(settings))


def _key(data_dir: Path) -> str:
    return (data_dir / "api_key").read_text().strip()


def test_job_runs_on_ray_and_registers_its_adapter(tmp_path: Path, tiny_model_dir: Path, ray_dashboard: str) -> None:
    ready: list[AdapterReady] = []
    client = _app(tmp_path, tiny_model_dir, ray_dashboard, job_env={"FAKE_STEP_S": "0.4"})
    client.app.state.ctx.adapter_hooks.append(ready.append)  # type: ignore[attr-defined]
    with client:
        key = _key(tmp_path)
        file_id = upload(client, key)["id"]
        job = client.post("/v1/fine_tuning/jobs", json={"model": "qwen-vl-tiny", "training_file": file_id,
                                                        "suffix": "e2e", "max_steps": 6}, headers=auth(key)).json()
        url = f"/v1/fine_tuning/jobs/{job['id']}"
        running = wait_for(lambda: client.get(url, headers=auth(key)).json(),
                           lambda d: (d["progress"] or {}).get("step", 0) >= 1 or d["status"] in ("succeeded", "failed"),
                           timeout=600)
        assert running["status"] == "running" and running["estimated_finish"] is not None, running
        done = wait_for(lambda: client.get(url, headers=auth(key)).json(),
                        lambda d: d["status"] in ("succeeded", "failed", "cancelled"), timeout=600)
        assert done["status"] == "succeeded", done
        model = f"ft:qwen-vl-tiny:default:e2e:{job['id']}"
        assert done["fine_tuned_model"] == model and done["trained_tokens"] == 600 and done["result_files"]
        events = client.get(f"{url}/events", params={"limit": 100}, headers=auth(key)).json()["data"]
        metrics = [e for e in events if e["type"] == "metrics"]
        assert [e["data"]["step"] for e in metrics] == [6, 5, 4, 3, 2, 1]
        ckpts = client.get(f"{url}/checkpoints", headers=auth(key)).json()["data"]
        assert ckpts[0]["step_number"] == 3 and ckpts[0]["fine_tuned_model_checkpoint"] == f"{model}:ckpt-step-3"
        assert [r.model_id for r in ready] == [model] and ready[0].adapter_uri.endswith("/adapter")
        assert model in {m["id"] for m in client.get("/v1/models", headers=auth(key)).json()["data"]}
        archive = client.get(f"/v1/models/{model}/content", headers=auth(key))
        names = tarfile.open(fileobj=io.BytesIO(archive.content)).getnames()
        assert sorted(names) == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors"]
        result = client.get(f"/v1/files/{done['result_files'][-1]}/content", headers=auth(key)).json()
        assert result["state"] == "succeeded"
        assert client.delete(f"/v1/models/{model}", headers=auth(key)).json()["deleted"] is True
        assert client.get(f"/v1/models/{model}", headers=auth(key)).status_code == 404


def test_dead_ray_job_is_retried_then_succeeds(tmp_path: Path, tiny_model_dir: Path, ray_dashboard: str) -> None:
    with _app(tmp_path, tiny_model_dir, ray_dashboard, job_env={"FAKE_MODE": "crash_once", "FAKE_STEP_S": "0.1"},
              max_job_attempts=2) as client:
        key = _key(tmp_path)
        file_id = upload(client, key)["id"]
        job = client.post("/v1/fine_tuning/jobs", json={"model": "qwen-vl-tiny", "training_file": file_id,
                                                        "max_steps": 2}, headers=auth(key)).json()
        url = f"/v1/fine_tuning/jobs/{job['id']}"
        done = wait_for(lambda: client.get(url, headers=auth(key)).json(),
                        lambda d: d["status"] in ("succeeded", "failed", "cancelled"), timeout=600)
        assert done["status"] == "succeeded", done
        messages = [e["message"] for e in client.get(f"{url}/events", params={"limit": 100},
                                                     headers=auth(key)).json()["data"]]
        assert any("without a result; re-queued (attempt 1 of 2)" in m for m in messages), messages
        assert any(f"submission {job['id']}-a2" in m for m in messages)


def test_only_rays_own_answer_means_a_job_does_not_exist(ray_dashboard: str) -> None:
    """The launcher reads Ray's 404 "Job ... does not exist" as vanished (None), and nothing else."""
    launcher = RayJobsLauncher(ray_dashboard, ENTRY, 0.1, {})
    assert launcher.status("ftjob-never-submitted-a1") is None
    with pytest.raises(LauncherUnavailable):
        RayJobsLauncher("http://127.0.0.1:9", ENTRY, 0.1, {}).status("ftjob-never-submitted-a1")  # nobody there


def test_the_launcher_lists_the_submissions_the_cluster_runs(ray_dashboard: str) -> None:
    """What the scheduler's stray check reads: a submission is listed while it runs, and no longer once stopped."""
    launcher = RayJobsLauncher(ray_dashboard, "{python} -c 'import time; time.sleep(120)' {spec}", 0.1, {})
    submission = "ftjob-" + "1" * 24 + "-a1"
    launcher.submit(submission, "spec-unused")
    try:
        wait_for(lambda: {"live": sorted(launcher.live_submissions())}, lambda doc: submission in doc["live"])
    finally:
        launcher.stop(submission)
    wait_for(lambda: {"live": sorted(launcher.live_submissions())}, lambda doc: submission not in doc["live"])
    assert launcher.status(submission) == "STOPPED"
    with pytest.raises(LauncherUnavailable):
        RayJobsLauncher("http://127.0.0.1:9", ENTRY, 0.1, {}).live_submissions()  # nobody there


@pytest.fixture
def api_server(tmp_path: Path, tiny_model_dir: Path, ray_dashboard: str) -> ApiServer:
    env = server_env(tmp_path / "data", tiny_model_dir, ray_dashboard, QWENVL_JOB_ENV='{"FAKE_STEP_S": "0.7"}')
    server = ApiServer(env, tmp_path / "api.log")
    server.start()
    yield server
    server.stop()


def test_restart_during_a_run_loses_nothing(api_server: ApiServer, tmp_path: Path) -> None:
    key = _key(tmp_path / "data")
    with httpx.Client(base_url=api_server.url, headers=auth(key), timeout=30) as http:
        file_id = upload(http, key)["id"]
        wait_file(http, key, file_id)
        job = http.post("/v1/fine_tuning/jobs", json={"model": "qwen-vl-tiny", "training_file": file_id,
                                                      "max_steps": 8}).json()
        url = f"/v1/fine_tuning/jobs/{job['id']}"
        wait_for(lambda: http.get(url).json(), lambda d: (d["progress"] or {}).get("step", 0) >= 1, timeout=600)
    api_server.kill()  # mid-run, no graceful shutdown
    api_server.start()
    with httpx.Client(base_url=api_server.url, headers=auth(key), timeout=30) as http:
        done = wait_for(lambda: http.get(url).json(), lambda d: d["status"] in ("succeeded", "failed"), timeout=600)
        assert done["status"] == "succeeded", (done, api_server.log_tail())
        steps = [e["data"]["step"] for e in http.get(f"{url}/events", params={"limit": 100}).json()["data"]
                 if e["type"] == "metrics"]
        assert steps == list(range(8, 0, -1))
        assert done["fine_tuned_model"] in {m["id"] for m in http.get("/v1/models").json()["data"]}
