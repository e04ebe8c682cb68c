"""From an API job request to the training contract: hyperparameters (``auto`` resolved by
``qwenvl_core.autotune``), extensions and the ``FineTuneJobSpec`` the workflow runs. Invalid combinations surface as
400s naming the field.

``auto``: at create time the LoRA fields a request leaves unset come from the base model's training defaults (they
do not depend on the data), and the job keeps ``"auto"`` for ``n_epochs``, ``batch_size``,
``learning_rate_multiplier`` and (unset) ``micro_batch_size``; once its files are validated the scheduler resolves
them from the training file's statistics (``resolve_request``) and records the values on the job. A spec built
while a value is still ``auto`` uses the data-free resolution (the create-time checks, caps included).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from qwenvl_core import autotune
from qwenvl_core.errors import ConfigError
from qwenvl_core.models import pixel_budget
from qwenvl_core.specs import DPO_BETA_DEFAULT, FineTuneJobSpec
from service.errors import InvalidRequest, Unavailable
from service.schemas import JobCreate

_EXTENSIONS = ("lora", "quantization", "compute", "evaluation", "checkpoint", "max_steps", "micro_batch_size",
               "min_pixels", "max_pixels", "method")
# extensions that are training hyperparameters
_HYPERPARAMETER_EXTENSIONS = ("max_steps", "micro_batch_size", "min_pixels", "max_pixels")


_AUTO_FIELDS = ("n_epochs", "batch_size", "learning_rate_multiplier")


def resolved_hyperparameters(body: JobCreate) -> dict[str, Any]:
    """OpenAI's three hyperparameters as the job shows them at creation: numbers as given, ``"auto"`` for the ones
    the scheduler resolves once the files are validated (``resolve_request``)."""
    hp = body.effective_hyperparameters()
    lrm = hp.learning_rate_multiplier
    return {"n_epochs": hp.n_epochs, "batch_size": hp.batch_size,
            "learning_rate_multiplier": lrm if lrm == "auto" else float(lrm)}


def base_defaults(base_path: str, model: str) -> autotune.TrainingDefaults:
    """The base model's training defaults (``qwenvl_core.autotune.base_defaults``); 503 when its
    ``training_defaults.json`` is broken (the operator's file, not the request)."""
    try:
        return autotune.base_defaults(base_path)[0]
    except ConfigError as exc:
        raise Unavailable(f"model {model!r}: its training defaults cannot be read ({exc}); tell the operator",
                          param="model", code="model_misconfigured") from None


def extensions(body: JobCreate, defaults: autotune.TrainingDefaults = autotune.PLATFORM_DEFAULTS,
               caps: autotune.Caps = autotune.NO_CAPS, parent_lora: dict[str, Any] | None = None
               ) -> tuple[dict[str, Any], str | None]:
    """The request's extensions, with the LoRA fields it left unset (or ``r: "auto"``) from the base model's
    ``defaults`` (the job shows the LoRA it trains), and the event saying so (None when nothing was taken).
    Continued training (``parent_lora``: the parent's LoRA configuration): the LoRA is the parent's
    (``inherit_lora``)."""
    dumped = body.model_dump(mode="json", include=set(_EXTENSIONS) - {"method"}, exclude_none=True)
    dumped |= training_method(body)  # DPO: the spec's method (beta resolved); SFT stores none (the default)
    if dumped.get("micro_batch_size") == "auto":
        del dumped["micro_batch_size"]  # resolved with the other auto values once the files are validated
    given = body.model_dump(mode="json", include={"lora"}, exclude_unset=True).get("lora") or {}
    if parent_lora is not None:
        dumped["lora"] = inherit_lora(given, parent_lora)
        return {k: dumped[k] for k in _EXTENSIONS if k in dumped}, None
    dumped["lora"], reasons = autotune.resolve_lora(given, defaults, caps)
    event = ("auto: " + ", ".join(f"{k} {dumped['lora'][k.removeprefix('lora.')]} ({why})"
                                  for k, why in reasons.items())) if reasons else None
    return {k: dumped[k] for k in _EXTENSIONS if k in dumped}, event


# LoRA fields a continued job may set (they do not shape the adapter's tensors or what they compute)
_FREE_LORA_FIELDS = ("dropout",)


def inherit_lora(given: dict[str, Any], parent: dict[str, Any]) -> dict[str, Any]:
    """A continued job's LoRA: the parent's configuration (rank, alpha, targets, train_adapter, vision_lora, ...: the
    adapter's tensors and their scale must stay the parent's), ``dropout`` as the request gives it. A request value
    that differs from the parent's is a 400 naming ``lora.<field>`` (``r: "auto"`` counts as unset)."""
    lora = dict(parent)
    for field, value in given.items():
        if field in _FREE_LORA_FIELDS:
            lora[field] = value
        elif not (field == "r" and value == "auto") and not _same(value, parent.get(field)):
            raise InvalidRequest(f"lora.{field}: {value!r} differs from {parent.get(field)!r}, the value of the model "
                                 "being continued; continued training keeps its parent's LoRA configuration (leave "
                                 f"lora.{field} unset)", param=f"lora.{field}", code="lora_conflicts_with_parent")
    return lora


def _same(a: Any, b: Any) -> bool:
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return bool(a == b)


def parent_adapter(request: dict[str, Any]) -> str | None:
    """The adapter a stored job request continues from (``request.parent``, ``service.lineage.parent_record``)."""
    return (request.get("parent") or {}).get("adapter_uri")


def training_method(body: JobCreate) -> dict[str, Any]:
    """``{"method": <the spec's MethodSpec>}`` for a DPO request (``beta: "auto"`` -> the default), else ``{}``."""
    if body.method is None or body.method.type != "dpo":
        return {}
    beta = getattr(body.method.hyperparameters(), "beta", "auto")
    return {"method": {"type": "dpo", "dpo": {"beta": DPO_BETA_DEFAULT if beta == "auto" else float(beta)}}}


def check_data_format(body: JobCreate, report: dict[str, Any] | None, param: str, file_id: str) -> None:
    """400 naming ``param`` when a validated file's format does not fit the method: DPO trains on preference pairs,
    SFT on conversations (a file still being validated is checked by the job, which fails saying the same)."""
    fmt = (report or {}).get("format")
    if fmt is None:
        return
    dpo = body.method is not None and body.method.type == "dpo"
    if dpo != (fmt == "preference"):
        need = ("method 'dpo' needs preference pairs (input, preferred_output, non_preferred_output per line)"
                if dpo else "preference pairs train with method {\"type\": \"dpo\"}")
        raise InvalidRequest(f"{param} {file_id} is in the {fmt} format; {need}", param=param,
                             code="invalid_file_format")


def requested(hyperparameters: dict[str, Any], ext: dict[str, Any]) -> autotune.Requested:
    """What a stored request asks for (None: ``auto``)."""
    def given(value: Any) -> Any:
        return None if value == "auto" else value

    return autotune.Requested(
        n_epochs=given(hyperparameters.get("n_epochs", "auto")),
        batch_size=given(hyperparameters.get("batch_size", "auto")),
        learning_rate_multiplier=given(hyperparameters.get("learning_rate_multiplier", "auto")),
        micro_batch_size=ext.get("micro_batch_size"), max_steps=ext.get("max_steps"),
        workers=int((ext.get("compute") or {}).get("num_workers", 1)))


def _with_values(hyperparameters: dict[str, Any], ext: dict[str, Any], resolution: autotune.Resolution
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    values = resolution.values
    return ({k: values[k] for k in _AUTO_FIELDS} | {k: v for k, v in hyperparameters.items() if k not in _AUTO_FIELDS},
            {**ext, "micro_batch_size": values["micro_batch_size"]})


def has_auto(hyperparameters: dict[str, Any], ext: dict[str, Any]) -> bool:
    return any(hyperparameters.get(k) == "auto" for k in _AUTO_FIELDS) or "micro_batch_size" not in ext


def resolve_request(request: dict[str, Any], base_path: str, train_stats: dict[str, Any] | None,
                    caps: autotune.Caps) -> tuple[dict[str, Any], autotune.Resolution | None]:
    """The stored job request with its ``auto`` values decided from the base model's defaults and the training
    file's validation statistics (``train_stats``: its report's ``stats``; None when the file was stored without a
    report: then the data-free values); (request, resolution), resolution None when nothing was ``auto``.
    ``ConfigError`` when the base model's training defaults are broken."""
    hp, ext = request["hyperparameters"], request.get("extensions", {})
    if not has_auto(hp, ext):
        return request, None
    defaults = autotune.base_defaults(base_path)[0]
    data = autotune.DataStats.from_report(train_stats, autotune.image_tokens(base_path, ext.get("max_pixels")))
    resolution = autotune.resolve(requested(hp, ext), defaults, data, caps)
    new_hp, new_ext = _with_values(hp, ext, resolution)
    return {**request, "hyperparameters": new_hp, "extensions": new_ext}, resolution


def build_spec(*, job_id: str, tenant_id: str, base_model_path: str, train_uri: str, validation_uri: str | None,
               output_uri: str, seed: int, hyperparameters: dict[str, Any], ext: dict[str, Any],
               tracking_uri: str | None = None, tracking: dict[str, Any] | None = None,
               caps: autotune.Caps = autotune.NO_CAPS, init_adapter: str | None = None) -> FineTuneJobSpec:
    """The job's ``FineTuneJobSpec``; ``InvalidRequest`` (field named) when the combination is invalid.

    Values still ``auto`` take their data-free resolution (the base model's defaults within ``caps``). With
    ``tracking_uri`` (the platform's MLflow server) the job logs into its tenant's experiment; ``tracking`` adds the
    other ``TrackingSpec`` fields (``service.integrations.job_tracking``). ``init_adapter``: the parent adapter of a
    continued job (``parent_adapter``).
    """
    if has_auto(hyperparameters, ext):
        hyperparameters, ext = _with_values(hyperparameters, ext, autotune.resolve(
            requested(hyperparameters, ext), base_defaults(base_model_path, base_model_path), None, caps))
    hp = dict(hyperparameters) | {k: ext[k] for k in _HYPERPARAMETER_EXTENSIONS if k in ext}
    doc: dict[str, Any] = {
        "job_id": job_id, "tenant_id": tenant_id, "base_model": base_model_path, "train_file": train_uri,
        "validation_file": validation_uri, "output_uri": output_uri, "seed": seed, "hyperparameters": hp,
        **{k: v for k, v in ext.items() if k not in _HYPERPARAMETER_EXTENSIONS},
    }
    if init_adapter:
        doc["init_adapter"] = init_adapter
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
