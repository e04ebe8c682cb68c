"""Writing a model directory so that it appears complete or not at all.

``staged_directory(out)`` yields a temporary sibling of ``out``; when the block succeeds the sibling is renamed to
``out``, when it raises the sibling is removed. A non-empty ``out`` is refused before anything is written (nothing
is ever overwritten). Materialising presets, copying the shipped pretrained base and merged exports all use it.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qwenvl_core.errors import ConfigError


@contextmanager
def staged_directory(out: str | Path, error: type[Exception] = ConfigError) -> Iterator[Path]:
    """A temporary sibling of ``out`` that becomes ``out`` when the block succeeds, and vanishes otherwise;
    ``error`` is raised (naming ``out``) when ``out`` exists and is not empty."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise error(f"{out}: directory exists and is not empty; choose a new output directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield staging
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
