"""From an API job request to the training contract: resolved hyperparameters, extensions and the
``FineTuneJobSpec`` the workflow runs. Invalid combinations surface as 400s naming the field.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from qwenvl_core.specs import FineTuneJobSpec
from service.errors import InvalidRequest
from service.schemas import JobCreate

_EXTENSIONS = ("lora", "quantization", "compute", "evaluation", "checkpoint", "max_steps", "micro_batch_size")
_HYPERPARAMETER_EXTENSIONS = ("max_steps", "micro_batch_size")  # extensions that are training hyperparameters


def resolved_hyperparameters(body: JobCreate) -> dict[str, Any]:
    """OpenAI's three hyperparameters with ``auto`` replaced by the values used (the job shows these)."""
    hp = body.effective_hyperparameters()
    return {
        "n_epochs": 1 if hp.n_epochs == "auto" else hp.n_epochs,
        "batch_size": 1 if hp.batch_size == "auto" else hp.batch_size,
        "learning_rate_multiplier": 1.0 if hp.learning_rate_multiplier == "auto" else float(hp.learning_rate_multiplier),
    }


def extensions(body: JobCreate) -> dict[str, Any]:
    dumped = body.model_dump(mode="json", include=set(_EXTENSIONS), exclude_none=True)
    return {k: dumped[k] for k in _EXTENSIONS if k in dumped}


def build_spec(*, job_id: str, tenant_id: str, base_model_path: str, train_uri: str, validation_uri: str | None,
               output_uri: str, seed: int, hyperparameters: dict[str, Any], ext: dict[str, Any],
               tracking_uri: str | None = None) -> FineTuneJobSpec:
    """The job's ``FineTuneJobSpec``; ``InvalidRequest`` (field named) when the combination is invalid.

    With ``tracking_uri`` (the platform's MLflow server) the job logs into its tenant's experiment.
    """
    hp = dict(hyperparameters) | {k: ext[k] for k in _HYPERPARAMETER_EXTENSIONS if k in ext}
    doc: dict[str, Any] = {
        "job_id": job_id, "tenant_id": tenant_id, "base_model": base_model_path, "train_file": train_uri,
        "validation_file": validation_uri, "output_uri": output_uri, "seed": seed, "hyperparameters": hp,
        **{k: v for k, v in ext.items() if k not in _HYPERPARAMETER_EXTENSIONS},
    }
    if tracking_uri:
        doc["tracking"] = {"tracking_uri": tracking_uri}
    try:
        return FineTuneJobSpec.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidRequest(f"{field}: {first['msg']}", param=field, code="invalid_hyperparameters") from None
