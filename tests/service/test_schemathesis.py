"""Property-based requests from the OpenAPI spec (schemathesis): no input may produce a server error."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from service.main import create_app
from tests.service.helpers import make_settings, upload, wait_file

pytestmark = pytest.mark.slow


def test_no_server_errors_anywhere_in_the_spec(tmp_path: Path, tiny_model_dir: Path) -> None:
    app = create_app(make_settings(tmp_path, tiny_model_dir, admin_key="schemathesis-admin-key-0123456789"))
    with TestClient(app) as client:
        key = (tmp_path / "api_key").read_text().strip()
        wait_file(client, key, upload(client, key)["id"])
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        failures: list[str] = []
        calls = [0]
        operations = _operations(schema)
        for path, method, operation in operations:
            for token in (key, "schemathesis-admin-key-0123456789"):
                failures += _run(operation, token, f"{method.upper()} {path}", calls)
        assert len(operations) >= 15 and calls[0] >= 10 * len(operations), (len(operations), calls)
        assert not failures, "\n".join(failures[:20])


def _operations(schema: schemathesis.BaseSchema) -> list[tuple[str, str, object]]:
    ops = []
    for result in schema.get_all_operations():
        op = result.ok()
        if op.path != "/v1/fine_tuning/estimate":  # each call starts a validation process: covered in test_api
            ops.append((op.path, op.method, op))
    return ops


def _run(operation: object, token: str, name: str, calls: list[int]) -> list[str]:
    failures: list[str] = []

    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=operation.as_strategy())  # type: ignore[attr-defined]
    def check(case: object) -> None:
        calls[0] += 1
        response = case.call(headers={"Authorization": f"Bearer {token}"})  # type: ignore[attr-defined]
        if response.status_code >= 500:
            failures.append(f"{name}: {response.status_code} {response.text[:300]}")

    check()
    return failures
