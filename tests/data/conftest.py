"""Fixtures of the data tests: the tiny model's processor, small images, and file writers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from qwenvl_core.models.qwen_vl.processor import QwenVLProcessor


@pytest.fixture(scope="session")
def processor(tiny_model_dir: Path) -> QwenVLProcessor:
    return QwenVLProcessor.from_dir(tiny_model_dir)


def write_png(path: Path, colour: tuple[int, int, int] = (200, 30, 30), size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, format="PNG")
    return path


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A folder with two valid images, ``imgs/a.png`` and ``imgs/b.png``."""
    write_png(tmp_path / "imgs" / "a.png")
    write_png(tmp_path / "imgs" / "b.png", (30, 30, 200))
    return tmp_path


WriteJsonl = Callable[[str, list[Any]], Path]


@pytest.fixture
def write_jsonl(data_dir: Path) -> WriteJsonl:
    """Write records (dicts, or raw strings written verbatim) one per line into ``data_dir/name``."""

    def write(name: str, records: list[Any]) -> Path:
        lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
        path = data_dir / name
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    return write
