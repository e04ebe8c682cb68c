"""An earlier revision of this repository checked out beside the working tree (a detached git worktree), for the
benchmarks that measure it against the working tree in the same run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

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


@contextlib.contextmanager
def before_tree(rev: str, scripts: Sequence[str]) -> Iterator[Path | None]:
    """``worktree(rev)`` (None as there, and for an empty ``rev``) with this tree's bench ``scripts`` and this module
    written into it: the old tree may predate them, and they measure that tree's code."""
    if not rev:
        yield None
        return
    with worktree(rev) as tree:
        if tree is None:
            print(f"(no git history with {rev} here: no 'before' rows)")
        else:
            for name in (*scripts, "revisions.py"):
                (tree / "bench" / name).write_text((Path(__file__).parent / name).read_text())
        yield tree


def run_json(tree: Path, script: str, args: Sequence[str]) -> Any:
    """Run ``tree``'s ``bench/<script>`` with ``args`` on that tree's code (its root first on ``PYTHONPATH``): the
    JSON on the last line it prints; exits with its error output when it fails."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(tree / "bench" / script), *args], capture_output=True, text=True,
                          env=env)
    if done.returncode != 0:
        raise SystemExit(f"{script} in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
