"""``start_worker_nodes``: a worker node whose ``ray start`` exits while starting is started again (on fresh
ports), a bounded number of times, and the final error carries the node's log. Real processes, no Ray: the
"node" is a Python process that fails or stays up as told, and ``alive`` counts the ones up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qwenvl_cli.stack import StackError, start_worker_nodes

FAIL = "import sys; print('raylet failed: Address already in use', flush=True); sys.exit(1)"
STAY = "import time; print('node up', flush=True); time.sleep(60)"


class Nodes:
    """Starts node ``i`` failing for its first ``failures[i]`` starts, staying up after."""

    def __init__(self, tmp: Path, failures: dict[int, int]) -> None:
        self.tmp, self.failures = tmp, failures
        self.started: list[tuple[int, subprocess.Popen[bytes]]] = []
        self.up: list[subprocess.Popen[bytes]] = []  # the nodes that "registered"

    def start(self, i: int) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.tmp / f"worker-{i}.log"
        failing = sum(n == i for n, _ in self.started) < self.failures.get(i, 0)
        with log.open("ab") as out:
            process = subprocess.Popen([sys.executable, "-c", FAIL if failing else STAY], stdout=out,
                                       stderr=subprocess.STDOUT)
        self.started.append((i, process))
        if not failing:
            self.up.append(process)
        return process, log

    def alive(self) -> int:
        return 1 + sum(process.poll() is None for process in self.up)

    def stop(self) -> None:
        for _, process in self.started:
            process.kill()
            process.wait()


@pytest.fixture
def nodes(tmp_path: Path):
    made: list[Nodes] = []
    yield lambda failures: made.append(Nodes(tmp_path, failures)) or made[-1]
    for each in made:
        each.stop()


def test_a_node_that_exits_while_starting_is_started_again(nodes) -> None:
    cluster = nodes({2: 2})
    start_worker_nodes(2, cluster.start, cluster.alive, timeout_s=60)
    assert [i for i, _ in cluster.started] == [1, 2, 2, 2]
    assert cluster.alive() == 3


def test_a_node_that_keeps_exiting_fails_with_its_log(nodes) -> None:
    cluster = nodes({1: 5})
    with pytest.raises(StackError) as error:
        start_worker_nodes(1, cluster.start, cluster.alive, timeout_s=60, attempts=3)
    assert [i for i, _ in cluster.started] == [1, 1, 1]
    message = str(error.value)
    assert "worker node 1 exited with status 1 while starting, 3 times" in message
    assert "worker-1.log" in message and "Address already in use" in message


def test_a_cluster_that_never_counts_the_nodes_times_out(nodes) -> None:
    cluster = nodes({})
    with pytest.raises(StackError, match="does not have 2 alive nodes after 1 s"):
        start_worker_nodes(1, cluster.start, lambda: 1, timeout_s=1)
