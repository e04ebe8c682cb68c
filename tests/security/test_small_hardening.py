"""Small hardening: durable local writes, private local state, an anonymous ``/ready`` that names no process, and
job errors without tracebacks or internal paths.
"""

from __future__ import annotations

import io
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from qwenvl_core.storage import LocalStore
from service.main import create_app
from service.settings import Settings
from tests.service.helpers import auth, make_settings

INTERNAL = "/srv/qwenvl-internal/objects/tenants/t-secret/runs/ftjob-1"


# ----- LocalStore: fsync, rename, fsync of the directory; nothing left behind on an error -------------------------
@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths ``os.fsync`` is called on (the real fsync still runs)."""
    calls: list[str] = []
    real = os.fsync

    def recording(fd: int) -> None:
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return calls


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_put_bytes_fsyncs_the_file_then_the_directory(tmp_path: Path, fsyncs: list[str]) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("runs/a/result.json", b'{"state": "succeeded"}')
    run_dir = tmp_path / "runs" / "a"
    assert (run_dir / "result.json").read_bytes() == b'{"state": "succeeded"}'
    assert len(fsyncs) == 2
    assert Path(fsyncs[0]).parent == run_dir and Path(fsyncs[0]).name.startswith(".result.json.")  # before rename
    assert fsyncs[1] == str(run_dir)  # the rename itself made durable
    assert _leftovers(run_dir) == []


def test_a_failed_put_bytes_leaves_no_temporary_file_and_the_old_bytes(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("runs/a/events.json", b"old")
    with pytest.raises(TypeError):
        store.put_bytes("runs/a/events.json", "not bytes")  # type: ignore[arg-type]  # the write itself fails
    (tmp_path / "runs" / "a" / "checkpoints").mkdir()
    with pytest.raises(OSError):
        store.put_bytes("runs/a/checkpoints", b"x")  # the rename fails: a directory is in the way
    assert _leftovers(tmp_path / "runs" / "a") == []
    assert store.get_bytes("runs/a/events.json") == b"old"


class _FailingStream(io.RawIOBase):
    """A client upload that breaks off after some bytes."""

    def __init__(self) -> None:
        self.sent = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
        if self.sent >= 3:
            raise ConnectionResetError("client went away")
        buffer[:1] = b"x"
        self.sent += 1
        return 1


def test_a_failing_stream_leaves_no_temporary_file(tmp_path: Path, fsyncs: list[str]) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("uploads/f.jsonl", b"previous upload")
    with pytest.raises(ConnectionResetError):
        store.put_stream("uploads/f.jsonl", io.BufferedReader(_FailingStream()))
    assert _leftovers(tmp_path / "uploads") == []
    assert store.get_bytes("uploads/f.jsonl") == b"previous upload"
    stored = store.put_stream("uploads/g.jsonl", io.BytesIO(b"complete"))
    assert stored.size == 8 and fsyncs[-1] == str(tmp_path / "uploads")


# ----- private local state ------------------------------------------------------------------------------------------
@pytest.fixture
def open_umask() -> Iterator[None]:
    """A permissive umask (0022, the usual default): what is private must be so by its own mode."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_fresh_local_data_dir_and_its_database_are_private(tmp_path: Path, tiny_model_dir: Path,
                                                            open_umask: None) -> None:
    data = tmp_path / "home" / ".qwenvl"
    with TestClient(create_app(make_settings(data, tiny_model_dir))) as client:
        key = (data / "api_key").read_text().strip()
        assert client.get("/v1/files", headers=auth(key)).status_code == 200  # the database is in use (WAL)
        assert _mode(data) == 0o700
        for name in ("qwenvl.db", "qwenvl.db-wal", "qwenvl.db-shm", "admin_key", "api_key"):
            assert (data / name).is_file(), name
            assert _mode(data / name) == 0o600, name


def test_the_stack_home_is_private(tmp_path: Path, open_umask: None) -> None:
    from qwenvl_cli.stack import _secret

    home = tmp_path / "qwenvl-home"
    token = _secret(home / "ray_auth_token", lambda: "t" * 64)
    assert token == "t" * 64
    assert _mode(home) == 0o700 and _mode(home / "ray_auth_token") == 0o600


# ----- /ready ------------------------------------------------------------------------------------------------------
def test_ready_names_the_scheduler_leader_only_to_the_admin(tmp_path: Path, tiny_model_dir: Path) -> None:
    settings = make_settings(tmp_path, tiny_model_dir, scheduler_enabled=True)
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 30
        while not client.get("/ready").json()["scheduler_leader_present"]:
            assert time.monotonic() < deadline, "no scheduler leader"
            time.sleep(0.2)
        admin = (tmp_path / "admin_key").read_text().strip()
        tenant = (tmp_path / "api_key").read_text().strip()
        for headers in ({}, auth(tenant), auth("sk-qv-wrong")):
            body = client.get("/ready", headers=headers).json()
            assert body == {"status": "ok", "database": "ok", "scheduler_leader_present": True,
                            "scheduler_leader": None}, headers
            assert str(os.getpid()) not in json.dumps(body)
        leader = client.get("/ready", headers=auth(admin)).json()["scheduler_leader"]
        assert leader is not None and str(os.getpid()) in leader


# ----- job errors ----------------------------------------------------------------------------------------------------
def _raised(error: BaseException) -> BaseException:
    try:
        raise error
    except BaseException as caught:
        return caught


def _load_shard() -> None:
    Path(INTERNAL, "data", "shard-00003.safetensors").read_bytes()


def _assert_public(message: str) -> None:
    assert "Traceback" not in message and 'File "' not in message and "/srv/" not in message, message
    assert "t-secret" not in message and ".py" not in message, message


def _worker_group_error(error: BaseException) -> BaseException:
    """``error``, raised in rank 1's training function, as ``TorchTrainer.fit`` raises it in the driver: built by
    Ray Train's own code (the worker's traceback captured, the group's error from the workers' statuses)."""
    from ray.train.v2._internal.execution.worker_group.poll import WorkerGroupPollStatus, WorkerStatus
    from ray.train.v2._internal.util import construct_user_exception_with_traceback

    try:
        raise error
    except BaseException as caught:
        captured = construct_user_exception_with_traceback(caught)
    statuses = {0: WorkerStatus(running=False), 1: WorkerStatus(running=False, error=captured)}
    return _raised(WorkerGroupPollStatus(statuses).get_worker_group_error())


def test_an_internal_failure_is_reported_without_traceback_or_path() -> None:
    from workflows.finetune import public_error

    try:
        _load_shard()
    except FileNotFoundError as error:
        inner = error
    local = public_error(inner)
    _assert_public(local)
    assert "FileNotFoundError" in local and "logs" in local
    wrapped = _worker_group_error(inner)
    assert INTERNAL in str(wrapped) and "Traceback" in str(wrapped)  # what job.error used to show
    remote = public_error(wrapped)
    _assert_public(remote)
    assert "FileNotFoundError" in remote


def test_a_user_error_keeps_its_message() -> None:
    from qwenvl_core.errors import ConfigError
    from workflows.finetune import public_error

    expected = "ConfigError: hyperparameters.micro_batch_size: 0 is not allowed (must be >= 1)"
    user = _raised(ConfigError("hyperparameters.micro_batch_size: 0 is not allowed (must be >= 1)"))
    assert public_error(user) == expected
    assert public_error(_worker_group_error(user)) == expected  # also when a worker raised it


def test_run_job_reports_the_public_error_and_logs_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """``run_job`` end to end, with the Ray part replaced by a real failure of the kind it raises."""
    import workflows.finetune as finetune
    from qwenvl_core.runs import RunDir
    from service.jobspec import build_spec

    def failing_trainer(*_args: object, **_kwargs: object) -> object:
        _load_shard()
        raise AssertionError("unreachable")

    monkeypatch.setattr(finetune, "build_trainer", failing_trainer)
    spec = build_spec(job_id="ftjob-err", tenant_id="t1", base_model_path=str(tmp_path / "model"),
                      train_uri=str(tmp_path / "train.jsonl"), validation_uri=None, output_uri=str(tmp_path / "run"),
                      seed=1, hyperparameters={}, ext={})
    result = finetune.run_job(spec)
    assert result["state"] == "failed"
    _assert_public(result["error"])
    run = RunDir(spec.output_uri)
    assert run.read_result()["error"] == result["error"]  # result.json is shown to the tenant as a result file
    failed = [e for e in run.read_events() if e.type == "state" and e.data.get("state") == "failed"]
    assert len(failed) == 1 and result["error"] in failed[0].message  # events are shown to the tenant too
    for event in run.read_events():
        _assert_public(event.model_dump_json())
    logged = capsys.readouterr().err
    assert "Traceback" in logged and INTERNAL in logged  # the operators still get the whole story


def test_production_refuses_placeholder_secrets(tmp_path: Path) -> None:
    key = "k" * 32
    with pytest.raises(ValueError, match="QWENVL_MLFLOW_ADMIN_PASSWORD"):
        Settings(mode="production", data_dir=tmp_path, admin_key=key, mlflow_tracking_uri="http://mlflow:5000",
                 mlflow_admin_username="admin", mlflow_admin_password="changeme")
    with pytest.raises(ValueError, match="QWENVL_DATABASE_URL"):
        Settings(mode="production", data_dir=tmp_path, admin_key=key,
                 database_url="postgresql+psycopg2://qwenvl:changeme@postgres:5432/qwenvl")
    ok = Settings(mode="production", data_dir=tmp_path, admin_key=key,
                  database_url="postgresql+psycopg2://qwenvl:9c1f4e2a7b3d5f60@postgres:5432/qwenvl")
    assert ok.database_url is not None
    local = Settings(data_dir=tmp_path, mlflow_tracking_uri="http://mlflow:5000", mlflow_admin_username="admin",
                     mlflow_admin_password="changeme")  # local mode: a developer's own machine
    assert local.mlflow_admin_password is not None
