"""Files and directories only their owner may read: the local data directory (``QWENVL_HOME`` /
``QWENVL_DATA_DIR``), the SQLite database with its ``-wal`` / ``-shm`` files, and secret files (keys, passwords).

Modes are set when a path is created (``os.open`` / ``mkdir`` with the mode, then ``chmod`` past the umask), so
nothing is world-readable even briefly. Imports only the standard library: the CLI uses it too.
"""

from __future__ import annotations

import os
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> Path:
    """``path`` (absolute) as a directory: whatever is missing of it is created with mode 0700. A directory that
    exists already keeps its mode (it may be shared on purpose)."""
    path = path.absolute()
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for directory in reversed(missing):
        directory.mkdir(mode=DIR_MODE, exist_ok=True)
        os.chmod(directory, DIR_MODE)  # mkdir's mode went through the umask
    return path


def private_file(path: Path) -> Path:
    """``path`` as a file of mode 0600: created empty when missing (its directory with ``private_dir``), an
    existing one of ours narrowed to 0600 (another user's is left alone)."""
    private_dir(path.parent)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE))
    narrow(path)
    return path


def narrow(path: Path) -> None:
    """Mode 0600 for an existing file of ours."""
    if path.stat().st_uid == os.getuid():
        os.chmod(path, FILE_MODE)


def write_secret(path: Path, value: str) -> None:
    """Write ``value`` (plus a newline) to ``path`` with mode 0600 from the start (never readable by others, not even
    briefly)."""
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "w") as out:
        out.write(value + "\n")
    os.chmod(path, FILE_MODE)
