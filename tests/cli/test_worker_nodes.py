"""``start_nodes``: a node (the head or a worker node) whose ``ray start`` exits while starting is started again
(on fresh ports), a bounded number of times, and the final error carries the node's log; ``deploy_app`` gives up
at once when the head exits under it. Real processes, no Ray: the "node" is a Python process that fails or stays
up as told, and ``alive`` counts the ones up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwenvl_cli.stack import StackError, deploy_app, start_nodes

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

    def alive(self, head: int = 1) -> int:
        return head + sum(process.poll() is None for process in self.up)

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
    start_nodes(2, cluster.start, cluster.alive, timeout_s=60)
    assert [i for i, _ in cluster.started] == [1, 2, 2, 2]
    assert cluster.alive() == 3


def test_a_node_that_keeps_exiting_fails_with_its_log(nodes) -> None:
    cluster = nodes({1: 5})
    with pytest.raises(StackError) as error:
        start_nodes(1, cluster.start, cluster.alive, timeout_s=60, attempts=3)
    assert [i for i, _ in cluster.started] == [1, 1, 1]
    message = str(error.value)
    assert "worker node 1 exited with status 1 while starting, 3 times" in message
    assert "worker-1.log" in message and "Address already in use" in message


def test_a_cluster_that_never_counts_the_nodes_times_out(nodes) -> None:
    cluster = nodes({})
    with pytest.raises(StackError, match="does not have 2 alive nodes after 1 s"):
        start_nodes(1, cluster.start, lambda: 1, timeout_s=1)


def test_a_head_that_exits_while_starting_is_started_again_and_named(nodes) -> None:
    """As a loaded machine's head does when its raylet does not register within Ray's fixed 30 s."""
    cluster = nodes({0: 1})
    start_nodes(1, cluster.start, lambda: cluster.alive(head=0), timeout_s=60, first=0)
    assert [i for i, _ in cluster.started] == [0, 0] and cluster.alive(head=0) == 1
    failing = nodes({0: 5})
    with pytest.raises(StackError, match="the Ray head exited with status 1 while starting, 2 times"):
        start_nodes(1, failing.start, lambda: failing.alive(head=0), timeout_s=60, attempts=2, first=0)


def test_the_deploy_gives_up_at_once_when_the_head_exits(tmp_path: Path) -> None:
    """The deploy's driver of a dead cluster would wait for it until the deploy's timeout (minutes)."""
    head = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
    with pytest.raises(StackError, match=r"failed to start \(its driver's exit status -9\)"):  # killed by us
        deploy_app(dict(os.environ), "127.0.0.1:9", 9, tmp_path / "serve.log", timeout_s=600, ray_head=head)
    assert head.poll() == 0
