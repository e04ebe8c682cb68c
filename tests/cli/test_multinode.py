"""Multi-node on this machine: ``qwenvl up --worker-nodes 1`` starts a Ray head and a worker node as separate
processes, deploys the whole application (the REST API and the model on Ray Serve) on that cluster, a fine-tune
submitted through the REST API puts its two Ray Train workers on the two nodes, the adapter answers a chat
completion, and ``qwenvl down`` leaves no process behind. Real processes and HTTP throughout."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from qwenvl_cli.demo_data import write_demo_dataset
from qwenvl_cli.stack import BASE_MODEL
from tests.cli.conftest import processes_of, qwenvl, stack_env

TERMINAL = ("succeeded", "failed", "cancelled")


def _nodes(status: dict, home: Path) -> list[dict]:
    """The cluster's nodes as the Ray dashboard's state API lists them (with the stack's Ray auth token)."""
    token = (home / "ray_auth_token").read_text().strip()
    response = httpx.get(f"{status['ray_dashboard']['url']}/api/v0/nodes", params={"limit": 100},
                         headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["data"]["result"]["result"]


def _wait(client: httpx.Client, path: str, done: tuple[str, ...], timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        body = client.get(path).raise_for_status().json()
        if body["status"] in done or time.monotonic() > deadline:
            return body
        time.sleep(1)


@pytest.mark.slow
def test_fine_tune_through_the_api_spreads_over_a_head_and_a_worker_node(tmp_path: Path) -> None:
    started = time.monotonic()
    home = tmp_path / "home"
    env = stack_env(home)
    data = write_demo_dataset(tmp_path / "data", n_train=16, n_validation=4)
    try:  # (`down` also after an `up` that timed out)
        up = qwenvl(env, "up", "--worker-nodes", "1", "--num-cpus", "2", "--models", BASE_MODEL, timeout=600)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert "nodes 2/2 alive" in up.stdout
        report = qwenvl(env, "status", "--json")
        assert report.returncode == 0, report.stdout + report.stderr
        status = json.loads(report.stdout)
        assert status["running"] and status["ray_nodes"] == {"alive": 2, "expected": 2}
        state = json.loads((home / "stack.json").read_text())
        assert set(state["pids"]) == {"mlflow", "ray_head", "ray_worker_1"} and state["worker_nodes"] == 1

        nodes = [n for n in _nodes(status, home) if n["state"] == "ALIVE"]
        head = {n["node_id"] for n in nodes if n["is_head_node"]}
        worker = {n["node_id"] for n in nodes if not n["is_head_node"]}
        assert len(head) == 1 and len(worker) == 1

        key = Path(status["api_key_file"]).read_text().strip()
        with httpx.Client(base_url=status["api"]["url"], headers={"Authorization": f"Bearer {key}"},
                          timeout=60) as client:
            with data.train_bundle.open("rb") as f:
                uploaded = client.post("/v1/files", files={"file": (data.train_bundle.name, f)},
                                       data={"purpose": "fine-tune"})
            assert uploaded.status_code == 200, uploaded.text
            file = _wait(client, f"/v1/files/{uploaded.json()['id']}", ("processed", "error"), 300)
            assert file["status"] == "processed", file
            created = client.post("/v1/fine_tuning/jobs", json={
                "model": BASE_MODEL, "training_file": file["id"], "suffix": "multinode", "max_steps": 4,
                "method": {"type": "supervised", "supervised": {"hyperparameters": {
                    "batch_size": 2, "learning_rate_multiplier": 1000}}},
                "compute": {"num_workers": 2, "cpus_per_worker": 0.5, "placement_strategy": "SPREAD"}})
            assert created.status_code == 200, created.text
            job = _wait(client, f"/v1/fine_tuning/jobs/{created.json()['id']}", TERMINAL, 600)
            assert job["status"] == "succeeded", job

            run = next(home.glob(f"objects/tenants/*/runs/{job['id']}"))
            ranks = [json.loads((run / "workers" / f"rank{r}.json").read_text())["node_id"] for r in (0, 1)]
            assert ranks[0] != ranks[1]
            assert set(ranks) == head | worker  # one worker on the head, one on the worker node

            model = job["fine_tuned_model"]
            assert model.startswith(f"ft:{BASE_MODEL}:") and model.endswith(job["id"])
            answer = client.post("/v1/chat/completions", json={
                "model": model, "max_tokens": 4,
                "messages": [{"role": "user", "content": "What colour is the circle?"}]})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["model"] == model and body["choices"][0]["finish_reason"] in ("stop", "length")
            assert body["usage"]["completion_tokens"] >= 1

        # a worker node that goes away is reported: status counts the alive nodes against the expected ones
        os.killpg(state["pids"]["ray_worker_1"], signal.SIGTERM)
        deadline = time.monotonic() + 60
        while (status := json.loads(qwenvl(env, "status", "--json").stdout))["ray_nodes"]["alive"] != 1:
            assert time.monotonic() < deadline, status
            time.sleep(1)
        after = qwenvl(env, "status")
        assert after.returncode == 1 and "nodes 1/2 alive" in after.stdout, after.stdout
    finally:
        down = qwenvl(env, "down", timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
        assert processes_of(home) == []
        print(f"multi-node test: {time.monotonic() - started:.0f} s")


@pytest.mark.parametrize(("flag", "value"), [("--worker-nodes", "-1"), ("--num-cpus", "0")])
def test_up_with_an_impossible_node_shape_explains(tmp_path: Path, flag: str, value: str) -> None:
    home = tmp_path / "home"
    result = qwenvl(stack_env(home), "up", flag, value, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stdout + result.stderr
    minimum = 0 if flag == "--worker-nodes" else 1
    assert result.stderr.strip() == f"error: {flag} must be {minimum} or more, not {value}"
    assert processes_of(home) == [] and not (home / "stack.json").exists()
