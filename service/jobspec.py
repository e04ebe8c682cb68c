"""From an API job request to the training contract: resolved hyperparameters, extensions and the
``FineTuneJobSpec`` the workflow runs. Invalid combinations surface as 400s naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from qwenvl_core.errors import ConfigError
from qwenvl_core.models import pixel_budget
from qwenvl_core.specs import FineTuneJobSpec
from service.errors import InvalidRequest
from service.schemas import JobCreate

_EXTENSIONS = ("lora", "quantization", "compute", "evaluation", "checkpoint", "max_steps", "micro_batch_size",
               "min_pixels", "max_pixels")
# extensions that are training hyperparameters
_HYPERPARAMETER_EXTENSIONS = ("max_steps", "micro_batch_size", "min_pixels", "max_pixels")


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
               tracking_uri: str | None = None, tracking: dict[str, Any] | None = None) -> FineTuneJobSpec:
    """The job's ``FineTuneJobSpec``; ``InvalidRequest`` (field named) when the combination is invalid.

    With ``tracking_uri`` (the platform's MLflow server) the job logs into its tenant's experiment; ``tracking``
    adds the other ``TrackingSpec`` fields (``service.integrations.job_tracking``).
    """
    hp = dict(hyperparameters) | {k: ext[k] for k in _HYPERPARAMETER_EXTENSIONS if k in ext}
    doc: dict[str, Any] = {
        "job_id": job_id, "tenant_id": tenant_id, "base_model": base_model_path, "train_file": train_uri,
        "validation_file": validation_uri, "output_uri": output_uri, "seed": seed, "hyperparameters": hp,
        **{k: v for k, v in ext.items() if k not in _HYPERPARAMETER_EXTENSIONS},
    }
    if tracking_uri:
        doc["tracking"] = {"tracking_uri": tracking_uri, **(tracking or {})}
    try:
        return FineTuneJobSpec.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        if len(first["loc"]) == 2 and first["loc"][0] == "hyperparameters" and first["loc"][1] in ext:
            field = str(first["loc"][1])  # a top-level extension of the request
        raise InvalidRequest(f"{field}: {first['msg']}", param=field, code="invalid_hyperparameters") from None


def check_pixel_options(base_path: str, model: str, min_pixels: int | None, max_pixels: int | None) -> None:
    """400 naming ``min_pixels`` / ``max_pixels`` when the base model cannot take them, decided from its directory
    (``qwenvl_core.models.pixel_budget``, the rule the job's processor applies): a family with a fixed image size
    (Qwen-VL v1) or a budget its processor cannot honour. A base model the control plane cannot read (a storage
    URI) is left to the job, whose processor refuses the same way."""
    options = pixel_budget.ProcessorOptions(min_pixels=min_pixels, max_pixels=max_pixels)
    if not options.set_fields() or not Path(base_path).is_dir():
        return
    try:
        pixel_budget.check_pixel_options(base_path, options, f"model {model!r}")
    except pixel_budget.PixelOptionsError as exc:
        raise InvalidRequest(str(exc), param=exc.field, code="unsupported_pixel_options") from None
    except ConfigError:
        return  # a broken preprocessor_config.json is the operator's: the job reports it
