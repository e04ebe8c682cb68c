"""The Ray Train workflow end to end on a real two-node Ray cluster (head + worker node, separate ``ray start``
processes): DDP across both nodes with MLflow, exact resume after a killed worker, ZeRO-2 with checkpoints on
S3 (moto server), cancellation, and ``qwenvl finetune`` running ZeRO-3. Every job runs as ``python -m
workflows.finetune --spec`` like the service submits it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qwenvl_core.runs import RunDir
from qwenvl_core.specs import FineTuneJobSpec
from tests.training.conftest import make_spec, synth_data  # noqa: F401  (fixture)
from tests.workflows.conftest import launch_workflow

pytestmark = pytest.mark.slow


def _run(spec: FineTuneJobSpec, address: str, tmp: Path, env: dict[str, str] | None = None) -> dict:
    log = f"{spec.job_id}.log"
    process = launch_workflow(spec, address, tmp, log, env)
    process.wait(timeout=400)
    result = RunDir(spec.output_uri).read_result()
    assert process.returncode == 0, (tmp / log).read_text()[-3000:]
    return result


def _assert_learned(result: dict) -> None:
    assert result["state"] == "succeeded"
    s, m = result["summary"], result["metrics"]
    assert s["final_loss"] < s["first_loss"] - 0.3
    assert m["eval/token_accuracy"] > m["eval_base/token_accuracy"] + 0.2


@pytest.fixture(scope="module")
def ddp_run(ray_cluster, tiny_model_dir, synth_data, mlflow_server, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("ddp")
    spec = make_spec(tiny_model_dir, synth_data, tmp / "run", job_id="ddp-job",
                     compute={"num_workers": 2, "cpus_per_worker": 1, "placement_strategy": "SPREAD"},
                     tracking={"tracking_uri": mlflow_server, "experiment": "tests", "registered_model": "tiny"})
    return spec, _run(spec, ray_cluster, tmp), (tmp / f"{spec.job_id}.log").read_text()


def test_ddp_on_two_nodes_learns(ddp_run):
    spec, result, log = ddp_run
    _assert_learned(result)
    assert result["summary"]["world_size"] == 2
    run = RunDir(spec.output_uri)
    nodes = {run.read_json(f"workers/rank{r}.json")["node_id"] for r in (0, 1)}
    assert len(nodes) == 2  # SPREAD put one worker on each node
    # each line of the job's log once: every node has a temp dir (and so a log monitor) of its own
    assert log.count("Started training worker group of size 2") == 1, log[-3000:]
    assert {"adapter_config.json", "adapter_model.safetensors", "meta.json"} <= set(run.list_names("adapter"))
    assert [e.data.get("state") for e in run.read_events() if e.type == "state"] == ["running", "succeeded"]


def test_mlflow_has_params_metrics_artifacts_and_a_registered_version(ddp_run, mlflow_server):
    from mlflow.tracking import MlflowClient

    spec, result, _ = ddp_run
    client = MlflowClient(mlflow_server)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.run_name == "ddp-job" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "local/tests"
    p = run.data.params
    assert p["hp.learning_rate"] == "0.01" and p["lora.r"] == "8" and p["base_model"].endswith("qwen-vl-tiny")
    assert int(p["data.train.samples"]) == 96
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 12
    assert "eval_token_accuracy" in run.data.metrics and "eval_base_token_accuracy" in run.data.metrics
    assert any(k.startswith("system/") for k in run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter/adapter_model.safetensors", "adapter/meta.json", "adapter/adapter_config.json"} <= artifacts
    assert client.list_artifacts(run.info.run_id, "plots")[0].path == "plots/loss_curve.png"
    assert {a.path for a in client.list_artifacts(run.info.run_id, "data")} >= {"data/train_validation_report.json"}
    version = client.get_model_version_by_alias("tiny", "latest-finetune")
    assert version.version == result["model_version"] and version.tags["job_id"] == "ddp-job"
    assert version.tags["base_model"] == spec.base_model


def test_exact_resume_after_a_killed_worker(ddp_run, ray_cluster, tiny_model_dir, synth_data, tmp_path):  # noqa: F811
    spec, full, _ = ddp_run
    resumed_spec = make_spec(tiny_model_dir, synth_data, tmp_path / "run", job_id="killed-job",
                             compute={"num_workers": 2, "cpus_per_worker": 1, "max_failures": 1})
    marker = tmp_path / "killed"
    env = {"QWENVL_FAULT": json.dumps({"step": 6, "rank": 1, "marker": str(marker), "delay_s": 5.0})}
    result = _run(resumed_spec, ray_cluster, tmp_path, env)
    assert marker.exists() and result["state"] == "succeeded"
    assert result["summary"]["resumed_from_step"] == 4
    assert result["summary"]["data_digest"] == full["summary"]["data_digest"]  # no sample skipped or repeated
    assert result["summary"]["samples_seen"] == full["summary"]["samples_seen"]
    got = load_file(Path(resumed_spec.output_uri) / "adapter" / "adapter_model.safetensors")
    expected = load_file(Path(spec.output_uri) / "adapter" / "adapter_model.safetensors")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-4)


def test_zero2_with_checkpoints_on_s3(ray_cluster, tiny_model_dir, synth_data, s3_env, tmp_path):  # noqa: F811
    s3_env.client().create_bucket(Bucket="runs")
    spec = make_spec(tiny_model_dir, synth_data, "s3://runs/jobs/zero2-job", job_id="zero2-job",
                     compute={"num_workers": 2, "cpus_per_worker": 1, "strategy": "zero2"})
    result = _run(spec, ray_cluster, tmp_path, s3_env.env())
    _assert_learned(result)
    keys = [o["Key"] for o in s3_env.client().list_objects_v2(Bucket="runs", Prefix="jobs/zero2-job/")["Contents"]]
    steps = {k.split("/")[4] for k in keys if "/checkpoints/zero2-job/step_" in k}
    assert steps == {"step_00000004", "step_00000008", "step_00000012"}
    assert any(k.endswith("step_00000012/state.json") for k in keys)
    assert any("zero_pp_rank_1" in k for k in keys)  # every rank's shard made it
    assert "jobs/zero2-job/adapter/adapter_model.safetensors" in keys


def test_cancel_stops_within_seconds(ray_cluster, tiny_model_dir, synth_data, tmp_path):  # noqa: F811
    spec = make_spec(tiny_model_dir, synth_data, tmp_path / "run", job_id="cancel-job",
                     hyperparameters={"max_steps": 1000}, checkpoint={"every_n_steps": 1000},
                     compute={"num_workers": 2, "cpus_per_worker": 1})
    run = RunDir(spec.output_uri)
    process = launch_workflow(spec, ray_cluster, tmp_path, "cancel.log")
    deadline = time.monotonic() + 300
    while not any(e.type == "metrics" for e in run.read_events()) and time.monotonic() < deadline:
        time.sleep(0.5)
    run.request_cancel()
    step_at_cancel = max(e.data.get("step", 0) for e in run.read_events())
    process.wait(timeout=300)  # (a hang guard: how soon it stops is counted in steps below, not seconds)
    assert process.returncode == 0
    result = run.read_result()
    # rank 0 polls CANCEL once a second (and progress events come at most every 2 s): the run stops a few seconds'
    # steps after the request, far short of its 1000
    assert result["state"] == "cancelled" and result["summary"]["steps"] <= step_at_cancel + 100, result["summary"]
    assert any(e.type == "checkpoint" for e in run.read_events())
    assert [e.data.get("state") for e in run.read_events() if e.type == "state"][-1] == "cancelled"


def test_qwenvl_finetune_cli_runs_the_same_workflow_and_zero3_learns(ray_cluster, tiny_model_dir, synth_data,  # noqa: F811
                                                                      tmp_path):
    """``qwenvl finetune`` (a YAML config plus flags) runs the workflow; with ``--strategy zero3`` and gradient
    accumulation (batch 4 of micro-batches of 2, as ``make_spec``) the job learns as DDP's does."""
    qwenvl = str(Path(sys.executable).parent / "qwenvl")
    config = tmp_path / "job.yaml"
    config.write_text("lora: {r: 8, alpha: 16}\nevaluation: {max_new_tokens: 4}\ncheckpoint: {every_n_steps: 4}\n"
                      "hyperparameters: {batch_size: 4, micro_batch_size: 2, learning_rate: 0.01, warmup_ratio: 0.1}\n")
    out = tmp_path / "cli-run"
    base = [qwenvl, "finetune", "--base", str(tiny_model_dir), "--train", str(synth_data.train),
            "--val", str(synth_data.validation), "--config", str(config), "--out", str(out)]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "RAY_AUTH_MODE": "disabled", "QWENVL_WORK_DIR": str(tmp_path)}

    bad = subprocess.run([*base, "--strategy", "zero9"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "compute.strategy" in bad.stderr and "Traceback" not in bad.stderr

    done = subprocess.run([*base, "--max-steps", "12", "--workers", "2", "--strategy", "zero3"], env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout)  # stdout is the result alone; the progress and the workers' logs: stderr
    assert "12/12 steps" in done.stderr
    assert printed["state"] == "succeeded" and printed["adapter_uri"] == str(out / "adapter")
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    result = RunDir(str(out)).read_result()
    assert result["summary"]["strategy"] == "zero3" and result["summary"]["world_size"] == 2
    _assert_learned(result)
