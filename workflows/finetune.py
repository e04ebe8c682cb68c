"""A fine-tuning job on Ray Train: ``TorchTrainer`` around ``qwenvl_core.training.Trainer``.

``python -m workflows.finetune --spec SPEC.json`` runs one job on the current Ray cluster (``RAY_ADDRESS``, or a
running local one, else a new local one); the REST service submits exactly this through Ray Jobs, and
``qwenvl finetune`` calls ``run_job``. Exit code 0 when the job succeeded or was cancelled, 1 when it failed;
``result.json`` (written last) and the events in the run directory say which, with the error.

Ray touch points are numbered: [1] the checkpoint to resume from, [2] checkpoint reports (every rank, its own
files), [3] the final outcome (rank 0, into the run directory: ``outcome.json`` and OpenAI's ``results.csv``), [4] ``TorchTrainer.fit`` with Scaling/Run/Checkpoint/Failure configs.

**Restart.** Running the same command again for the same spec (the driver died: node lost, the service re-queued
the job) continues the job. Ray Train V2 restores it by itself: ``TrainController`` builds a ``CheckpointManager``
that loads ``checkpoint_manager_snapshot.json`` from ``{storage_path}/{name}`` (``_maybe_load_state_from_storage``)
and hands its latest checkpoint to the new workers (``before_init_train_context`` -> ``ray.train.get_checkpoint()``
in [1]); ``TorchTrainer.restore`` / ``resume_from_checkpoint`` are deprecated in V2 and raise. A checkpoint enters
the snapshot only once every rank has uploaded its files, so one that was being written when the driver died is
never resumed from (its step is trained again and its folder overwritten). ``run_job`` adds: a job whose
``result.json`` says succeeded / cancelled is not trained again (the stored result is returned); a job whose
training had finished (``outcome.json``) only records its result; an unreadable snapshot (driver killed while Ray
wrote it) is set aside, so the job restarts from step 0 instead of failing every attempt; a run directory holding
the same job id with a different spec is refused untouched. Events continue their numbering, with a ``state``
event ``running`` marked ``restart`` and the loop's "resumed from step N" message.

**Pause.** ``PAUSE`` in the run directory (written by the service, ``service.pausing``) stops the loop like
``CANCEL`` (``StopFiles``): a checkpoint of the current step, reported to Ray Train, then the ``cancelled``
outcome. ``run_job`` sees no ``CANCEL`` there (``paused_outcome``) and records a pause instead of a result
(``record_pause``: a ``paused`` state event, no ``result.json``); the service relaunches the same command on resume,
which continues from that checkpoint exactly as after a restart (the ``running`` event says "after a pause").

**Environment and errors.** Workers read tenant data: they get only ``WORKER_ENV`` from the driver and every other
platform setting or secret blanked (``worker_environment``). A failed job's ``error`` (``result.json``, shown to the
tenant) is ``public_error``: a user error's message, or the kind of an internal failure; the traceback goes to the
driver's log.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import ray
import ray.train
import ray.train.torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

from qwenvl_core.errors import QwenVLError
from qwenvl_core.runs import (
    EVENTS_DIR,
    OUTCOME_FILE,
    RESULT_FILE,
    RESULTS_CSV,
    SPEC_FILE,
    RunDir,
    checkpoint_name,
)
from qwenvl_core.scratch import ScratchDir
from qwenvl_core.secret_names import looks_secret
from qwenvl_core.specs import FineTuneJobSpec, JobState
from qwenvl_core.storage import read_uri
from qwenvl_core.training import EventProgress, Hooks, RunDirCancel, RunDirEvents
from qwenvl_core.training.results import results_csv

# Ray Train V2 starts a PreemptionWatcher actor per job (one more process, seconds of imports) that only logs node
# drains and answers ``ray.train.get_preemption_info()``, which the loop never reads: a drained node fails its workers
# and the job resumes from its last checkpoint (``FailureConfig``) either way. Off unless the operator set it.
PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
# What a training worker gets from its driver's environment, by exact name (``worker_environment``).
WORKER_ENV = frozenset({
    # storage access for the run directory (data, checkpoints, adapter)
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
    "AWS_REGION",
    # MLflow tracking: rank 0 logs with the jobs' login
    "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
    # caches and scratch space
    "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TORCH_EXTENSIONS_DIR", "QWENVL_WORK_DIR",
    # the test fault, and the local stack's process marker (``qwenvl down`` finds leftover processes by it)
    "QWENVL_FAULT", "QWENVL_STACK_ID",
})


class RayCheckpoints:
    """[2] Every rank reports its own checkpoint files; Ray merges them into one checkpoint directory."""

    def report(self, step: int, local_dir: Path, metrics: dict[str, float]) -> None:
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(local_dir)),
                         checkpoint_dir_name=checkpoint_name(step))  # servable: qwenvl_core.runs
        shutil.rmtree(local_dir, ignore_errors=True)


class FaultAtStep:
    """Test fault (``QWENVL_FAULT``): SIGKILL this worker after ``step`` once (a marker file makes it happen once).

    ``delay_s`` waits first, so that Ray's controller has registered the checkpoints reported before (it
    collects reports on its health-check poll, every 2 s by default; a worker killed within that window
    takes the not-yet-collected report with it and Ray resumes from the checkpoint before). With ``kill`` false
    the worker is only held at ``step`` for ``delay_s`` (marker written first), e.g. while a test kills the driver.
    """

    def __init__(self, step: int, marker: str, delay_s: float = 0.0, kill: bool = True) -> None:
        self.step, self.marker, self.delay_s, self.kill = step, Path(marker), delay_s, kill

    def __call__(self, step: int) -> None:
        if step != self.step or self.marker.exists():
            return
        if not self.kill:
            self.marker.write_text(str(os.getpid()))
            time.sleep(self.delay_s)
            return
        time.sleep(self.delay_s)
        self.marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)


class StopFiles:
    """What rank 0's ``RunDirCancel`` polls: ``CANCEL`` or ``PAUSE``. The loop stops the same way for both (a
    checkpoint of the current step, then the ``cancelled`` outcome); ``run_job`` tells a pause from a cancel by the
    run directory (``paused_outcome``)."""

    def __init__(self, run: RunDir) -> None:
        self.run = run

    def cancel_requested(self) -> bool:
        return self.run.cancel_requested() or self.run.pause_requested()


def paused_outcome(run: RunDir, final: dict[str, Any] | None) -> bool:
    """A ``cancelled`` outcome without ``CANCEL`` in the run directory: the run stopped for a pause (``StopFiles``),
    it is not over."""
    return final is not None and final.get("state") == JobState.CANCELLED.value and not run.cancel_requested()


def _hooks(spec: FineTuneJobSpec, rank: int, config: dict[str, Any]) -> tuple[Hooks, Any]:
    hooks = Hooks(checkpoints=RayCheckpoints())
    tracker = None
    if rank == 0:
        run = RunDir(spec.output_uri)
        events = RunDirEvents(run)
        hooks.events, hooks.cancel = events, RunDirCancel(StopFiles(run))  # type: ignore[arg-type]
        hooks.progress.append(EventProgress(events))
        if spec.tracking.tracking_uri:
            from workflows.tracking import MlflowTracker

            tracker = MlflowTracker(spec)
            hooks.start.append(tracker)
            hooks.metrics.append(tracker)
    fault = config.get("fault") or json.loads(os.environ.get("QWENVL_FAULT", "null"))
    if fault and fault["rank"] == rank:
        hooks.on_step.append(FaultAtStep(int(fault["step"]), fault["marker"], float(fault.get("delay_s", 0.0)),
                                         bool(fault.get("kill", True))))
    return hooks, tracker


def train_func(config: dict[str, Any]) -> None:
    """The per-worker function Ray Train runs (the loop is imported here: the driver never needs its imports)."""
    from qwenvl_core.training import Trainer

    spec = FineTuneJobSpec.model_validate(config["spec"])
    rank = ray.train.get_context().get_world_rank()
    hooks, tracker = _hooks(spec, rank, config)
    RunDir(spec.output_uri).write_json(f"workers/rank{rank}.json", {
        "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()})
    checkpoint = ray.train.get_checkpoint()  # [1] latest checkpoint after a restart, else None
    # node-local scratch (``qwenvl_core.scratch``): the folders of workers that were killed are swept on creation
    scratch = ScratchDir(f"train-{spec.job_id}-rank{rank}", os.environ.get("QWENVL_WORK_DIR", "/tmp"))
    work_dir = scratch.path
    # The GPU Ray assigned this worker (compute.gpus_per_worker > 0), else the CPU.
    device = ray.train.torch.get_device()
    try:
        try:
            if checkpoint is not None:
                with checkpoint.as_directory() as directory:
                    result = Trainer(spec, hooks, work_dir, device).run(resume_from=Path(directory))
            else:
                result = Trainer(spec, hooks, work_dir, device).run()
        except BaseException:
            if tracker is not None:  # the metrics queued since the last batch still reach MLflow (best effort:
                with contextlib.suppress(Exception):  # the training error is the one to report)
                    tracker.flush()
            raise
        if rank == 0:  # [3] the outcome goes to the run directory, which the driver reads
            run = RunDir(spec.output_uri)
            if result.adapter_dir is not None:
                run.upload_adapter(result.adapter_dir)
            run.store.put_bytes(run.key(RESULTS_CSV), results_csv(result.train_state).encode("utf-8"))
            version = tracker.finish(result.state, result.adapter_dir, result.train_state.losses) if tracker else None
            run.write_json(OUTCOME_FILE, {"state": result.state.value, "metrics": result.metrics,
                                          "summary": result.summary, "model_version": version,
                                          "mlflow_run_id": tracker.run_id if tracker else None})
    finally:
        scratch.cleanup()


def _storage(spec: FineTuneJobSpec) -> tuple[str, Any]:
    """Ray storage for checkpoints: ``{output_uri}/checkpoints/{job_id}/step_*`` on local disk or S3."""
    uri = spec.output_uri.rstrip("/") + "/checkpoints"
    parsed = urlparse(uri)
    if parsed.scheme != "s3":
        return str(Path(uri).resolve()), None
    import pyarrow.fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return uri, None
    ep = urlparse(endpoint)
    # credentials travel inside the filesystem object: Ray's controller does not get worker_runtime_env
    fs = pyarrow.fs.S3FileSystem(endpoint_override=ep.netloc, scheme=ep.scheme or "https",
                                 region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                                 access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
                                 secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"))
    return parsed.netloc + parsed.path, fs


def worker_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The env vars of Ray Train's ``worker_runtime_env``: the ``WORKER_ENV`` names ``environ`` has, and an empty
    value for every other platform setting (``QWENVL_*``) or secret-named variable (``looks_secret``) in it.

    A Ray worker process starts with its node's environment, so blanking is what keeps the service's secrets (admin
    key, database URL, MLflow admin password: on a node that also runs the API) out of the processes that read
    tenant data. Ray's own variables (``RAY_*``, e.g. the auth token every Ray process needs) are left to Ray.
    """
    env = {name: value for name, value in environ.items() if name in WORKER_ENV}
    for name in environ:
        if name not in env and not name.startswith("RAY_") and (name.startswith("QWENVL_") or looks_secret(name)):
            env[name] = ""
    return env


def build_trainer(spec: FineTuneJobSpec, fault: dict[str, Any] | None = None) -> TorchTrainer:
    """[4] The TorchTrainer of ``spec``."""
    c = spec.compute
    resources = {"CPU": c.cpus_per_worker, **({"GPU": c.gpus_per_worker} if c.gpus_per_worker else {})}
    path, fs = _storage(spec)
    run_config = RunConfig(name=spec.job_id, storage_path=path, storage_filesystem=fs,
                           checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
                           failure_config=FailureConfig(max_failures=c.max_failures),
                           worker_runtime_env={"env_vars": worker_environment(os.environ)})
    scaling = ScalingConfig(num_workers=c.num_workers, use_gpu=c.gpus_per_worker > 0,
                            resources_per_worker=resources, placement_strategy=c.placement_strategy)
    return TorchTrainer(train_func, train_loop_config={"spec": spec.model_dump(mode="json"), "fault": fault},
                        scaling_config=scaling, run_config=run_config)


FINAL_STATES = (JobState.SUCCEEDED.value, JobState.CANCELLED.value)  # a job in these is never trained again


def run_job(spec: FineTuneJobSpec, fault: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run ``spec`` on the connected Ray cluster; writes spec.json, events and result.json; returns the result.

    Run again for the same spec, it continues the job (see "Restart" in the module docstring).
    """
    run = RunDir(spec.output_uri)
    stored = run.read_json(SPEC_FILE)
    same_job = isinstance(stored, dict) and stored.get("job_id") == spec.job_id
    if same_job and not _same_spec(stored, spec):
        return {"job_id": spec.job_id, "state": JobState.FAILED.value,  # nothing of that run is touched
                "error": f"{run.uri}: holds job {spec.job_id} with a different spec; use a new output_uri or job_id"}
    previous = run.read_result() if same_job else None
    if previous is not None and previous.get("job_id") == spec.job_id and previous.get("state") in FINAL_STATES:
        return previous  # finished: never trained again
    events = RunDirEvents(run)
    restart = same_job and events.seq > 0  # an earlier attempt of this job wrote events
    run.write_json(SPEC_FILE, spec.model_dump(mode="json"))
    final = run.read_json(OUTCOME_FILE) if restart and previous is None else None  # trained, then the driver died
    if paused_outcome(run, final):
        final = None  # the driver died recording a pause: the run is not over, it trains on
    if restart:
        announce_restart(run, spec, events, retry_failed=previous is not None, trained=final is not None,
                         resumed=_last_state(run, events) == PAUSED)
    else:
        events.state(JobState.RUNNING, f"job {spec.job_id} started on Ray Train")
    try:
        if final is None:
            for stale in (OUTCOME_FILE, RESULT_FILE, RESULTS_CSV):
                if run.exists(stale):
                    run.store.delete(run.key(stale))
            os.environ.setdefault(PREEMPTION_WATCHER, "0")  # read at fit and passed to the controller by Ray Train
            build_trainer(spec, fault).fit()
            final = run.read_json(OUTCOME_FILE)
        if final is None:
            raise RuntimeError("training ended without an outcome")
        if paused_outcome(run, final):
            return record_pause(run, spec, final)
    except Exception as e:  # the job's failure is reported, not raised: the caller reads result.json
        traceback.print_exception(e)  # the whole story, for the operators: the driver's log (Ray job logs)
        result = {"job_id": spec.job_id, "state": JobState.FAILED.value, "error": public_error(e)}
        RunDirEvents(run).state(JobState.FAILED, f"job failed: {result['error']}")
        run.write_result(result)
        return result
    result = {"job_id": spec.job_id, **final}
    if final["state"] == JobState.SUCCEEDED.value:
        result["adapter_uri"] = run.uri_of("adapter")
    RunDirEvents(run).state(JobState(final["state"]), f"job {final['state']}")
    run.write_result(result)
    return result


PAUSED = "paused"  # the state event of a run stopped for a pause (not a JobState: the job is not over)


def record_pause(run: RunDir, spec: FineTuneJobSpec, final: dict[str, Any]) -> dict[str, Any]:
    """The run stopped for a pause, its checkpoint of the last step reported to Ray Train (which registers every
    report before ``fit`` returns): no ``result.json`` (the job is not over), ``outcome.json`` removed (a relaunch
    trains on), a ``paused`` state event. The service moves the job to ``paused`` once this driver has ended."""
    step = (final.get("summary") or {}).get("steps")
    run.store.delete(run.key(OUTCOME_FILE))
    RunDirEvents(run).emit("state", f"job {spec.job_id} paused at step {step}: its checkpoint of step {step} is "
                           "saved and a resume continues from it", {"state": PAUSED, "checkpoint_step": step})
    return {"job_id": spec.job_id, "state": PAUSED, "step": step}


def _last_state(run: RunDir, events: RunDirEvents) -> str | None:
    """The ``state`` of the run's last event when it is a state event (a relaunch after a pause finds ``paused``)."""
    last = run.read_json(f"{EVENTS_DIR}/{events.seq - 1:08d}.json") if events.seq > 0 else None
    return (last.get("data") or {}).get("state") if isinstance(last, dict) and last.get("type") == "state" else None


def _same_spec(stored: dict[str, Any], spec: FineTuneJobSpec) -> bool:
    try:
        return FineTuneJobSpec.model_validate(stored) == spec
    except ValueError:
        return False


def ray_snapshot_key(run: RunDir, spec: FineTuneJobSpec) -> str:
    """Ray Train's run snapshot (its registered checkpoints) under ``RunConfig(name=job_id, storage_path)``."""
    return run.key("checkpoints", spec.job_id, CHECKPOINT_MANAGER_SNAPSHOT_FILENAME)


def ray_resume_step(run: RunDir, spec: FineTuneJobSpec) -> int | None:
    """The step Ray Train will resume ``spec`` from: its snapshot's latest checkpoint (None: from step 0).

    Raises ``ValueError`` when the snapshot exists but Ray could not load it (not JSON, e.g. cut short by a
    killed driver, or naming a checkpoint folder that is gone).
    """
    raw = run.store.get_bytes(ray_snapshot_key(run, spec))
    if raw is None:
        return None
    try:
        doc = json.loads(raw.decode("utf-8"))
        names = [r["checkpoint_dir_name"] for r in doc["checkpoint_results"]]
        latest = doc["latest_checkpoint_result"] and doc["latest_checkpoint_result"]["checkpoint_dir_name"]
        step = int(latest.removeprefix("step_")) if latest else None
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"is unreadable ({type(e).__name__}: {e})") from e
    missing = [n for n in names if not run.store.list_keys(run.key("checkpoints", spec.job_id, n))]
    if missing or (latest and latest not in names):  # Ray's CheckpointManager._load_state would raise
        raise ValueError(f"names checkpoint folder(s) that are gone or unlisted: {missing or [latest]}")
    return step


def announce_restart(run: RunDir, spec: FineTuneJobSpec, events: RunDirEvents, retry_failed: bool,
                     trained: bool = False, resumed: bool = False) -> None:
    """The ``running`` state event of a relaunched job, naming the step it resumes from."""
    why = ("after a failed attempt" if retry_failed else "after a pause" if resumed else
           "after its driver ended without a result")
    if trained:
        events.state(JobState.RUNNING, f"job {spec.job_id} restarted {why}; its training had finished, "
                     "recording the result", restart=True, checkpoint_step=None)
        return
    key = ray_snapshot_key(run, spec)
    try:
        step = ray_resume_step(run, spec)
    except ValueError as e:  # Ray would refuse to start on it, on every attempt: set it aside, train from 0
        run.store.put_bytes(f"{key}.unusable-{time.time_ns()}", run.store.get_bytes(key) or b"")
        run.store.delete(key)
        where = run.uri_of("checkpoints", spec.job_id, CHECKPOINT_MANAGER_SNAPSHOT_FILENAME)
        events.emit("message", f"Ray Train's run snapshot {where} {e}; set aside, training starts from step 0",
                    level="warn")
        step = None
    where = f"resuming from the checkpoint of step {step}" if step else "no checkpoint yet, starting from step 0"
    events.state(JobState.RUNNING, f"job {spec.job_id} restarted on Ray Train {why}; {where}",
                 restart=True, checkpoint_step=step)


OUT_OF_MEMORY = ("training ran out of accelerator memory: lower micro_batch_size, the image resolution or the "
                 "sequence length, or train with more workers")


def public_error(error: BaseException) -> str:
    """What the job's owner is told (``result.json``'s ``error``, shown as ``job.error``): a user error's message
    (``QwenVLError``, also when it was raised inside a Ray Train worker), otherwise only the kind of failure, never
    a traceback or an internal path (``run_job`` prints the traceback to the driver's log for the operators)."""
    causes = list(_causes(error))
    for cause in causes:
        if isinstance(cause, QwenVLError):
            return f"{type(cause).__name__}: {cause}"[:4000]
        if type(cause).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (CUDA or another accelerator)
            return OUT_OF_MEMORY
    kind = next((type(c).__name__ for c in causes if not type(c).__module__.startswith("ray.")), "RayError")
    return (f"training failed with an internal error ({kind}); the platform's operators have the details in the "
            "job's logs")


def _causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and what it wraps: Ray Train's worker and controller failures (``worker_failures``,
    ``controller_failure``, the user exception inside ``UserExceptionWithTraceback``), a ``RayTaskError``'s
    ``cause``, Python's ``__cause__`` / ``__context__``; outermost first, each once."""
    queue, seen = [error], set()
    while queue:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        failures = getattr(current, "worker_failures", None)
        if isinstance(failures, dict):
            queue.extend(f for _, f in sorted(failures.items()) if isinstance(f, BaseException))
        for attr in ("_base_exc", "controller_failure", "cause", "__cause__", "__context__"):
            inner = getattr(current, attr, None)
            if isinstance(inner, BaseException):
                queue.append(inner)


def local_cluster_options(num_cpus: int | None = None) -> dict[str, object]:
    """``ray.init`` options of the cluster a run starts when it finds none: with its dashboard, on the loopback
    interface only (behind Ray's token authentication), because Ray Train's placement-group cleaner watches the run
    through the state API the dashboard serves; without it, the cleaner logs "Failed to query Ray Train Controller
    actor state" every second of the run into the user's terminal (measured: 2.4 s more to start)."""
    return {"num_cpus": num_cpus, "include_dashboard": True, "dashboard_host": "127.0.0.1"}


def connect(num_cpus: int | None = None) -> None:
    """Join ``RAY_ADDRESS`` or a running local cluster; otherwise start a local one (``local_cluster_options``)."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return
    try:
        ray.init(address="auto")
    except ConnectionError:
        ray.init(**local_cluster_options(num_cpus))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflows.finetune", description=__doc__.split("\n")[0])
    parser.add_argument("--spec", required=True, help="FineTuneJobSpec as JSON: a local path or an s3:// URI")
    args = parser.parse_args(argv)
    spec = FineTuneJobSpec.model_validate_json(read_uri(args.spec))
    connect()
    result = run_job(spec)
    print(json.dumps({k: result.get(k) for k in ("job_id", "state", "error", "adapter_uri")}))
    return 1 if result["state"] == JobState.FAILED.value else 0


if __name__ == "__main__":
    sys.exit(main())
