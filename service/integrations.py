"""A fine-tuning job's ``integrations``: what is supported, its validation, and what it does to the job's MLflow run.

OpenAI's jobs take ``integrations: [{"type": "wandb", "wandb": {"project", "name", "entity", "tags"}}]``. Every
job here is tracked in the platform's own MLflow server, so the integration that can work is ``mlflow``, shaped
after OpenAI's object:

    {"type": "mlflow", "mlflow": {"experiment_name": "vision-sweep", "run_name": "lr-1e-4", "tags": {"team": "cv"}}}

- ``experiment_name``: an experiment of the tenant's own namespace, ``<tenant>/<experiment_name>`` (default
  ``default``, the experiment made with the tenant). It has no ``/``, so it can never name another tenant's
  experiment; the API creates it on job creation (``service.mlflow_tenants.provision_experiment``), tagged as a
  model-training experiment, and grants the tenant's read-only MLflow user ``READ`` on it.
- ``run_name``: the run's name (default: the job id).
- ``tags``: run tags (keys not in the platform's ``mlflow.`` / ``qwenvl.`` namespaces).

Any other type (``wandb`` included) answers 400 naming ``integrations[i].type`` and what is supported; so does
``mlflow`` on a deployment without an MLflow server. ``parse`` validates and returns what the job stores (and shows);
``job_tracking`` turns a stored job into its spec's ``tracking`` fields: the integration's experiment, run name and
tags, the lineage tags (``LINEAGE_TAGS``) and the training / validation files as dataset inputs.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy.orm import Session

from service.errors import InvalidRequest
from service.models import File, Job
from service.settings import Settings

SUPPORTED = ("mlflow",)
RESERVED_TAG_PREFIXES = ("mlflow.", "qwenvl.")  # MLflow's system tags and the platform's lineage tags
RESERVED_TAGS = frozenset({"tenant"})
MAX_TAGS = 16
# Run tags the platform writes (besides ``qwenvl.job_id`` and ``tenant``, which the tracker adds).
LINEAGE_TAGS = ("qwenvl.base_model", "qwenvl.parent_model", "qwenvl.training_file", "qwenvl.validation_file")
NOTE_TAG = "mlflow.note.content"  # the run's description on MLflow's run page
_TYPE_HELP = ('supported: "mlflow" (this platform\'s MLflow server, where every job is tracked): {"type": "mlflow", '
              '"mlflow": {"experiment_name": "...", "run_name": "...", "tags": {"key": "value"}}}')

_TAG_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\- /]{0,63}")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class MlflowIntegration(BaseModel):
    """The ``mlflow`` object of an ``mlflow`` integration."""

    model_config = ConfigDict(extra="forbid")

    experiment_name: str = Field(
        "default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="Experiment in your namespace (<tenant>/<experiment_name>): 1-64 of A-Z a-z 0-9 . _ -, "
        "starting with a letter or digit.")
    run_name: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$",
                                 description="Run name, 1-128 printable characters (default: the job id).")
    tags: dict[str, str] = Field(default_factory=dict, description=f"At most {MAX_TAGS} run tags.")

    @field_validator("tags")
    @classmethod
    def _tags(cls, tags: dict[str, str]) -> dict[str, str]:
        if len(tags) > MAX_TAGS:
            raise ValueError(f"at most {MAX_TAGS} tags, got {len(tags)}")
        for key, value in tags.items():
            if not _TAG_KEY.fullmatch(key):
                raise ValueError(f"tag key {key[:80]!r}: 1-64 of A-Z a-z 0-9 _ . - / and space, starting with a "
                                 "letter, digit or _")
            if key.startswith(RESERVED_TAG_PREFIXES) or key in RESERVED_TAGS:
                raise ValueError(f"tag key {key!r} is reserved for the platform (mlflow.*, qwenvl.*, tenant)")
            if len(value) > 512 or _CONTROL.search(value):
                raise ValueError(f"tag {key!r}: values are at most 512 printable characters")
        return tags


def parse(raw: list[dict[str, Any]] | None, settings: Settings) -> list[dict[str, Any]] | None:
    """The integrations to store (each ``{"type": "mlflow", "mlflow": {...}}`` with defaults filled), or a 400
    naming the field."""
    if raw is None:
        return None
    stored: list[dict[str, Any]] = []
    for i, item in enumerate(raw):
        where = f"integrations[{i}]"
        kind = item.get("type")
        if not isinstance(kind, str):
            raise InvalidRequest(f"{where}.type is required: a string; {_TYPE_HELP}", param=f"{where}.type",
                                 code="invalid_integration")
        if kind not in SUPPORTED:
            raise InvalidRequest(f"{where}.type: integration type {kind[:64]!r} is not supported; {_TYPE_HELP}",
                                 param=f"{where}.type", code="unsupported_integration")
        if settings.mlflow_tracking_uri is None:
            raise InvalidRequest(f"{where}.type: 'mlflow' needs the platform's MLflow server, and this deployment "
                                 "runs none (QWENVL_MLFLOW_TRACKING_URI is not set)", param=f"{where}.type",
                                 code="integration_unavailable")
        if any(s["type"] == kind for s in stored):
            raise InvalidRequest(f"{where}.type: at most one {kind!r} integration per job", param=f"{where}.type",
                                 code="invalid_integration")
        for key in item:
            if key not in ("type", kind):
                raise InvalidRequest(f"{where}.{key}: unknown field; an {kind!r} integration has 'type' and "
                                     f"{kind!r}", param=f"{where}.{key}", code="invalid_integration")
        options = item.get(kind)
        options = {} if options is None else options
        if not isinstance(options, dict):
            raise InvalidRequest(f"{where}.{kind} must be an object", param=f"{where}.{kind}",
                                 code="invalid_integration")
        try:
            parsed = MlflowIntegration.model_validate(options)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join([f"{where}.{kind}", *(str(p) for p in first["loc"])])
            raise InvalidRequest(f"{field}: {first['msg']}", param=field, code="invalid_integration") from None
        stored.append({"type": kind, kind: parsed.model_dump()})
    return stored


def mlflow_options(integrations: list[dict[str, Any]] | None) -> MlflowIntegration | None:
    """The stored ``mlflow`` integration of a job, if any (one stored unchecked, before ``parse`` existed, and
    invalid now counts as none: the job is tracked in the tenant's default experiment)."""
    for item in integrations or []:
        if isinstance(item, dict) and item.get("type") == "mlflow":
            try:
                return MlflowIntegration.model_validate(item.get("mlflow") or {})
            except ValidationError:
                return None
    return None


def job_tracking(s: Session, settings: Settings, job: Job, files: list[tuple[str, File, str]]) -> dict[str, Any]:
    """The ``TrackingSpec`` fields of ``job`` besides ``tracking_uri``. ``files``: (context, row, storage URI) of its
    training and validation files, which become the run's dataset inputs."""
    options = mlflow_options(job.request.get("integrations")) or MlflowIntegration()
    parent = (job.request or {}).get("parent") if job.parent_model else None  # continued training (lineage)
    tags = dict(options.tags)
    tags["qwenvl.base_model"] = job.model  # the base model the job trains (also when it continues a model)
    if parent is not None:
        tags["qwenvl.parent_model"] = job.parent_model
        tags["qwenvl.parent_job_id"] = parent["job_id"]
        if parent.get("step") is not None:
            tags["qwenvl.parent_checkpoint_step"] = str(parent["step"])
    for context, row, _uri in files:
        tags[f"qwenvl.{context}_file"] = row.id
    described = " and ".join(f"{context} file `{row.id}` ({row.filename})" for context, row, _ in files)
    tags[NOTE_TAG] = (f"Fine-tuning job `{job.id}`: `{tags['qwenvl.base_model']}`"
                      + (f" continued from `{job.parent_model}`" if parent is not None else "") + f" on {described}.")
    return {"experiment": options.experiment_name, "run_name": options.run_name, "tags": tags,
            "datasets": [{"context": context, "name": row.id, "sha256": row.sha256, "uri": uri}
                         for context, row, uri in files]}
