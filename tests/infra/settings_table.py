"""Rendering of the ``service.settings.Settings`` rows of docs/configuration.md (used by the test that checks the
document, and to regenerate the rows: ``python -m tests.infra.settings_table``)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from service.settings import Settings

READER = "service.settings"
NONE = "(none)"


def env_prefix() -> str:
    return str(Settings.model_config.get("env_prefix", ""))


def env_name(field: str) -> str:
    return f"{env_prefix()}{field}".upper()


def valid_env_names() -> set[str]:
    """Every environment variable ``Settings`` reads (derived from the class, never kept by hand)."""
    return {env_name(name) for name in Settings.model_fields}


def default_of(info: FieldInfo) -> Any:
    if info.default_factory is not None:
        return info.default_factory()  # type: ignore[call-arg]
    return None if info.default is PydanticUndefined else info.default


def render_default(value: Any) -> str:
    if value is None:
        return NONE
    if isinstance(value, Enum):
        return f"`{value.value}`"
    if isinstance(value, dict | list):
        return f"`{json.dumps(value)}`"
    if isinstance(value, Path):
        return f"`{value}`"
    return f"`{value}`"


def settings_rows() -> dict[str, tuple[str, str]]:
    """env name -> (rendered default, meaning) for every Settings field."""
    return {env_name(name): (render_default(default_of(info)), info.description or "")
            for name, info in Settings.model_fields.items()}


def main() -> None:
    for name, (default, meaning) in settings_rows().items():
        print(f"| `{name}` | {READER} | {default} | {meaning} |")


if __name__ == "__main__":
    main()
