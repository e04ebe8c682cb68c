"""Scratch folders that a killed process does not leave behind.

``ScratchDir(purpose, parent)`` creates ``<parent>/qwenvl-<purpose>-<random>`` and holds an exclusive ``flock`` on
the ``.owner`` file inside it while it is open. The kernel drops that lock when the owning process ends, however it
ends (SIGKILL, the OOM killer, a node agent stopping a container), so ``sweep`` can tell an abandoned folder from a
live one. This works across processes, containers and PID namespaces that share the parent folder on one machine,
which a check of the owner's PID cannot do: PIDs are per namespace and are reused. Creating a scratch folder sweeps
the abandoned ones in the same parent first, so a crashed serving replica's downloaded adapters, a killed
validation's copy of an upload or a SIGKILLed training worker's checkpoints are removed by the next process that
needs scratch space there.

Folders without an ``.owner`` file (another program's, or one whose creator died in the instant between creating it
and locking it) are never touched. Linux and macOS only (``fcntl``), like the rest of the server side.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import weakref
from pathlib import Path

PREFIX = "qwenvl-"
OWNER = ".owner"


class ScratchDir:
    """A folder owned by this process until ``cleanup()`` (or garbage collection, or exit) removes it."""

    def __init__(self, purpose: str, parent: str | Path | None = None) -> None:
        root = Path(parent) if parent is not None else Path(tempfile.gettempdir())
        root.mkdir(parents=True, exist_ok=True)
        sweep(root)
        self.path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{purpose}-", dir=root))
        claiming = self.path / (OWNER + ".claiming")  # locked before it gets the name sweeps look for
        fd = os.open(claiming, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(claiming, self.path / OWNER)
        self._finalizer = weakref.finalize(self, _remove, self.path, fd, os.getpid())

    def cleanup(self) -> None:
        """Remove the folder (idempotent)."""
        self._finalizer()

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def _remove(path: Path, fd: int, owner_pid: int) -> None:
    if os.getpid() != owner_pid:  # a forked child exiting: the folder is still its parent's
        return
    try:
        shutil.rmtree(path, ignore_errors=True)
    finally:
        os.close(fd)  # only now may a sweep lock it: the folder is already gone


def sweep(parent: str | Path) -> list[Path]:
    """Remove the scratch folders under ``parent`` whose owning process has ended; returns them."""
    removed = []
    for entry in Path(parent).glob(f"{PREFIX}*"):
        try:
            fd = os.open(entry / OWNER, os.O_RDWR | os.O_CLOEXEC)
        except OSError:  # not a scratch folder, being created, being removed, or another user's
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held: its owner is alive
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
    return removed
