"""An earlier revision of this repository checked out beside the working tree (a detached git worktree), for the
benchmarks that measure it against the working tree in the same run."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def worktree(rev: str) -> Iterator[Path | None]:
    """The tree of ``rev`` in a temporary folder while the block runs; None where git or that revision is missing
    (the device machine's copy of the tree has no history)."""
    if shutil.which("git") is None or subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
            capture_output=True).returncode != 0:
        yield None
        return
    tree = Path(tempfile.mkdtemp(prefix="bench-before-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev],
                   check=True, capture_output=True)
    try:
        yield tree
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
