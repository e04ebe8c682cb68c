"""Pretrained model directories shipped inside the package (``qwenvl_core/assets/<name>/``).

This module owns where shipped base models live, their manifest (``pretraining.json``: the recipe that built them
and the sha256 of every file) and copying one into a new model directory after checking its files against the
manifest (a truncated file or a Git LFS pointer is an error naming the file, never a silently broken model).
A preset names its shipped directory with ``Preset.weights``; building one is ``qwenvl_core.pretrain.ship``.
Nothing runs at import time.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from qwenvl_core.errors import ConfigError, ModelLoadError
from qwenvl_core.models.staging import staged_directory

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
MANIFEST_FILE = "pretraining.json"


def shipped_dir(name: str) -> Path:
    """The package directory of shipped model ``name``."""
    return ASSETS_DIR / name


def digests(directory: Path, names: list[str]) -> dict[str, str]:
    """sha256 of each of ``names`` in ``directory``."""
    return {n: hashlib.sha256((directory / n).read_bytes()).hexdigest() for n in names}


def read_manifest(name: str) -> dict[str, Any]:
    """The manifest of shipped model ``name``; ``ModelLoadError`` when it is missing or unreadable."""
    path = shipped_dir(name) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"shipped model {name!r}: {path} is missing or unreadable ({exc}); reinstall the "
                             "package or rebuild it with `python -m qwenvl_core.pretrain.ship`") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ModelLoadError(f"shipped model {name!r}: {path} has no 'files' table")
    return manifest


def check_files(root: Path, manifest: dict[str, Any]) -> None:
    """``ModelLoadError`` naming every file of ``manifest["files"]`` missing from ``root`` or not matching its
    sha256."""
    name = manifest.get("name", root.name)
    missing = [n for n in manifest["files"] if not (root / n).is_file()]
    if missing:
        raise ModelLoadError(f"shipped model {name!r}: missing {', '.join(missing)} in {root}")
    bad = [n for n, digest in digests(root, list(manifest["files"])).items() if digest != manifest["files"][n]]
    if bad:
        raise ModelLoadError(f"shipped model {name!r}: {', '.join(bad)} in {root} do not match {MANIFEST_FILE} "
                             "(a truncated copy or a Git LFS pointer?)")


def verify(name: str) -> dict[str, Any]:
    """The manifest of ``name`` after checking every file it lists against its sha256."""
    manifest = read_manifest(name)
    check_files(shipped_dir(name), manifest)
    return manifest


def copy_shipped(name: str, out_dir: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write shipped model ``name`` (its checked files) into the new directory ``out_dir``, complete or not at all.

    Its weights are what they are: a seed other than 0 or a dtype other than float32 is a ``ConfigError`` (they
    would silently not apply)."""
    if seed != 0:
        raise ConfigError(f"--seed: {name} ships pretrained weights (no random draw); leave the seed at 0")
    if dtype != torch.float32:
        raise ConfigError(f"--dtype: {name} ships float32 weights; leave the dtype at float32")
    manifest = verify(name)
    with staged_directory(out_dir) as staging:
        for file in [*manifest["files"], MANIFEST_FILE]:
            shutil.copyfile(shipped_dir(name) / file, staging / file)
    return Path(out_dir)
