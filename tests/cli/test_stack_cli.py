"""The ``qwenvl`` remote commands against a real local stack (``qwenvl up``): subprocesses and real HTTP.

The stack runs on two Ray nodes (``qwenvl up --worker-nodes 1``: a head and a worker node as separate processes),
so its tests also show the multi-node path: the whole application deployed on that cluster, a fine-tune submitted
through the REST API putting its two Ray Train workers on the two nodes, a worker node that goes away reported by
``qwenvl status``, and ``qwenvl down`` leaving no process of either node behind."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from qwenvl_cli.demo_data import write_demo_dataset
from qwenvl_cli.stack import BASE_MODEL, BASE_MODELS, is_running, parse_models
from tests.cli.conftest import QWENVL, STACK_MODELS, Stack, processes_of, qwenvl, stack_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory: pytest.TempPathFactory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo-data"), n_train=60, n_validation=12)


def _one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    line = result.stderr.strip()
    assert line.startswith("error: ") and "\n" not in line, line
    for needle in needles:
        assert needle in line, line


def test_status_reports_urls_health_and_the_key_file(stack: Stack) -> None:
    result = qwenvl(stack.env, "status", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["running"] is True and report["ray_nodes"] == {"alive": 2, "expected": 2}
    state = json.loads((stack.home / "stack.json").read_text())
    assert set(state["pids"]) == {"mlflow", "ray_head", "ray_worker_1"} and state["worker_nodes"] == 1
    shown = qwenvl(stack.env, "status")
    assert shown.returncode == 0 and "nodes 2/2 alive" in shown.stdout, shown.stdout + shown.stderr
    assert report["api"]["url"] == f"http://127.0.0.1:{stack.env['QWENVL_API_PORT']}"
    assert report["mlflow"]["healthy"] and report["ray_dashboard"]["healthy"]
    key = Path(report["api_key_file"]).read_text().strip()
    assert Path(report["api_key_file"]).stat().st_mode & 0o777 == 0o600
    models = httpx.get(f"{report['api']['url']}/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
    assert sorted(m["id"] for m in models["data"]) == sorted(STACK_MODELS)


def test_files_models_chat_and_api_errors(stack: Stack, demo_data, tmp_path: Path) -> None:
    uploaded = qwenvl(stack.env, "files", "upload", str(demo_data.validation_bundle), "--json")
    assert uploaded.returncode == 0, uploaded.stderr
    file_id = json.loads(uploaded.stdout)["id"]
    assert json.loads(uploaded.stdout)["status"] == "processed"
    listed = qwenvl(stack.env, "files", "list", "--json")
    assert file_id in [f["id"] for f in json.loads(listed.stdout)]
    shown = qwenvl(stack.env, "files", "show", file_id)
    assert json.loads(shown.stdout)["validation"] is not None
    _one_line_error(qwenvl(stack.env, "files", "show", "file-nope"), "404", "file-nope")
    _one_line_error(qwenvl(stack.env, "files", "list", "--api-key", "sk-qv-wrong_key"), "401")
    _one_line_error(qwenvl(stack.env, "jobs", "create", "-m", BASE_MODEL, "-t", "file-nope"), "file-nope")
    _one_line_error(qwenvl(stack.env, "models", "delete", BASE_MODEL), "403", "base model")
    unserved = next(m for m in BASE_MODELS if m not in STACK_MODELS)  # a base this stack was not started with
    _one_line_error(qwenvl(stack.env, "jobs", "create", "-m", unserved, "-t", file_id), "404", unserved)
    models = qwenvl(stack.env, "models", "list", "--json")
    assert sorted(m["id"] for m in json.loads(models.stdout)) == sorted(STACK_MODELS)
    chat = qwenvl(stack.env, "chat", BASE_MODEL, demo_data.grounding_question, "--image",
                  str(demo_data.grounding_image), "--max-tokens", "4", "--json")
    assert chat.returncode == 0, chat.stderr
    assert json.loads(chat.stdout)["choices"][0]["finish_reason"] in ("stop", "length")
    _one_line_error(qwenvl(stack.env, "chat", "ft:nope", "hi"), "404")
    offline = {**stack.env, "QWENVL_BASE_URL": "http://127.0.0.1:9"}
    _one_line_error(qwenvl(offline, "models", "list"), "cannot reach the API")


def test_tenants_create_gives_a_working_key(stack: Stack) -> None:
    created = qwenvl(stack.env, "tenants", "create", "acme", "--json")
    assert created.returncode == 0, created.stderr
    body = json.loads(created.stdout)
    assert body["tenant"]["name"] == "acme" and body["mlflow"]["username"]
    models = qwenvl(stack.env, "models", "list", "--json", "--api-key", body["key"]["key"])
    assert models.returncode == 0, models.stderr
    files = qwenvl(stack.env, "files", "list", "--json", "--api-key", body["key"]["key"])
    assert json.loads(files.stdout) == []  # the default tenant's uploads are not visible to acme
    _one_line_error(qwenvl(stack.env, "tenants", "create", "x", "--admin-key", "sk-qv-admin-wrong"), "401")


def test_ctrl_c_in_jobs_watch_leaves_the_job_running_then_pause_resume_and_cancel_it(stack: Stack, demo_data) -> None:
    """One job through the CLI (one Ray Train launch, not one per step): Ctrl-C in `qwenvl jobs watch` leaves it
    running; `jobs pause` pauses it, `watch` stops at the paused job and says how to go on, `resume` continues it
    (a second resume is refused), `cancel` ends it."""
    train = json.loads(qwenvl(stack.env, "files", "upload", str(demo_data.train_bundle), "--json").stdout)["id"]
    created = qwenvl(stack.env, "jobs", "create", "-m", BASE_MODEL, "-t", train, "--max-steps", "400",
                     "--workers", "1", "--cpus-per-worker", "0.5", "--json")
    assert created.returncode == 0, created.stderr
    job_id = json.loads(created.stdout)["id"]
    # Ctrl-C as in a terminal: a shell running the tests in the background starts them with SIGINT ignored, which
    # Python would keep (no KeyboardInterrupt); the watch gets the default disposition back, as a terminal's has.
    watch = subprocess.Popen([QWENVL, "jobs", "watch", job_id], env=stack.env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert watch.stdout is not None and select.select([watch.stdout], [], [], 120)[0], "watch never started"
    assert watch.stdout.readline().startswith(f"watching {job_id}")  # it is in its loop now (however slow to start)
    time.sleep(2)
    assert watch.poll() is None, "watch ended before the job did"
    watch.send_signal(signal.SIGINT)
    out, err = watch.communicate(timeout=120)  # generous: a loaded machine can be slow to wind the CLI down
    assert watch.returncode == 130, out + err
    assert "keeps running" in out and "Traceback" not in err
    time.sleep(3)
    job = json.loads(qwenvl(stack.env, "jobs", "list", "--json").stdout)
    job = next(j for j in job if j["id"] == job_id)
    assert job["status"] in ("validating_files", "queued", "running") and not job["cancel_requested"]

    paused = qwenvl(stack.env, "jobs", "pause", job_id)
    assert paused.returncode == 0, paused.stderr
    watched = qwenvl(stack.env, "jobs", "watch", job_id, timeout=600)
    assert watched.returncode == 1 and f"qwenvl jobs resume {job_id}" in watched.stdout, watched.stdout
    _one_line_error(qwenvl(stack.env, "jobs", "pause", "ftjob-nope"), "404")
    resumed = qwenvl(stack.env, "jobs", "resume", job_id)
    assert resumed.returncode == 0 and "paused" not in resumed.stdout, resumed.stdout + resumed.stderr
    _one_line_error(qwenvl(stack.env, "jobs", "resume", job_id), "400", "not paused")

    cancelled = qwenvl(stack.env, "jobs", "cancel", job_id)
    assert cancelled.returncode == 0, cancelled.stderr
    ended = qwenvl(stack.env, "jobs", "watch", job_id, timeout=600)
    assert ended.returncode == 1 and "cancelled" in ended.stdout, ended.stdout + ended.stderr


SECOND_FAMILY = STACK_MODELS[1]  # qwen2.5-vl-tiny-seeing


def test_a_second_family_fine_tunes_on_ray_and_answers_the_openai_client(stack: Stack, demo_data,
                                                                          tmp_path: Path) -> None:
    """Qwen2.5-VL through the product: its pretrained tiny base is served beside v1, `qwenvl jobs create -m
    qwen2.5-vl-tiny-seeing` trains it on Ray Train with `auto` hyperparameters (a step budget only), and the
    fine-tuned model answers held-out colour questions through the official openai client well above chance (1/6),
    and a grounding question."""
    import base64

    import openai

    from qwenvl_cli.demo_data import LONE_SHAPE_SIZE
    from qwenvl_core.data.synth import generate_samples

    assert SECOND_FAMILY == "qwen2.5-vl-tiny-seeing"
    train = json.loads(qwenvl(stack.env, "files", "upload", str(demo_data.train_bundle), "--json").stdout)["id"]
    created = qwenvl(stack.env, "jobs", "create", "-m", SECOND_FAMILY, "-t", train, "--max-steps", "60",
                     "--workers", "1", "--cpus-per-worker", "0.5", "--json")
    assert created.returncode == 0, created.stderr
    job_id = json.loads(created.stdout)["id"]
    ended = qwenvl(stack.env, "jobs", "watch", job_id, timeout=600)
    assert ended.returncode == 0 and "succeeded" in ended.stdout, ended.stdout[-3000:] + ended.stderr[-2000:]
    job = next(j for j in json.loads(qwenvl(stack.env, "jobs", "list", "--json").stdout) if j["id"] == job_id)
    model = job["fine_tuned_model"]
    assert model.startswith(f"ft:{SECOND_FAMILY}:")
    status = json.loads(qwenvl(stack.env, "status", "--json").stdout)
    client = openai.OpenAI(api_key=Path(status["api_key_file"]).read_text().strip(),
                           base_url=f"{status['api']['url']}/v1", max_retries=0, timeout=120)

    def ask(image: Path, question: str, max_tokens: int) -> openai.types.chat.ChatCompletion:
        url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
        return client.chat.completions.create(model=model, max_tokens=max_tokens, temperature=0, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}])

    # Held-out colour questions (the demo's kind, pictures never trained on: seed 2; the training file is seed 0).
    colour_questions = generate_samples(6 * 24, 2, tmp_path / "held-out", lone_size=LONE_SHAPE_SIZE)[::6]
    right = 0
    for sample in colour_questions:
        question, image = sample.messages[0], Path(str(sample.messages[0].images[0].source))
        answer = ask(image, question.text, 4).choices[0].message.content
        right += answer.strip() == sample.messages[-1].text
    assert right / len(colour_questions) >= 0.6, f"{right} of {len(colour_questions)} (chance 1/6)"
    answer = ask(demo_data.grounding_image, demo_data.grounding_question, 8)
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.prompt_tokens > 20
    assert answer.system_fingerprint and answer.model == model


def _nodes(stack: Stack) -> list[dict]:
    """The cluster's nodes as the Ray dashboard's state API lists them (with the stack's Ray auth token)."""
    status = json.loads(qwenvl(stack.env, "status", "--json").stdout)
    token = (stack.home / "ray_auth_token").read_text().strip()
    response = httpx.get(f"{status['ray_dashboard']['url']}/api/v0/nodes", params={"limit": 100},
                         headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert response.status_code == 200, response.text
    return [n for n in response.json()["data"]["result"]["result"] if n["state"] == "ALIVE"]


def _wait(client: httpx.Client, path: str, done: tuple[str, ...], timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        body = client.get(path).raise_for_status().json()
        if body["status"] in done or time.monotonic() > deadline:
            return body
        time.sleep(1)


def test_a_fine_tune_through_the_api_spreads_over_the_head_and_the_worker_node(stack: Stack, demo_data) -> None:
    nodes = _nodes(stack)
    head = {n["node_id"] for n in nodes if n["is_head_node"]}
    worker = {n["node_id"] for n in nodes if not n["is_head_node"]}
    assert len(head) == 1 and len(worker) == 1
    status = json.loads(qwenvl(stack.env, "status", "--json").stdout)
    key = Path(status["api_key_file"]).read_text().strip()
    with httpx.Client(base_url=status["api"]["url"], headers={"Authorization": f"Bearer {key}"},
                      timeout=60) as client:
        with demo_data.validation_bundle.open("rb") as f:  # (12 samples: enough for 4 steps of 2)
            uploaded = client.post("/v1/files", files={"file": (demo_data.validation_bundle.name, f)},
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
        job = _wait(client, f"/v1/fine_tuning/jobs/{created.json()['id']}", ("succeeded", "failed", "cancelled"),
                    600)
        assert job["status"] == "succeeded", job

        run = next(stack.home.glob(f"objects/tenants/*/runs/{job['id']}"))
        ranks = [json.loads((run / "workers" / f"rank{r}.json").read_text())["node_id"] for r in (0, 1)]
        assert ranks[0] != ranks[1]
        assert set(ranks) == head | worker  # one worker on the head, one on the worker node

        model = job["fine_tuned_model"]
        assert model.startswith(f"ft:{BASE_MODEL}:") and model.endswith(job["id"])
        answer = client.post("/v1/chat/completions", json={
            "model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "What colour is the circle?"}]})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["model"] == model and body["choices"][0]["finish_reason"] in ("stop", "length")
        assert body["usage"]["completion_tokens"] >= 1


def test_a_worker_node_that_goes_away_is_reported(stack: Stack) -> None:
    """`qwenvl status` counts the alive nodes against the expected ones. It leaves the stack on one node: only the
    test of `down` comes after it."""
    state = json.loads((stack.home / "stack.json").read_text())
    os.killpg(state["pids"]["ray_worker_1"], signal.SIGTERM)
    deadline = time.monotonic() + 60
    while (status := json.loads(qwenvl(stack.env, "status", "--json").stdout))["ray_nodes"]["alive"] != 1:
        assert time.monotonic() < deadline, status
        time.sleep(1)
    after = qwenvl(stack.env, "status")
    assert after.returncode == 1 and "nodes 1/2 alive" in after.stdout, after.stdout


def test_down_stops_a_running_stack_whose_home_was_deleted(stack: Stack) -> None:
    """`qwenvl down` finds the processes by the marker and data dir they carry, not only through `stack.json`.
    The last test on the module's stack (it stops it): keep every test that uses `stack` above this one."""
    assert processes_of(stack.home)
    head_group = _group_members(json.loads((stack.home / "stack.json").read_text())["pids"]["ray_head"])
    assert len(head_group) > 3  # the Ray head's processes: ray start, GCS, raylet, dashboard, Ray's agents
    shutil.rmtree(stack.home, ignore_errors=True)  # the stack keeps running; files it writes meanwhile may stay
    assert not (stack.home / "stack.json").exists()
    down = qwenvl(stack.env, "down", timeout=120)
    assert down.returncode == 0 and "stopped them" in down.stdout, down.stdout + down.stderr
    assert processes_of(stack.home) == []
    # Ray's agents overwrite their environment with their process title, so no marker finds them: the process
    # groups of the marked processes are stopped as well
    assert [pid for pid in head_group if is_running(pid)] == []
    again = qwenvl(stack.env, "down", timeout=60)
    assert again.returncode == 0 and "nothing to stop" in again.stdout, again.stdout + again.stderr


def _group_members(pgid: int) -> list[int]:
    """Processes in process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.getpgid(int(entry.name)) == pgid:
                members.append(int(entry.name))
        except ProcessLookupError:
            continue
    return members


def test_up_on_a_busy_port_explains(tmp_path: Path) -> None:
    env = stack_env(tmp_path / "home")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env["QWENVL_API_PORT"] = str(busy.getsockname()[1])
        result = qwenvl(env, "up", timeout=60)
    _one_line_error(result, "already in use", "--api-port", env["QWENVL_API_PORT"])
    assert processes_of(tmp_path / "home") == []


@pytest.mark.parametrize(("flag", "value"), [("--worker-nodes", "-1"), ("--num-cpus", "0")])
def test_up_with_an_impossible_node_shape_explains(tmp_path: Path, flag: str, value: str) -> None:
    home = tmp_path / "home"
    result = qwenvl(stack_env(home), "up", flag, value, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stdout + result.stderr
    minimum = 0 if flag == "--worker-nodes" else 1
    assert result.stderr.strip() == f"error: {flag} must be {minimum} or more, not {value}"
    assert processes_of(home) == [] and not (home / "stack.json").exists()


@pytest.mark.parametrize(("value", "needle"), [("qwen-vl-tiny", "'qwen-vl-tiny' is not a base model"),
                                               (" , ", "no base model given")])
def test_up_with_models_it_does_not_offer_explains(tmp_path: Path, value: str, needle: str) -> None:
    result = qwenvl(stack_env(tmp_path / "home"), "up", "--models", value, timeout=60)
    _one_line_error(result, "--models", needle, ", ".join(BASE_MODELS))
    assert processes_of(tmp_path / "home") == [] and not (tmp_path / "home" / "stack.json").exists()


def test_models_are_all_bases_by_default_else_the_ones_named_once_in_order() -> None:
    assert parse_models(None) == parse_models("") == BASE_MODELS
    assert parse_models("qwen3-vl-tiny-seeing, qwen-vl-tiny-seeing,qwen3-vl-tiny-seeing") == (
        "qwen3-vl-tiny-seeing", "qwen-vl-tiny-seeing")


def test_up_with_a_dashboard_port_ray_keeps_for_workers_explains(tmp_path: Path) -> None:
    env = {**stack_env(tmp_path / "home"), "QWENVL_DASHBOARD_PORT": "18265"}
    result = qwenvl(env, "up", timeout=60)
    _one_line_error(result, "--dashboard-port 18265", "10002-19999")
    assert processes_of(tmp_path / "home") == []


def test_up_with_a_stale_record_explains_and_down_clears_it(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "stack.json").write_text(json.dumps({"stack_id": "0" * 32, "api_url": "http://127.0.0.1:9",
                                                 "pids": {}, "ray_temp_dir": ""}))
    env = stack_env(home)
    _one_line_error(qwenvl(env, "up", timeout=60), "stale", "qwenvl down")
    down = qwenvl(env, "down")
    assert down.returncode == 0 and not (home / "stack.json").exists()
    status = qwenvl(env, "status", "--json")
    assert status.returncode == 1 and json.loads(status.stdout)["running"] is False


def test_the_stack_turns_usage_telemetry_off_unless_the_user_set_it(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Every process of the stack (Ray nodes, so the API, the model replicas and training jobs; MLflow) gets MLflow's
    and Ray's telemetry off; a value the user set is kept."""
    from qwenvl_cli.stack import stack_env as node_env

    def env() -> dict[str, str]:
        return node_env(tmp_path, stack_id="s", dashboard_url="http://127.0.0.1:1", mlflow_url=None, ray_token="t",
                        mlflow_password=None, model_dirs={})

    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    assert (env()["MLFLOW_DISABLE_TELEMETRY"], env()["RAY_USAGE_STATS_ENABLED"]) == ("true", "0")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "false")
    assert env()["MLFLOW_DISABLE_TELEMETRY"] == "false"
