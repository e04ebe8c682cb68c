"""A tenant's refusals are held back (``Settings.tenant_refusal_delay_s``): a client that retries at once costs the
API one refusal per delay, not one per round trip. At most the tenant's concurrency cap of its refusals wait at
once (the rest are answered at once), and other tenants are served meanwhile."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi.testclient import TestClient

from service.main import create_app
from tests.service.helpers import auth, make_settings, new_tenant

ADMIN = "admin-key-for-refusal-delay-tests-0123456789"
DELAY_S = 3.0
CAP = 2  # the tenants' concurrency cap: at most this many of a tenant's refusals are held back at once


def test_refusals_wait_the_delay_a_bounded_number_at_once_and_others_are_served(tmp_path: Path,
                                                                                tiny_model_dir: Path) -> None:
    settings = make_settings(tmp_path, tiny_model_dir, admin_key=ADMIN, tenant_requests_per_second=0.01,
                             tenant_request_burst=1, tenant_max_concurrent_requests=CAP,
                             tenant_refusal_delay_s=DELAY_S)
    with TestClient(create_app(settings)) as client:
        a, b = (new_tenant(client, ADMIN, name)[1] for name in ("flooder", "bystander"))
        assert client.get("/v1/fine_tuning/jobs", headers=auth(a)).status_code == 200  # the burst of 1

        def refused() -> tuple[float, int, str]:
            start = time.monotonic()
            resp = client.get("/v1/fine_tuning/jobs", headers=auth(a))
            return time.monotonic() - start, resp.status_code, resp.json()["error"]["code"]

        with ThreadPoolExecutor(CAP + 2) as pool:
            started = time.monotonic()
            flood = [pool.submit(refused) for _ in range(CAP + 2)]
            bystander = client.get("/v1/fine_tuning/jobs", headers=auth(b))
            bystander_done = time.monotonic() - started
            answers = sorted(f.result() for f in flood)
    assert bystander.status_code == 200
    assert [(status, code) for _, status, code in answers] == [(429, "rate_limit_exceeded")] * (CAP + 2)
    held = [seconds for seconds, _, _ in answers if seconds >= DELAY_S]
    assert len(held) == CAP, answers  # the cap's worth waited the delay (Retry-After is 100 s: the delay is shorter)
    at_once = [seconds for seconds, _, _ in answers if seconds < DELAY_S]
    assert len(at_once) == 2 and bystander_done < min(held), (answers, bystander_done)
