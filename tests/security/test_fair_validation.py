"""Uploads are validated tenants in turn: one tenant's backlog of uploads does not hold back another tenant's.

``TurnQueue`` (the order itself) directly, and the real app (TestClient, SQLite, the real validation worker in
its child process, one validation at a time as by default): tenant A uploads three files, then tenant B one; B's
file is validated before A's third (before: after all of A's).
"""

from __future__ import annotations

import threading
import time

from fastapi.testclient import TestClient

from service.fair_queue import TurnQueue
from service.main import create_app
from tests.service.helpers import auth, make_settings, new_tenant, upload, wait_file

ADMIN = "admin-key-for-fair-validation-0123456789"


def test_owners_take_turns_and_each_owners_items_keep_their_order():
    queue: TurnQueue[str] = TurnQueue()
    for item in ("a1", "a2", "a3", "a4"):
        queue.put("A", item)
    queue.put("B", "b1")
    queue.put("C", "c1")
    queue.put("B", "b2")
    assert len(queue) == 7
    assert [queue.get() for _ in range(7)] == ["a1", "b1", "c1", "a2", "b2", "a3", "a4"]


def test_close_returns_what_waits_and_wakes_every_waiting_get():
    queue: TurnQueue[str] = TurnQueue()
    got: list[str | None] = []
    waiter = threading.Thread(target=lambda: got.append(queue.get()))
    waiter.start()
    queue.put("A", "a1")
    waiter.join(timeout=10)
    assert got == ["a1"]
    queue.put("A", "a2")
    blocked = threading.Thread(target=lambda: (queue.get(), got.append(queue.get())))
    blocked.start()  # takes a2, then waits
    deadline = time.monotonic() + 30
    while len(queue) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert queue.close() == []
    blocked.join(timeout=10)
    assert not blocked.is_alive() and got == ["a1", None]
    queue.put("A", "late")  # refused once closed
    assert len(queue) == 0 and queue.get() is None
    left: TurnQueue[str] = TurnQueue()
    left.put("A", "a1")
    left.put("B", "b1")
    assert sorted(left.close()) == ["a1", "b1"]


def test_a_tenants_upload_is_validated_before_another_tenants_backlog(tmp_path, tiny_model_dir):
    settings = make_settings(tmp_path / "data", tiny_model_dir, admin_key=ADMIN)
    with TestClient(create_app(settings)) as client:
        _, key_a = new_tenant(client, ADMIN, "backlog")
        _, key_b = new_tenant(client, ADMIN, "single")
        backlog = [upload(client, key_a)["id"] for _ in range(3)]  # 1st validating, 2nd and 3rd waiting
        single = upload(client, key_b)["id"]
        assert wait_file(client, key_b, single, timeout=180)["status"] == "processed"
        third = client.get(f"/v1/files/{backlog[2]}", headers=auth(key_a)).json()
        assert third["status"] == "uploaded"  # its turn came after B's; old order: A's three, then B's
        for file_id in backlog:
            assert wait_file(client, key_a, file_id, timeout=180)["status"] == "processed"
