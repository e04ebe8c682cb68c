"""Fixtures of the family tests: the families' tiny directories (``tiny_dirs``) live in tests/conftest.py."""

from __future__ import annotations

from tests.conftest import HF_FAMILIES  # noqa: F401 (imported by the tests of this package)
# The ``tiny_dirs`` fixture (one tiny directory per family) lives in tests/conftest.py: serving tests use it too.
