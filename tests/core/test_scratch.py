"""Scratch folders: removed by their owner, and swept after their owner is killed, never while it lives."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from qwenvl_core.scratch import OWNER, ScratchDir, sweep

_HOLD = textwrap.dedent("""
    import sys, time
    from qwenvl_core.scratch import ScratchDir
    scratch = ScratchDir("held", sys.argv[1])
    (scratch.path / "data.bin").write_bytes(b"x" * 1024)
    print(scratch.path, flush=True)
    time.sleep(600)
""")


def _holder(parent: Path) -> tuple[subprocess.Popen[str], Path]:
    """A process that creates a scratch folder under ``parent`` and keeps it; its folder."""
    process = subprocess.Popen([sys.executable, "-c", _HOLD, str(parent)], stdout=subprocess.PIPE, text=True,
                               cwd=Path(__file__).resolve().parents[2])
    assert process.stdout is not None
    return process, Path(process.stdout.readline().strip())


def test_cleanup_and_context_remove_the_folder(tmp_path):
    scratch = ScratchDir("unit", tmp_path)
    assert scratch.path.parent == tmp_path and scratch.path.name.startswith("qwenvl-unit-")
    assert (scratch.path / OWNER).is_file()
    scratch.cleanup()
    scratch.cleanup()  # idempotent
    assert not scratch.path.exists()
    with ScratchDir("ctx", tmp_path) as path:
        (path / "f").write_text("x")
    assert not path.exists()


def test_a_killed_owners_folder_is_swept_and_a_live_ones_is_not(tmp_path):
    live, live_dir = _holder(tmp_path)
    killed, killed_dir = _holder(tmp_path)
    foreign = tmp_path / "qwenvl-not-ours"  # no owner file: another program's, never touched
    foreign.mkdir()
    try:
        assert sweep(tmp_path) == []  # both owners alive
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(timeout=30)
        assert killed_dir.is_dir()  # a SIGKILLed process cannot clean up after itself
        with ScratchDir("next", tmp_path) as mine:  # creating one sweeps the abandoned ones
            assert not killed_dir.exists()
            assert live_dir.is_dir() and (live_dir / "data.bin").is_file()
            assert foreign.is_dir()
            assert mine.is_dir()
        assert sweep(tmp_path) == []
    finally:
        live.kill()
        live.wait(timeout=30)
    assert sweep(tmp_path) == [live_dir]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qwenvl-not-ours"]


def test_a_forked_child_exiting_does_not_remove_its_parents_folder(tmp_path):
    scratch = ScratchDir("fork", tmp_path)
    pid = os.fork()
    if pid == 0:  # the child runs the finalizers at a normal interpreter exit, as a multiprocessing child may
        scratch.cleanup()
        os._exit(0)
    os.waitpid(pid, 0)
    assert scratch.path.is_dir()
    assert sweep(tmp_path) == []  # the parent still holds the lock
    scratch.cleanup()
    assert not scratch.path.exists()
