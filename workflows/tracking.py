"""MLflow tracking of a fine-tuning job (rank 0 only): one experiment per tenant, one run per job.

``MlflowTracker`` is the training loop's ``StartSink`` + ``MetricSink``: it starts (or, after a restart,
re-attaches to) the job's run (tag ``qwenvl.job_id``; named ``tracking.run_name``, default the job id) in an
experiment marked as a model-training experiment (``EXPERIMENT_KIND_TAG``; MLflow 3.17.2's UI picks its view
from its own switch, see ``service.mlflow_tenants``), with ``tracking.tags`` (the service's lineage tags: base model, parent model, file ids, a description);
logs the training / validation files as dataset inputs (name, digest = the file's sha256, source = its storage
URI; ``tracking.datasets``, else the spec's files hashed here), every parameter, per-step training metrics,
evaluation metrics and system metrics; ``finish`` logs the adapter (PEFT files + meta.json), the resolved config,
the dataset validation reports and a loss-curve plot as artifacts, registers the adapter as a new version of the
tenant's model with tags (job id, base model; a continued job's parent model and starting adapter) and an alias,
and ends the run.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from qwenvl_core.specs import (
    EXPERIMENT_KIND_MODEL_TRAINING,
    EXPERIMENT_KIND_TAG,
    FineTuneJobSpec,
    JobState,
    TrackedDataset,
    tenant_experiment_name,
)
from qwenvl_core.storage import iter_chunks, open_store

JOB_TAG = "qwenvl.job_id"
PARENT_MODEL_TAG = "qwenvl.parent_model"  # a continued job's lineage tag (service.integrations.job_tracking)
ALIAS = "latest-finetune"
MAX_PARAM_CHARS = 6000
FLUSH_EVERY_S = 2.0  # metrics are sent in batches at most this often (one request per step slowed short steps 5x)
MAX_BATCH_METRICS = 1000  # MLflow's log_batch limit
DIGEST_CHARS = 32  # a dataset digest is the file's sha256, cut to MLflow's limit (36 characters)


def experiment_name(spec: FineTuneJobSpec) -> str:
    """One experiment per tenant (``qwenvl_core.specs.tenant_experiment_name``)."""
    return tenant_experiment_name(spec.tenant_id, spec.tracking.experiment)


def registered_model_name(spec: FineTuneJobSpec) -> str:
    return spec.tracking.registered_model or f"{spec.tenant_id}-qwen-vl-adapters"


class MlflowTracker:
    """Rank-0 MLflow logging for one job (see the module docstring)."""

    def __init__(self, spec: FineTuneJobSpec, system_metrics: bool = True) -> None:
        if spec.tracking.tracking_uri is None:
            raise ValueError("tracking.tracking_uri is not set")
        self.spec, self.system_metrics = spec, system_metrics
        mlflow.set_tracking_uri(spec.tracking.tracking_uri)
        if system_metrics:
            mlflow.set_system_metrics_sampling_interval(1)  # jobs of seconds still get samples (default 10 s)
        self.client = MlflowClient(spec.tracking.tracking_uri)
        self.run_id: str | None = None
        self._pending: list[Metric] = []
        self._flushed = time.monotonic()

    def _experiment_id(self) -> str:
        """The experiment's id (created when missing), marked as a model-training experiment."""
        name = experiment_name(self.spec)
        found = self.client.get_experiment_by_name(name)
        if found is None:
            return self.client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND_MODEL_TRAINING})
        if found.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND_MODEL_TRAINING:
            self.client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND_MODEL_TRAINING)
        return found.experiment_id

    def _existing_run(self, experiment_id: str) -> str | None:
        runs = self.client.search_runs([experiment_id], f"tags.`{JOB_TAG}` = '{self.spec.job_id}'", max_results=1)
        return runs[0].info.run_id if runs else None

    def on_start(self, info: dict[str, Any]) -> None:
        experiment_id = self._experiment_id()
        self.run_id = self._existing_run(experiment_id)
        tags = {JOB_TAG: self.spec.job_id, "tenant": self.spec.tenant_id, **self.spec.tracking.tags}
        if self.run_id is not None:  # a restarted job re-attaches to its run
            run = mlflow.start_run(run_id=self.run_id, log_system_metrics=self.system_metrics)
        else:
            run = mlflow.start_run(experiment_id=experiment_id, run_name=self.spec.tracking.run_name or
                                   self.spec.job_id, tags=tags, log_system_metrics=self.system_metrics)
        resumed = self.run_id is not None
        self.run_id = run.info.run_id
        if not resumed:
            datasets = self.spec.tracking.datasets
            if datasets is None:
                datasets = local_datasets(self.spec)
            for dataset in datasets:
                mlflow.log_input(mlflow_dataset(dataset), context=dataset.context)
            params = {k: _param(v) for k, v in info["params"].items()}
            mlflow.log_params(params)
            mlflow.log_dict(info["config"], "config/resolved_config.json")
            for split, report in info["data_reports"].items():
                mlflow.log_dict(report, f"data/{split}_validation_report.json")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue ``metrics`` at ``step``; they are sent together every ``FLUSH_EVERY_S`` seconds and by ``finish``."""
        now_ms = int(time.time() * 1000)
        self._pending += [Metric(k.replace("/", "_"), float(v), now_ms, step) for k, v in metrics.items()]
        if time.monotonic() - self._flushed >= FLUSH_EVERY_S or len(self._pending) >= MAX_BATCH_METRICS:
            self.flush()

    def flush(self) -> None:
        """Send the queued metrics (in ``log_batch`` requests of at most ``MAX_BATCH_METRICS``)."""
        if self._pending and self.run_id is None:
            raise RuntimeError("metrics logged before the MLflow run started (on_start)")
        pending, self._pending = self._pending, []
        for i in range(0, len(pending), MAX_BATCH_METRICS):
            self.client.log_batch(self.run_id, metrics=pending[i:i + MAX_BATCH_METRICS])
        self._flushed = time.monotonic()

    def finish(self, state: JobState, adapter_dir: Path | None, losses: list[tuple[int, float]]) -> str | None:
        """Artifacts, registry version (when an adapter exists); ends the run. Returns the model version."""
        version = None
        self.flush()
        if losses:
            mlflow.log_figure(_loss_figure(losses), "plots/loss_curve.png")
        if adapter_dir is not None:
            mlflow.log_artifacts(str(adapter_dir), "adapter")
            version = self._register()
        mlflow.end_run("FINISHED" if state is not JobState.FAILED else "FAILED")
        return version

    def _register(self) -> str:
        name = registered_model_name(self.spec)
        try:
            self.client.get_registered_model(name)
        except mlflow.exceptions.MlflowException:
            self.client.create_registered_model(name, tags={"tenant": self.spec.tenant_id})
        mv = self.client.create_model_version(name, f"runs:/{self.run_id}/adapter", run_id=self.run_id,
                                              tags={"job_id": self.spec.job_id,
                                                    "base_model": str(Path(self.spec.base_model).resolve()),
                                                    "quantization": self.spec.quantization.value,
                                                    **self._lineage()})
        self.client.set_registered_model_alias(name, ALIAS, mv.version)
        return str(mv.version)

    def _lineage(self) -> dict[str, str]:
        """Continued training: the parent model (the service's lineage tag) and the adapter the run started from."""
        parent = self.spec.tracking.tags.get(PARENT_MODEL_TAG)
        return ({"parent_model": parent} if parent else {}) | (
            {"init_adapter": self.spec.init_adapter} if self.spec.init_adapter else {})

    def fail(self) -> None:
        if mlflow.active_run() is not None:
            mlflow.end_run("FAILED")


def mlflow_dataset(dataset: TrackedDataset) -> MetaDataset:
    """The MLflow dataset of a data file: its name, its sha256 as digest, its storage URI as source."""
    with warnings.catch_warnings():  # a local path matches MLflow's local source under two schemes; same class
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(dataset.uri)
    return MetaDataset(source, name=dataset.name, digest=dataset.sha256[:DIGEST_CHARS])


def local_datasets(spec: FineTuneJobSpec) -> list[TrackedDataset]:
    """Dataset inputs of a spec that lists none (``qwenvl finetune``): its files, named by their basename, hashed."""
    files = [("training", spec.train_file), *([("validation", spec.validation_file)] if spec.validation_file else [])]
    return [TrackedDataset(context=context, name=uri.rstrip("/").rsplit("/", 1)[-1], sha256=_sha256(uri), uri=uri)
            for context, uri in files]


def _sha256(uri: str) -> str:
    digest = hashlib.sha256()
    if uri.startswith("s3://"):
        store, key = open_store(uri)
        stream = store.open_read(key)
    else:
        stream = Path(uri).open("rb")
    with stream:
        for chunk in iter_chunks(stream):
            digest.update(chunk)
    return digest.hexdigest()


def _param(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:MAX_PARAM_CHARS]


def _loss_figure(losses: list[tuple[int, float]]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s for s, _ in losses], [v for _, v in losses], label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    plt.close(fig)
    return fig
