"""The workflow tests' Ray cluster and how they launch a job.

``ray_cluster``: a head node and a worker node, each a ``ray start --block`` process of ours (stopped by pid,
never ``ray stop``), shared by every workflow test of the session. ``launch_workflow`` runs
``python -m workflows.finetune --spec`` the way the service submits it: its own process group, output to a log
file (a full pipe would block it).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from qwenvl_cli.stack import ray_head_command, ray_worker_command, start_nodes
from qwenvl_core.specs import FineTuneJobSpec
from tests.fixtures.net import free_port, wait_for_port


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """A head node and a worker node, each a ``ray start --block`` process of ours (stopped by pid). Their temp dir is
    short, under /tmp (Ray's socket paths there must fit in 107 bytes; pytest's, under xdist, are too long)."""
    root = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
    port = free_port()
    address = f"127.0.0.1:{port}"
    # no drain on SIGTERM: a node with leases left waits for them up to 30 s before it stops
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    head = ray_head_command(gcs_port=port, dashboard_port=None, temp_dir=root, num_cpus=2)
    nodes = [subprocess.Popen(head, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]

    def start_worker(i: int) -> tuple[subprocess.Popen[bytes], Path]:
        log = root / f"worker-node-{i}.log"
        with log.open("ab") as out:
            nodes.append(subprocess.Popen(ray_worker_command(gcs_address=address, cluster_temp_dir=root, node=i,
                                                             num_cpus=2),
                                          env=env, stdout=out, stderr=subprocess.STDOUT))
        return nodes[-1], log

    try:
        wait_for_port(port, nodes[0], timeout=120)
        start_nodes(1, start_worker, lambda: _alive_nodes(address, env), 240)
        yield address
    finally:
        for node in reversed(nodes):
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
                node.wait(timeout=60)
        shutil.rmtree(root, ignore_errors=True)


_COUNT_ALIVE = "import ray; ray.init(); print(sum(n['Alive'] for n in ray.nodes()))"


def _alive_nodes(address: str, env: dict[str, str]) -> int | None:
    """How many nodes of the cluster are alive, asked by a short driver process (this cluster has no dashboard)."""
    probe = subprocess.run([sys.executable, "-c", _COUNT_ALIVE], env={**env, "RAY_ADDRESS": address},
                           capture_output=True, text=True, timeout=120)
    last = probe.stdout.split()[-1:]
    return int(last[0]) if probe.returncode == 0 and last and last[0].isdigit() else None


def launch_workflow(spec: FineTuneJobSpec, address: str, tmp: Path, log: str, env: dict[str, str] | None = None
                    ) -> subprocess.Popen[bytes]:
    """Write ``spec`` to ``tmp`` and start the workflow on ``address``; its output goes to ``tmp / log``."""
    path = tmp / f"{spec.job_id}.json"
    path.write_text(spec.model_dump_json())
    full_env = {**os.environ, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled", "QWENVL_WORK_DIR": str(tmp),
                **(env or {})}
    with (tmp / log).open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "workflows.finetune", "--spec", str(path)], env=full_env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
