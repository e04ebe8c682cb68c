"""A real local stack (``qwenvl up`` in a subprocess, private QWENVL_HOME and free ports) for the CLI tests."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qwenvl_cli.stack import is_running, process_environments, ray_temp_dir
from tests.fixtures.net import free_port

QWENVL = str(Path(sys.executable).parent / "qwenvl")
# The bases the CLI tests' stack serves (`qwenvl up --models`): the default and a second family, not all four (each
# base is a Serve replica with its own imports, ~15 s of CPU to start on this VM, and a share of it while idle)
STACK_MODELS = ("qwen-vl-tiny-seeing", "qwen2.5-vl-tiny-seeing")


def stack_env(home: Path) -> dict[str, str]:
    """Environment of ``qwenvl`` commands against a stack in ``home`` (no key or URL from the caller's env)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("QWENVL_BASE_URL", "QWENVL_API_KEY", "QWENVL_ADMIN_KEY", "RAY_ADDRESS")}
    env.update({"QWENVL_HOME": str(home), "QWENVL_API_PORT": str(free_port()),
                "QWENVL_MLFLOW_PORT": str(free_port()), "QWENVL_DASHBOARD_PORT": str(free_port())})
    return env


def qwenvl(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([QWENVL, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


def entry_point(*args: str) -> subprocess.CompletedProcess[str]:
    """``qwenvl ARGS`` through the console script's entry point (``qwenvl_cli.main.main``, what the script runs) in
    this process: the same code without the start-up of a new interpreter (3-5 s a call here). A traceback fails the
    test as an exception."""
    from qwenvl_cli.main import main

    out, err, argv, code = io.StringIO(), io.StringIO(), sys.argv, 0
    sys.argv = ["qwenvl", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(["qwenvl", *args], code, out.getvalue(), err.getvalue())


def processes_of(home: Path) -> list[int]:
    """Live processes (any, not only ours) of the stack of ``home``: those whose environment names it as the
    platform's data dir, and those with a file open in its Ray temp dir. Ray's dashboard heads and agents overwrite
    their environment with their process title, so only their open logs name them."""
    needle, ray_dir = f"QWENVL_DATA_DIR={home}".encode(), str(ray_temp_dir(home))
    return [pid for pid, environ in process_environments()
            if (needle in environ or _has_open_file_under(Path(f"/proc/{pid}"), ray_dir)) and is_running(pid)]


def _has_open_file_under(process: Path, directory: str) -> bool:
    try:
        fds = list((process / "fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd).startswith(directory + "/"):
                return True
        except OSError:
            continue
    return False


@dataclass
class Stack:
    home: Path
    env: dict[str, str]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """``qwenvl up`` with the CLI tests' bases on two Ray nodes (the head and one worker node, 2 CPUs each: what
    the default single node offers, over two processes), so one stack serves the single-node commands and the
    multi-node path; ``qwenvl down`` afterwards, which must leave no process."""
    home = tmp_path_factory.mktemp("qvhome")
    env = stack_env(home)
    try:  # (`down` also after an `up` that timed out: the killed CLI stopped nothing it had started)
        up = qwenvl(env, "up", "--models", ",".join(STACK_MODELS), "--worker-nodes", "1", "--num-cpus", "2",
                    timeout=600)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        yield Stack(home, env)
    finally:
        down = qwenvl(env, "down", timeout=120)
        assert down.returncode == 0, down.stderr
        assert processes_of(home) == []
