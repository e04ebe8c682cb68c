"""``qwenvl up|down|status``: the embedded local stack, all of its state in ``QWENVL_HOME`` (default ``~/.qwenvl``).

``up`` starts, each as its own process group:
- an MLflow tracking server (basic-auth app, SQLite backend, local artifacts) on :5000; its admin password is in
  ``$QWENVL_HOME/mlflow/admin_password`` (the UI asks for user ``admin``);
- a Ray head (``ray start --head --block``, token auth, dashboard on :8265) whose environment carries the
  platform's ``QWENVL_*`` settings, so every Serve replica and training job on it reads them, and the MLflow login
  training jobs log with (never put into a job's runtime env, which the dashboard shows);
- with ``--worker-nodes N``, N more Ray nodes on this machine (``ray start --block --address=<head>``, same
  environment), so that Serve replicas and Ray Train workers spread over several nodes as on a real cluster;
- the Serve application ``workflows.app`` (the REST API with the chat route as ingress, one model deployment per
  base model of ``BASE_MODELS``, each materialised into ``$QWENVL_HOME/models/<preset>`` on first start: today the
  pretrained tiny Qwen-VL ``qwen-vl-tiny-seeing``, shipped with the package, and the Qwen2-VL, Qwen2.5-VL and
  Qwen3-VL tiny bases pretrained the same way, ``qwen2-vl-tiny-seeing``, ``qwen2.5-vl-tiny-seeing`` and
  ``qwen3-vl-tiny-seeing``; ``--models`` serves only some of them, each replica costing a process with its own
  imports and weights) on :8000.
Each Ray node counts as started once the dashboard lists it alive; one whose ``ray start`` exits first (a port
taken meanwhile, or a raylet that a loaded machine kept from registering within Ray's fixed 30 s) is started again
on fresh ports (``start_nodes``), and the deploy gives up as soon as the head exits.
The API writes the admin key and the default tenant's key into ``$QWENVL_HOME`` (``admin_key``, ``api_key``).
``$QWENVL_HOME`` is created with mode 0700 and every secret file in it with 0600.

Every process of the stack (and every process Ray starts for it) carries ``QWENVL_STACK_ID`` in its environment;
``down`` stops the recorded process groups, then anything still carrying that marker, so nothing is left behind.
``stack.json`` records the pids, ports and URLs, and the number of worker nodes.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from qwenvl_cli.client import STATE_FILE, ApiError, qwenvl_home, read_state
from qwenvl_cli.ports import RAY_WORKER_PORTS, free_port, port_busy
from qwenvl_cli.telemetry import TELEMETRY_OFF
from service.mlflow_tenants import basic_auth_ini
from service.private_files import private_dir, write_secret

# The presets the local stack offers as base models (``QWENVL_BASE_MODELS``), the first one the default (the demo
# fine-tunes it). qwen-vl-tiny-seeing is the pretrained tiny Qwen-VL (docs/pretraining.md): the random qwen-vl-tiny
# learns colour only, and tests that want it materialise it themselves. Qwen2-VL's, Qwen2.5-VL's and Qwen3-VL's tiny
# bases, pretrained the same way (``<family>-tiny-seeing``: the family's own tokenizer, chat template, processor and
# weights shipped in qwenvl_core/assets), are served beside it, so every family can be fine-tuned and chatted with
# locally (the random ``<family>-tiny`` presets stay for tests).
BASE_MODELS: tuple[str, ...] = ("qwen-vl-tiny-seeing", "qwen2-vl-tiny-seeing", "qwen2.5-vl-tiny-seeing",
                                "qwen3-vl-tiny-seeing")
BASE_MODEL = BASE_MODELS[0]
MLFLOW_ADMIN = "admin"
MARKER = "QWENVL_STACK_ID"

ApiPort = Annotated[int, typer.Option("--api-port", envvar="QWENVL_API_PORT", help="Port of the REST API.")]
MlflowPort = Annotated[int, typer.Option("--mlflow-port", envvar="QWENVL_MLFLOW_PORT", help="MLflow UI port.")]
DashPort = Annotated[int, typer.Option("--dashboard-port", envvar="QWENVL_DASHBOARD_PORT",
                                       help="Ray dashboard port.")]


class StackError(ApiError):
    """The local stack cannot be started, stopped or found; the message says what to do."""


@dataclass
class StackState:
    """What ``stack.json`` records."""

    stack_id: str
    home: str
    api_url: str
    mlflow_url: str
    dashboard_url: str
    gcs_address: str
    ray_temp_dir: str
    pids: dict[str, int]
    started_at: float
    worker_nodes: int = 0


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)  # the project's own executables, never others on PATH


def _secret(path: Path, make: Any) -> str:
    if not path.is_file():
        write_secret(path, make())
    return path.read_text().strip()


def parse_models(value: str | None) -> tuple[str, ...]:
    """``--models``: comma-separated base models (all of ``BASE_MODELS`` when empty); see ``check_models``."""
    if not value or not value.strip():
        return BASE_MODELS
    return check_models(name for part in value.split(",") if (name := part.strip()))


def check_models(names: Iterable[str]) -> tuple[str, ...]:
    """The base models to serve, each once and in the order given; a name outside ``BASE_MODELS``, or none at all,
    is a ``StackError`` naming it and the choices."""
    chosen: list[str] = []
    for name in names:
        if name not in BASE_MODELS:
            raise StackError(f"--models: {name!r} is not a base model of the local stack; choose from "
                             f"{', '.join(BASE_MODELS)} (comma-separated)")
        if name not in chosen:
            chosen.append(name)
    if not chosen:
        raise StackError(f"--models: no base model given; choose from {', '.join(BASE_MODELS)} (comma-separated)")
    return tuple(chosen)


def ensure_base_models(home: Path, presets: tuple[str, ...] = BASE_MODELS) -> dict[str, Path]:
    """Model id -> directory of each base model, materialised from its preset (seed 0) on first use."""
    import contextlib
    import io

    dirs = {}
    for preset in presets:
        model_dir = dirs[preset] = home / "models" / preset
        if not (model_dir / "config.json").is_file():
            with contextlib.redirect_stderr(io.StringIO()):  # library warnings would drown the progress lines
                from qwenvl_core.models.registry import family_for_preset

                family_for_preset(preset).materialize(preset, model_dir, seed=0)
    return dirs


def stack_env(home: Path, *, stack_id: str, dashboard_url: str, mlflow_url: str | None, ray_token: str,
              mlflow_password: str | None, model_dirs: dict[str, Path]) -> dict[str, str]:
    """The environment of the Ray nodes (so of the API replica and of training jobs) and of the deploy step."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({
        MARKER: stack_id, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": ray_token,
        "QWENVL_DATA_DIR": str(home), "QWENVL_BASE_MODELS": json.dumps({k: str(v) for k, v in model_dirs.items()}),
        "QWENVL_RAY_ADDRESS": dashboard_url, "QWENVL_SCHEDULER_INTERVAL_S": "0.5",
        "QWENVL_SERVE_NUM_CPUS": "0.25", "QWENVL_WORK_DIR": str(home / "work"),
    })
    # `down` stops every node at once, so there is no node left to drain Serve replicas to; Ray's drain on SIGTERM
    # (up to 30 s) only made `down` slower (measured 26 s -> 4.5 s). A value the user set is kept.
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    for name, value in TELEMETRY_OFF.items():
        env.setdefault(name, value)
    if mlflow_url and mlflow_password:
        env.update({"QWENVL_MLFLOW_TRACKING_URI": mlflow_url, "QWENVL_MLFLOW_ADMIN_USERNAME": MLFLOW_ADMIN,
                    "QWENVL_MLFLOW_ADMIN_PASSWORD": mlflow_password,
                    # the login training jobs log with: from the nodes' environment, never from a job's runtime
                    # env (which the Ray dashboard shows)
                    "MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN, "MLFLOW_TRACKING_PASSWORD": mlflow_password})
    return env


def ray_head_command(*, gcs_port: int, dashboard_port: int | None, temp_dir: Path, num_cpus: int) -> list[str]:
    """``ray start --head --block`` on private ports (only the dashboard's is fixed); no dashboard when
    ``dashboard_port`` is None."""
    dashboard = (["--include-dashboard=false"] if dashboard_port is None else
                 ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"])
    return [_bin("ray"), "start", "--head", "--block", f"--port={gcs_port}", f"--num-cpus={num_cpus}", *dashboard,
            f"--temp-dir={temp_dir}", "--disable-usage-stats", *_private_ports()]


def ray_worker_command(*, gcs_address: str, cluster_temp_dir: Path, node: int, num_cpus: int) -> list[str]:
    """``ray start --block`` joining ``gcs_address`` as worker node ``node`` (1, 2, ...; on this machine: private
    ports). Its temp dir is its own, ``cluster_temp_dir/node-<node>``, not the head's: each node's log monitor
    forwards every worker log under its temp dir to the drivers, so nodes sharing one printed each line of a job's
    log once per node."""
    return [_bin("ray"), "start", "--block", f"--address={gcs_address}", f"--num-cpus={num_cpus}",
            f"--temp-dir={cluster_temp_dir / f'node-{node}'}", *_private_ports(), f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}"]


def _private_ports() -> list[str]:
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--ray-client-server-port={free_port()}"]


def deploy_app(env: dict[str, str], gcs_address: str, api_port: int, log: Path, timeout_s: float = 300,
               ray_head: subprocess.Popen[bytes] | None = None) -> None:
    """Run the Serve application ``workflows.app`` on the cluster (a short-lived driver; Serve keeps it). The driver
    is given up at once if ``ray_head`` exits meanwhile (a driver of a dead cluster waits for it indefinitely)."""
    code = (
        "import ray; from ray import serve; import workflows.app as a; from workflows.serve_app import APP_NAME\n"
        f"ray.init(address={gcs_address!r}, logging_level='ERROR', log_to_driver=False)\n"
        f"serve.start(proxy_location='HeadOnly', http_options={{'host': '127.0.0.1', 'port': {api_port}}})\n"
        "serve.run(a.app(), name=APP_NAME, route_prefix='/')\n"
    )
    with log.open("ab") as out:
        driver = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    try:
        while driver.poll() is None and (ray_head is None or ray_head.poll() is None):
            if time.monotonic() > deadline:
                raise StackError(f"the Serve application did not start within {timeout_s:.0f} s; see {log}"
                                 f"{log_tail(log)}")
            time.sleep(0.5)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    if driver.returncode != 0:
        raise StackError(f"the Serve application failed to start (its driver's exit status {driver.returncode}); "
                         f"see {log}{log_tail(log)}")


def _deploy(env: dict[str, str], gcs_address: str, api_port: int, logs: Path, timeout_s: float,
            ray_head: subprocess.Popen[bytes], echo: Any) -> None:
    """``deploy_app``, once more if it fails while the Ray head is still up (a failure is printed with the log's
    tail either way); a head that exited is reported as such, with its own log."""
    for attempt in (1, 2):
        try:
            deploy_app(env, gcs_address, api_port, logs / "serve.log", timeout_s, ray_head)
            return
        except StackError as exc:
            if ray_head.poll() is not None:
                raise StackError(f"the Ray head exited with status {ray_head.returncode} while the Serve "
                                 f"application was starting; see {logs / 'ray.log'}{log_tail(logs / 'ray.log')}"
                                 ) from exc
            if attempt == 2:
                raise
            echo(f"{exc}\ntrying once more ...")


def wait_http(url: str, timeout_s: float, what: str, log: Path, ok: tuple[int, ...] = (200,),
              process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise StackError(f"{what} exited with status {process.returncode} while starting; see {log}"
                             f"{log_tail(log)}")
        try:
            if httpx.get(url, timeout=5).status_code in ok:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise StackError(f"{what} not ready at {url} after {timeout_s:.0f} s; see {log}{log_tail(log)}")


def log_tail(log: Path, lines: int = 25) -> str:
    """The last lines of a log, to print under an error (the log may be gone with a temporary home)."""
    try:
        text = log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n--- last lines of the log ---\n" + "\n".join(text) if text else ""


def ray_auth_header(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def ray_nodes(dashboard_url: str, token: str) -> list[dict[str, Any]]:
    """The cluster's nodes (dead ones included) from the dashboard's state API: ``node_id``, ``state``
    (``ALIVE`` / ``DEAD``), ``is_head_node``, ``resources_total``, ..."""
    response = httpx.get(f"{dashboard_url}/api/v0/nodes", params={"limit": 1000, "detail": "true"}, timeout=10,
                         headers=ray_auth_header(token))
    response.raise_for_status()
    return list(response.json()["data"]["result"]["result"])


def alive_nodes(dashboard_url: str, token: str) -> int | None:
    """How many nodes of the cluster are alive; None when the dashboard does not answer."""
    try:
        return sum(node["state"] == "ALIVE" for node in ray_nodes(dashboard_url, token))
    except (httpx.HTTPError, KeyError, TypeError, ValueError):
        return None


def start_nodes(count: int, start: Callable[[int], tuple[subprocess.Popen[bytes], Path]],
                alive: Callable[[], int | None], timeout_s: float, attempts: int = 3, first: int = 1) -> None:
    """Start nodes ``first..first+count-1`` with ``start(i)`` (which returns the node's process and its log; node 0
    is the head, 1.. the worker nodes) and wait until ``alive()`` (e.g. ``alive_nodes``) counts ``first + count``
    nodes: the ones started and those before them.

    A node whose process exits while starting is started again, ``attempts`` times in all: ``start`` draws fresh
    ports each time (``ray_head_command``, ``ray_worker_command``), and a port drawn free can be taken by another
    process before the node binds it, which Ray reports only as "timed out during startup" 30 s later (as it does
    a raylet that a loaded machine kept from registering within Ray's fixed 30 s)."""
    nodes = [start(i) for i in range(first, first + count)]
    tries = [1] * count
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for k, (process, log) in enumerate(nodes):
            if process.poll() is None:
                continue
            name = "the Ray head" if first + k == 0 else f"Ray worker node {first + k}"
            if tries[k] == attempts:
                raise StackError(f"{name} exited with status {process.returncode} while starting, "
                                 f"{attempts} times (each time on fresh ports); see {log}{log_tail(log)}")
            tries[k] += 1
            nodes[k] = start(first + k)
        if alive() == first + count:
            return
        time.sleep(0.5)
    raise StackError(f"the Ray cluster does not have {first + count} alive nodes after {timeout_s:.0f} s; see "
                     f"{nodes[-1][1]}{log_tail(nodes[-1][1])}")


def _popen(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


# ----- processes --------------------------------------------------------------------------------------------------
def ray_temp_dir(home: Path) -> Path:
    """The Ray temp dir of the stack of ``home``: short, since Ray's socket paths have a length limit."""
    return Path("/tmp") / f"qvray-{hashlib.sha256(str(home).encode()).hexdigest()[:10]}"


def marked_pids(stack_id: str) -> list[int]:
    """Pids of live processes whose environment carries ``QWENVL_STACK_ID=stack_id``."""
    needle = f"{MARKER}={stack_id}".encode()
    return [pid for pid, environ in process_environments() if needle in environ and is_running(pid)]


def marked_groups(stack_id: str) -> list[int]:
    """Process groups of the processes carrying the marker, never this process's own. They reach the processes
    whose environment no longer shows it: Ray's agents overwrite theirs with their process title."""
    groups: set[int] = set()
    for pid in marked_pids(stack_id):
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            continue
    return sorted(groups - {os.getpgrp()})


def orphan_stack_ids(home: Path) -> list[str]:
    """Stack ids of live processes started by a stack of ``home`` (``QWENVL_DATA_DIR=home`` beside the marker):
    how ``down`` finds a stack whose ``stack.json`` (or whole home) was deleted while it ran."""
    data_dir, prefix = f"QWENVL_DATA_DIR={home}".encode(), f"{MARKER}=".encode()
    found: list[str] = []
    for pid, environ in process_environments():
        if data_dir in environ and is_running(pid):
            ids = [item[len(prefix):].decode() for item in environ if item.startswith(prefix)]
            found.extend(i for i in ids if i not in found)
    return found


def process_environments() -> Iterator[tuple[int, list[bytes]]]:
    """(pid, environment entries) of every process but this one whose environment we may read."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                yield int(entry.name), (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue


def is_running(pid: int) -> bool:
    """Whether ``pid`` still runs (exists and is no zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _signal(pids: list[int], sig: int, groups: bool = False) -> None:
    for pid in pids:
        try:
            if groups:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_gone(stack_id: str, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        left = marked_pids(stack_id)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.3)


def stop_stack(state: dict[str, Any]) -> None:
    """Stop every process of the stack: its process groups and, at the same time, everything else carrying the
    marker (a running job's driver is in a process group of Ray's and outlived the head; its job, stopped at
    any point, is re-queued by the next `up` and resumes from its last checkpoint)."""
    stack_id = state["stack_id"]
    _signal(list(state.get("pids", {}).values()), signal.SIGTERM, groups=True)
    _signal(marked_pids(stack_id), signal.SIGTERM)
    left = _wait_gone(stack_id, 20)
    _signal(left, signal.SIGTERM)
    left = _wait_gone(stack_id, 5)
    _signal(left, signal.SIGKILL)
    left = _wait_gone(stack_id, 5)
    if left:
        raise StackError(f"processes of the stack are still running: {left}")
    if state.get("ray_temp_dir"):
        shutil.rmtree(state["ray_temp_dir"], ignore_errors=True)


# ----- commands ---------------------------------------------------------------------------------------------------
def start_stack(home: Path, *, api_port: int = 8000, mlflow_port: int = 5000, dashboard_port: int = 8265,
                num_cpus: int = 4, worker_nodes: int = 0, timeout_s: float = 180,
                models: tuple[str, ...] = BASE_MODELS, echo: Any = typer.echo) -> StackState:
    """Start the stack (see the module docstring) serving the base ``models`` (some of ``BASE_MODELS``); on any
    failure everything started is stopped again."""
    models = check_models(models)
    if worker_nodes < 0:
        raise StackError(f"--worker-nodes must be 0 or more, not {worker_nodes}")
    if num_cpus < 1:
        raise StackError(f"--num-cpus must be 1 or more, not {num_cpus}")
    existing = read_state(home)
    if existing is not None:
        if marked_pids(existing["stack_id"]):
            raise StackError(f"a stack is already running from {home} (API {existing['api_url']}): "
                             "see `qwenvl status`, or stop it with `qwenvl down`")
        raise StackError(f"{home / STATE_FILE} records a stack whose processes are gone (stale, e.g. after a "
                         "reboot or a crash): run `qwenvl down` to clear it, then `qwenvl up`")
    if RAY_WORKER_PORTS[0] <= dashboard_port <= RAY_WORKER_PORTS[1]:
        raise StackError(f"--dashboard-port {dashboard_port} is inside the range Ray keeps for its worker processes "
                         f"({RAY_WORKER_PORTS[0]}-{RAY_WORKER_PORTS[1]}), so Ray would refuse it: choose a port "
                         "outside it, e.g. 8265")
    for what, port, flag in (("the API", api_port, "--api-port"), ("MLflow", mlflow_port, "--mlflow-port"),
                             ("the Ray dashboard", dashboard_port, "--dashboard-port")):
        if port_busy(port):
            raise StackError(f"port {port} (for {what}) is already in use by another program: stop that program "
                             f"(e.g. `qwenvl down` for a stack in another QWENVL_HOME), or choose another port "
                             f"with {flag}")
    private_dir(home)
    logs = home / "logs"
    logs.mkdir(exist_ok=True)
    echo(f"QWENVL_HOME {home}")
    model_dirs = ensure_base_models(home, models)
    ray_token = _secret(home / "ray_auth_token", lambda: secrets.token_hex(32))
    mlflow_password = _secret(home / "mlflow" / "admin_password", lambda: secrets.token_urlsafe(18))
    stack_id = uuid.uuid4().hex
    temp_dir = ray_temp_dir(home)
    mlflow_url, dashboard_url = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{dashboard_port}"
    env = stack_env(home, stack_id=stack_id, dashboard_url=dashboard_url, mlflow_url=mlflow_url,
                    ray_token=ray_token, mlflow_password=mlflow_password, model_dirs=model_dirs)
    state = StackState(stack_id, str(home), f"http://127.0.0.1:{api_port}", mlflow_url, dashboard_url,
                       "", str(temp_dir), {}, time.time(), worker_nodes)  # (gcs_address: set as the head starts)
    try:
        echo("starting MLflow ...")
        mlflow = _start_mlflow(home, env, mlflow_port, mlflow_password, logs / "mlflow.log")
        state.pids["mlflow"] = mlflow.pid
        echo("starting the Ray head ...")
        heads: list[subprocess.Popen[bytes]] = []

        def start_head(_: int) -> tuple[subprocess.Popen[bytes], Path]:
            gcs_port = free_port()  # fresh each time, as the node's other ports
            heads.append(_popen(ray_head_command(gcs_port=gcs_port, dashboard_port=dashboard_port,
                                                 temp_dir=temp_dir, num_cpus=num_cpus), env, logs / "ray.log"))
            state.gcs_address, state.pids["ray_head"] = f"127.0.0.1:{gcs_port}", heads[-1].pid
            _write_state(home, state)
            return heads[-1], logs / "ray.log"

        # until the head node is registered (its dashboard answers before that, and a head that does not register
        # within Ray's 30 s exits): the deploy's driver would wait on a dead head
        start_nodes(1, start_head, lambda: alive_nodes(dashboard_url, ray_token), timeout_s, first=0)
        ray_head = heads[-1]
        if worker_nodes:
            echo(f"starting {worker_nodes} Ray worker node(s) ...")

            def start_worker(i: int) -> tuple[subprocess.Popen[bytes], Path]:
                log = logs / f"ray-worker-{i}.log"
                node = _popen(ray_worker_command(gcs_address=state.gcs_address, cluster_temp_dir=temp_dir, node=i,
                                                 num_cpus=num_cpus), env, log)
                state.pids[f"ray_worker_{i}"] = node.pid
                _write_state(home, state)
                return node, log

            start_nodes(worker_nodes, start_worker, lambda: alive_nodes(dashboard_url, ray_token), timeout_s)
        wait_http(f"{mlflow_url}/health", timeout_s, "MLflow", logs / "mlflow.log", process=mlflow)
        echo("deploying the API and the model (Ray Serve) ...")
        _deploy(env, state.gcs_address, api_port, logs, timeout_s, ray_head, echo)
        wait_http(f"{state.api_url}/ready", timeout_s, "the API", logs / "serve.log")
        wait_http(f"{state.api_url}/v1/chat/ready", timeout_s, "the model deployment", logs / "serve.log")
    except BaseException:
        stop_stack(asdict(state))
        (home / STATE_FILE).unlink(missing_ok=True)
        raise
    return state


def _start_mlflow(home: Path, env: dict[str, str], port: int, password: str, log: Path) -> subprocess.Popen[bytes]:
    root = home / "mlflow"
    ini = root / "basic_auth.ini"
    write_secret(ini, basic_auth_ini(root / "auth.db", MLFLOW_ADMIN, password))
    menv = {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_AUTH_CONFIG_PATH": str(ini),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        menv.pop(name, None)
    cmd = [_bin("mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts")]
    return _popen(cmd, menv, log)


def _write_state(home: Path, state: StackState) -> None:
    tmp = home / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2))
    tmp.replace(home / STATE_FILE)


def stack_status(home: Path) -> dict[str, Any]:
    """URLs, health and key-file paths of the local stack in ``home`` (``running`` false when there is none)."""
    state = read_state(home)
    report: dict[str, Any] = {"home": str(home), "running": False, "api_key_file": str(home / "api_key"),
                              "admin_key_file": str(home / "admin_key"),
                              "mlflow_password_file": str(home / "mlflow" / "admin_password")}
    if state is None:
        return report
    token_file = home / "ray_auth_token"
    ray_headers = ray_auth_header(token_file.read_text().strip()) if token_file.is_file() else {}
    checks = {"api": (state["api_url"], "/ready", {}), "mlflow": (state["mlflow_url"], "/health", {}),
              "ray_dashboard": (state["dashboard_url"], "/api/version", ray_headers)}
    for name, (url, path, headers) in checks.items():
        try:
            healthy = httpx.get(url + path, timeout=5, headers=headers).status_code == 200
        except httpx.HTTPError:
            healthy = False
        report[name] = {"url": url, "healthy": healthy}
    report["api"]["docs_url"] = state["api_url"] + "/docs"
    report["mlflow"]["username"] = MLFLOW_ADMIN
    expected = 1 + int(state.get("worker_nodes", 0))
    alive = alive_nodes(state["dashboard_url"], token_file.read_text().strip()) if token_file.is_file() else None
    report["ray_nodes"] = {"alive": alive, "expected": expected}
    report["running"] = all(report[n]["healthy"] for n in checks) and alive == expected
    report["processes"] = len(marked_pids(state["stack_id"]))
    return report


def up(api_port: ApiPort = 8000, mlflow_port: MlflowPort = 5000, dashboard_port: DashPort = 8265,
       num_cpus: Annotated[int, typer.Option(help="Logical CPUs each Ray node (head, workers) offers.")] = 4,
       worker_nodes: Annotated[int, typer.Option(
           "--worker-nodes", help="Extra Ray worker nodes to start on this machine (try multi-node locally).")] = 0,
       timeout: Annotated[float, typer.Option(help="Seconds each component may take to start.")] = 300.0,
       models: Annotated[str | None, typer.Option(
           "--models", help=f"Base models to serve, comma-separated (default: all of {', '.join(BASE_MODELS)}); "
           "each is a Serve replica of its own.")] = None) -> None:
    """Start the local stack: Ray head (dashboard), the API + model on Ray Serve, MLflow; state in QWENVL_HOME."""
    home = qwenvl_home()
    started = time.monotonic()
    state = start_stack(home, api_port=api_port, mlflow_port=mlflow_port, dashboard_port=dashboard_port,
                        num_cpus=num_cpus, worker_nodes=worker_nodes, timeout_s=timeout,
                        models=parse_models(models))
    typer.echo(f"stack up in {time.monotonic() - started:.0f} s")
    _print_status(stack_status(home))
    del state


def down() -> None:
    """Stop everything `qwenvl up` started (no process is left); the data in QWENVL_HOME stays."""
    home = qwenvl_home()
    state = read_state(home)
    if state is None:
        orphans = orphan_stack_ids(home)
        if not orphans:
            typer.echo(f"no stack recorded in {home}; nothing to stop")
            return
        for stack_id in orphans:  # its record is gone: stop it by its marker and the process groups it marks
            groups = marked_groups(stack_id)
            stop_stack({"stack_id": stack_id, "pids": {f"group_{g}": g for g in groups},
                        "ray_temp_dir": str(ray_temp_dir(home))})
        typer.echo(f"no stack recorded in {home}, but processes of a stack started from it were running "
                   "(its stack.json was deleted): stopped them")
        return
    stop_stack(state)
    (home / STATE_FILE).unlink(missing_ok=True)
    typer.echo(f"stack in {home} stopped")


def status(json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """URLs and health of the local stack and the path of the default tenant's key file; exit 1 unless running."""
    report = stack_status(qwenvl_home())
    if json_out:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_status(report)
    if not report["running"]:
        raise typer.Exit(1)


def _print_status(report: dict[str, Any]) -> None:
    if "api" not in report:
        typer.echo(f"no stack running from {report['home']} (start one with `qwenvl up`)")
        return
    mark = {True: "ok", False: "DOWN"}
    typer.echo(f"API            {report['api']['url']}  [{mark[report['api']['healthy']]}]  "
               f"docs {report['api']['docs_url']}")
    typer.echo(f"MLflow UI      {report['mlflow']['url']}  [{mark[report['mlflow']['healthy']]}]  user admin, "
               f"password in {report['mlflow_password_file']}")
    nodes = report["ray_nodes"]
    alive = "?" if nodes["alive"] is None else nodes["alive"]
    typer.echo(f"Ray dashboard  {report['ray_dashboard']['url']}  [{mark[report['ray_dashboard']['healthy']]}]  "
               f"nodes {alive}/{nodes['expected']} alive")
    typer.echo(f"API key file   {report['api_key_file']}  (default tenant)")
    typer.echo(f"admin key file {report['admin_key_file']}")
