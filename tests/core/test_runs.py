"""The run-directory channel between the training job and the service, on local disk and on S3 (moto)."""

from __future__ import annotations

import time

import pytest

from qwenvl_core.runs import RunDir
from qwenvl_core.specs import JobEvent


def _exercise(run: RunDir) -> None:
    assert run.read_events() == [] and run.last_event_seq() == -1
    for seq in range(3):
        run.write_event(JobEvent(seq=seq, created_at=time.time(), message=f"step {seq} 完成", data={"step": seq}))
    assert [e.seq for e in run.read_events()] == [0, 1, 2]
    assert [e.seq for e in run.read_events(after_seq=0)] == [1, 2]
    assert run.read_events()[1].message == "step 1 完成"
    assert run.last_event_seq() == 2
    assert not run.cancel_requested()
    run.request_cancel()
    assert run.cancel_requested()
    assert run.read_result() is None
    run.write_result({"state": "succeeded", "metrics": {"loss": 0.5}})
    assert run.read_result() == {"state": "succeeded", "metrics": {"loss": 0.5}}


def test_run_dir_on_local_disk(tmp_path):
    run = RunDir(str(tmp_path / "jobs" / "ftjob-1"))
    _exercise(run)
    assert (tmp_path / "jobs" / "ftjob-1" / "events" / "00000002.json").is_file()
    assert not list((tmp_path / "jobs" / "ftjob-1").rglob("*.tmp-*"))


@pytest.mark.slow
def test_run_dir_on_s3(s3_env):
    s3_env.client().create_bucket(Bucket="runs")
    run = RunDir("s3://runs/tenant-a/ftjob-2")
    _exercise(run)
    keys = {o["Key"] for o in s3_env.client().list_objects_v2(Bucket="runs")["Contents"]}
    assert "tenant-a/ftjob-2/events/00000000.json" in keys and "tenant-a/ftjob-2/CANCEL" in keys


def test_adapter_upload_download_round_trip(tmp_path):
    src = tmp_path / "adapter_src"
    (src / "sub").mkdir(parents=True)
    (src / "adapter_config.json").write_text('{"r": 8}')
    (src / "sub" / "w.bin").write_bytes(b"\x00" * 1000)
    run = RunDir(str(tmp_path / "run"))
    stored = run.upload_adapter(src)
    assert {s.key for s in stored} == {"adapter/adapter_config.json", "adapter/sub/w.bin"}
    run.download_adapter(tmp_path / "copy")
    assert (tmp_path / "copy" / "sub" / "w.bin").read_bytes() == b"\x00" * 1000
