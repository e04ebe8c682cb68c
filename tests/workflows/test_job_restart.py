"""Whole-job restart: the driver (``python -m workflows.finetune --spec``) is SIGKILLed mid-run, after Ray Train
registered checkpoint 4 (its worker held at step 5 by ``QWENVL_FAULT``), and the same command is run again: the
job continues from that checkpoint to the adapter of an uninterrupted run (same seed and data, another job id),
with the same data-order digest. A finished job is not trained again. An unreadable Ray snapshot is set aside.

Runs on the workflow tests' two-node Ray cluster (tests/workflows/conftest.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qwenvl_core.runs import RunDir
from qwenvl_core.specs import FineTuneJobSpec, JobState
from qwenvl_core.training import RunDirEvents
from tests.fixtures.net import free_port
from tests.training.conftest import make_spec, synth_data  # noqa: F401  (fixture)
from tests.workflows.conftest import launch_workflow
from workflows.finetune import announce_restart, ray_resume_step

pytestmark = pytest.mark.slow


def _finish(process: subprocess.Popen[bytes], tmp: Path, log: str, timeout: float = 600) -> None:
    process.wait(timeout=timeout)
    assert process.returncode == 0, (tmp / log).read_text(errors="replace")[-3000:]


def _wait_for(condition, what: str, process: subprocess.Popen[bytes] | None = None, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the driver exited ({process.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _ray_dir(spec: FineTuneJobSpec) -> Path:
    """Ray Train's storage of the job: ``RunConfig(name=job_id, storage_path=output_uri/checkpoints)``."""
    return Path(spec.output_uri) / "checkpoints" / spec.job_id


def _committed_step(spec: FineTuneJobSpec) -> int:
    """The step of the latest checkpoint Ray Train has registered in its run snapshot (0 if none)."""
    path = _ray_dir(spec) / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(path.read_text())["latest_checkpoint_result"]
    except (FileNotFoundError, ValueError, KeyError):
        return 0
    return int(latest["checkpoint_dir_name"].removeprefix("step_")) if latest else 0


def test_exact_resume_after_the_driver_is_killed(ray_cluster, tiny_model_dir, synth_data, tmp_path):  # noqa: F811
    t0 = time.monotonic()
    common = {"validation_file": None, "hyperparameters": {"max_steps": 8}, "checkpoint": {"every_n_steps": 2},
              "compute": {"num_workers": 1, "cpus_per_worker": 1}}
    reference = make_spec(tiny_model_dir, synth_data, tmp_path / "reference", job_id="restart-reference", **common)
    spec = make_spec(tiny_model_dir, synth_data, tmp_path / "run", job_id="restart-job", **common)
    run = RunDir(spec.output_uri)

    # the uninterrupted reference runs beside the first attempt (one CPU each)
    ref_process = launch_workflow(reference, ray_cluster, tmp_path, "reference.log")
    # the first attempt's worker is held at step 5 (checkpoint 4 reported), so the driver surely dies mid-run
    held = tmp_path / "held"
    hold = {"QWENVL_FAULT": json.dumps({"step": 5, "rank": 0, "marker": str(held), "delay_s": 600, "kill": False})}
    first = launch_workflow(spec, ray_cluster, tmp_path, "first.log", hold)
    _wait_for(lambda: any(e.type == "checkpoint" and e.data["step"] == 4 for e in run.read_events()),
              "the checkpoint event of step 4", first)
    # Ray Train collects worker reports on a ~2 s poll: kill once its snapshot holds step 4 (no blind sleep)
    _wait_for(lambda: _committed_step(spec) == 4, "Ray Train to register checkpoint 4", first, timeout=180)
    # the snapshot can hold step 4 before the worker has reached its hold at step 5 (a loaded machine: seen once)
    _wait_for(held.exists, "the worker to be held at step 5", first, timeout=180)
    assert held.exists()
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    killed_at = time.monotonic()

    # the dead driver's Ray Train worker goes away with it (Ray kills the actors of a dead driver's job)
    worker_pid = run.read_json("workers/rank0.json")["pid"]
    _wait_for(lambda: not _alive(worker_pid), "the dead driver's worker to exit", timeout=180)
    worker_gone_s = time.monotonic() - killed_at
    assert run.read_result() is None and not run.exists("outcome.json")  # it really died mid-run
    events_before = run.read_events()
    assert [e.seq for e in events_before] == list(range(len(events_before)))
    assert _committed_step(spec) == 4
    [killed_scratch] = tmp_path.glob(f"qwenvl-train-{spec.job_id}-rank0-*")
    assert killed_scratch.is_dir()  # a SIGKILLed worker cannot clean up after itself
    # a checkpoint whose upload was cut off by the kill: never resumed from, overwritten when its step comes again
    partial = _ray_dir(spec) / "step_00000006"
    partial.mkdir(exist_ok=True)
    (partial / "state.json").write_text('{"state": {"step": ')

    second = launch_workflow(spec, ray_cluster, tmp_path, "second.log")
    _finish(second, tmp_path, "second.log")
    _finish(ref_process, tmp_path, "reference.log")
    result, full = run.read_result(), RunDir(reference.output_uri).read_result()
    assert result["state"] == full["state"] == "succeeded"
    assert not killed_scratch.exists() and not list(tmp_path.glob("qwenvl-*"))  # the next worker swept it
    resumed = result["summary"]["resumed_from_step"]
    assert resumed == 4  # the latest checkpoint Ray had registered, not the cut-off one
    assert json.loads((partial / "state.json").read_text())["state"]["step"] == 6
    assert full["summary"]["resumed_from_step"] is None
    assert result["summary"]["steps"] == full["summary"]["steps"] == 8
    assert result["summary"]["data_digest"] == full["summary"]["data_digest"]  # no sample skipped or repeated
    assert result["summary"]["samples_seen"] == full["summary"]["samples_seen"]
    got = load_file(Path(spec.output_uri) / "adapter" / "adapter_model.safetensors")
    expected = load_file(Path(reference.output_uri) / "adapter" / "adapter_model.safetensors")
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-4)

    # the run directory tells one consistent story: numbering continued, nothing overwritten
    events = run.read_events()
    assert [e.seq for e in events] == list(range(len(events)))
    assert [e.model_dump() for e in events[: len(events_before)]] == [e.model_dump() for e in events_before]
    later = events[len(events_before):]
    assert any(e.type == "message" and e.message == f"resumed from step {resumed}" for e in later)
    assert [e.data["state"] for e in events if e.type == "state"] == ["running", "running", "succeeded"]
    assert later[0].type == "state" and later[0].data == {"state": "running", "restart": True,
                                                          "checkpoint_step": 4}

    # a finished job is not trained again: the same command returns the stored result at once
    adapter = Path(spec.output_uri) / "adapter" / "adapter_model.safetensors"
    mtime, stored = adapter.stat().st_mtime_ns, run.read_result()
    third = launch_workflow(spec, ray_cluster, tmp_path, "third.log")
    _finish(third, tmp_path, "third.log", timeout=120)
    assert run.read_result() == stored and adapter.stat().st_mtime_ns == mtime
    assert len(run.read_events()) == len(events)
    print(f"job restart test: {time.monotonic() - t0:.1f} s (worker gone {worker_gone_s:.1f} s after the kill, "
          f"resumed from step {resumed})")


def test_an_unusable_ray_snapshot_is_set_aside(tiny_model_dir, synth_data, tmp_path):  # noqa: F811
    """A snapshot Ray cannot load (cut short when the driver was killed) would fail every relaunch: the relaunch
    sets it aside, says so, and trains from step 0; a readable one names the step it resumes from."""
    spec = make_spec(tiny_model_dir, synth_data, tmp_path / "run", job_id="snap-job")
    run, ray_dir = RunDir(spec.output_uri), _ray_dir(spec)
    (ray_dir / "step_00000004").mkdir(parents=True)
    (ray_dir / "step_00000004" / "state.json").write_text("{}")
    entry = {"version": 0, "checkpoint_dir_name": "step_00000004", "metrics": {"step": 4.0}}
    snapshot = ray_dir / "checkpoint_manager_snapshot.json"
    snapshot.write_text(json.dumps({"checkpoint_results": [entry], "latest_checkpoint_result": entry}))
    assert ray_resume_step(run, spec) == 4
    (ray_dir / "step_00000004" / "state.json").unlink()
    with pytest.raises(ValueError, match="gone or unlisted"):
        ray_resume_step(run, spec)

    cut = snapshot.read_bytes()[:40]
    snapshot.write_bytes(cut)
    events = RunDirEvents(run)
    announce_restart(run, spec, events, retry_failed=False)
    assert not snapshot.exists() and ray_resume_step(run, spec) is None
    assert [p.read_bytes() for p in ray_dir.glob("checkpoint_manager_snapshot.json.unusable-*")] == [cut]
    warn, state = run.read_events()
    assert warn.level == "warn" and "set aside" in warn.message
    assert state.data == {"state": "running", "restart": True, "checkpoint_step": None}


def _run_jobs_without_ray(specs: list[FineTuneJobSpec], tmp: Path) -> list[dict]:
    """``run_job(spec)`` for each spec in turn, in a child process whose ``RAY_ADDRESS`` answers nothing: an
    attempt to train hangs there, and the timeout fails the test within a couple of minutes."""
    paths = []
    for i, spec in enumerate(specs):
        paths.append(tmp / f"{spec.job_id}-{i}.json")
        paths[-1].write_text(spec.model_dump_json())
    code = ("import json, sys; from qwenvl_core.specs import FineTuneJobSpec; from workflows.finetune import run_job; "
            "print(json.dumps([run_job(FineTuneJobSpec.model_validate_json(open(p).read())) for p in sys.argv[1:]]))")
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{free_port()}", "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-c", code, *map(str, paths)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_relaunch_after_training_finished_only_records_the_result(tiny_model_dir, synth_data, tmp_path):  # noqa: F811
    """The driver died after rank 0 wrote ``outcome.json`` (training, evaluation and adapter done) but before
    ``result.json``: the relaunch records that result without Ray Train. Relaunched again, the finished job returns
    its stored result; the same job id with another spec is refused and the run left untouched."""
    spec = make_spec(tiny_model_dir, synth_data, tmp_path / "run", job_id="done-job")
    other = make_spec(tiny_model_dir, synth_data, tmp_path / "run", job_id="done-job", seed=7)
    run = RunDir(spec.output_uri)
    run.write_json("spec.json", spec.model_dump(mode="json"))
    RunDirEvents(run).state(JobState.RUNNING, "job done-job started on Ray Train")
    outcome = {"state": "succeeded", "metrics": {"eval/loss": 1.0}, "summary": {"steps": 12},
               "model_version": None, "mlflow_run_id": None}
    run.write_json("outcome.json", outcome)

    recorded, again, refused = _run_jobs_without_ray([spec, spec, other], tmp_path)
    assert recorded == {"job_id": "done-job", **outcome, "adapter_uri": run.uri_of("adapter")} == run.read_result()
    assert again == recorded  # finished: returned as stored
    assert refused["state"] == "failed" and "different spec" in refused["error"]
    states = [(e.data["state"], e.data.get("restart")) for e in run.read_events() if e.type == "state"]
    assert states == [("running", None), ("running", True), ("succeeded", None)]  # nothing after the first
    assert FineTuneJobSpec.model_validate(run.read_json("spec.json")) == spec
