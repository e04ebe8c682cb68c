"""docs/architecture.md names every module of the four packages, so a module added without a line there fails here
(the doc says what each module owns; a module it does not name is one nobody can find from it)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("qwenvl_core", "service", "workflows", "qwenvl_cli")


def _modules() -> list[Path]:
    return sorted(path.relative_to(ROOT) for package in PACKAGES for path in (ROOT / package).rglob("*.py")
                  if path.name != "__init__.py" and "migrations" not in path.parts)


def test_every_module_is_named_in_the_architecture_doc():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*\.py", doc))
    modules = _modules()
    assert len(modules) > 100  # the walk finds the packages' modules
    missing = [str(path) for path in modules if path.name not in named]
    assert not missing, f"modules docs/architecture.md does not name: {missing}"
