"""Request and response schemas, one family per resource, shaped like OpenAI's fine-tuning API.

Table models never leave the API: routes convert rows with the ``*_public`` helpers at the bottom.
Extensions beyond OpenAI (LoRA, quantization, compute, evaluation, max_steps, micro_batch_size, estimates,
validation reports, progress) are additional optional fields, so unchanged OpenAI clients work.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from qwenvl_core.specs import (
    DPO_BETA_DEFAULT,
    DPO_BETA_MAX,
    DPO_BETA_MIN,
    MAX_PIXELS_BOUND,
    MIN_PIXELS_BOUND,
    CheckpointSpec,
    ComputeSpec,
    EvalSpec,
    LoraSpec,
    Quantization,
)
from service.caps import TenantLimits, effective_caps
from service.lineage import checkpoint_model_id
from service.models import ApiKey, File, Job, JobEvent, Model, Tenant
from service.settings import Settings

Auto = Literal["auto"]


def storable_text(value: Any) -> Any:
    """``value`` unchanged when every string in it (dict keys too) can be stored and echoed; else a ``ValueError``.

    JSON's ``\\ud800`` escapes decode to a lone surrogate, which has no UTF-8 encoding, so the database and the
    JSON response would fail on it (a 500); PostgreSQL stores no U+0000 in text or JSON. Both are refused."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise ValueError("text must not contain U+0000 (NUL), which the database cannot store")
            if not item.isascii():
                bad = next((c for c in item if "\ud800" <= c <= "\udfff"), None)
                if bad is not None:
                    raise ValueError(f"\\u escape of an unpaired surrogate (U+{ord(bad):04X}), which is not a "
                                     "character")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return value


class _Strict(BaseModel):
    """Request bodies: unknown fields are errors, and so is text that cannot be stored (``storable_text``), in any
    field (metadata, suffix, model, integrations, key names, ...): a 400 naming the field."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _storable(cls, v: Any) -> Any:
        return storable_text(v)


# ----- errors -------------------------------------------------------------------------------------------------
class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(BaseModel):
    error: ErrorBody


# ----- files --------------------------------------------------------------------------------------------------
class FilePublic(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = Field(description="uploaded (validating), processed (valid) or error (see validation).")
    status_details: str | None = None
    expires_at: int | None = None
    sha256: str
    validation: dict[str, Any] | None = Field(None, description="The validation report, with line numbers.")


class CursorPage(BaseModel):
    """A page of a list with OpenAI's cursor fields (``after`` = ``last_id``); subclasses type ``data``."""

    object: Literal["list"] = "list"
    data: list[Any]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None

    @classmethod
    def of(cls, data: list[Any], has_more: bool) -> Self:
        return cls(data=data, has_more=has_more, first_id=data[0].id if data else None,
                   last_id=data[-1].id if data else None)


class FileList(CursorPage):
    data: list[FilePublic]


class Deleted(BaseModel):
    id: str
    object: str
    deleted: bool = True


# ----- fine-tuning jobs ---------------------------------------------------------------------------------------
_AUTO_RULE = "auto: decided from the base model's training defaults and the training file (docs/hyperparameters.md)"


def _auto_or_number(name: str, value: Any, kinds: tuple[type, ...]) -> Any:
    """``value`` when it is ``"auto"`` or a number of ``kinds`` (never a bool); else a message naming ``name``."""
    if value == "auto" or (isinstance(value, kinds) and not isinstance(value, bool)):
        return value
    what = "an integer" if kinds == (int,) else "a number"
    raise ValueError(f"{name} must be {what} or 'auto', got {value!r}")


class Hyperparameters(_Strict):
    n_epochs: int | Auto = Field("auto", description=f"1-50; {_AUTO_RULE}.")
    batch_size: int | Auto = Field("auto", description=f"1-1024 samples per step per worker; {_AUTO_RULE}.")
    learning_rate_multiplier: float | Auto = Field(
        "auto", description=f"(0, 1000], multiplies the learning rate 1e-5; {_AUTO_RULE}.")

    @field_validator("n_epochs", "batch_size", mode="before")
    @classmethod
    def _integer_or_auto(cls, v: Any, info: ValidationInfo) -> Any:
        return _auto_or_number(str(info.field_name), v, (int,))

    @field_validator("learning_rate_multiplier", mode="before")
    @classmethod
    def _number_or_auto(cls, v: Any) -> Any:
        return _auto_or_number("learning_rate_multiplier", v, (int, float))

    @field_validator("n_epochs")
    @classmethod
    def _epochs(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 50:
            raise ValueError(f"n_epochs must be between 1 and 50, got {v}")
        return v

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 1024:
            raise ValueError(f"batch_size must be between 1 and 1024, got {v}")
        return v

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _lrm(cls, v: float | str) -> float | str:
        if isinstance(v, float | int) and not 0 < v <= 1000:
            raise ValueError(f"learning_rate_multiplier must be in (0, 1000], got {v}")
        return v


class LoraRequest(LoraSpec):
    """``LoraSpec`` as a request gives it: ``r`` may be ``auto``, and every field left unset (r, alpha, dropout,
    targets) is taken from the base model's training defaults (``qwenvl_core.autotune.resolve_lora``)."""

    r: int | Auto = Field("auto", description=f"LoRA rank 1-1024; {_AUTO_RULE}.")  # type: ignore[assignment]

    @field_validator("r", mode="before")
    @classmethod
    def _rank(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1024):
            return v
        raise ValueError(f"lora.r must be an integer from 1 to 1024 or 'auto', got {v!r}")


class Supervised(_Strict):
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class DpoHyperparameters(Hyperparameters):
    beta: float | Auto = Field("auto", description=f"({DPO_BETA_MIN:g}, {DPO_BETA_MAX:g}]: how strongly the DPO loss "
                               f"keeps the tuned model near the base model; auto: {DPO_BETA_DEFAULT:g}.")

    @field_validator("beta", mode="before")
    @classmethod
    def _beta(cls, v: Any) -> Any:
        v = _auto_or_number("beta", v, (int, float))
        if v != "auto" and not DPO_BETA_MIN < v <= DPO_BETA_MAX:
            raise ValueError(f"beta must be in ({DPO_BETA_MIN:g}, {DPO_BETA_MAX:g}], got {v}")
        return v


class Dpo(_Strict):
    hyperparameters: DpoHyperparameters = Field(default_factory=DpoHyperparameters)


class Method(_Strict):
    type: Literal["supervised", "dpo"] = Field(description="supervised (SFT on conversations) or dpo (Direct "
                                               "Preference Optimization on a preference-format training file).")
    supervised: Supervised | None = None
    dpo: Dpo | None = None

    @model_validator(mode="after")
    def _one_method(self) -> Method:
        other = "dpo" if self.type == "supervised" else "supervised"
        if getattr(self, other) is not None:
            raise ValueError(f"method.{other} is given but method.type is {self.type!r}")
        return self

    def hyperparameters(self) -> Hyperparameters:
        chosen = self.dpo if self.type == "dpo" else self.supervised
        if chosen is not None:
            return chosen.hyperparameters
        return DpoHyperparameters() if self.type == "dpo" else Hyperparameters()


class JobCreate(_Strict):
    model: str = Field(min_length=1, max_length=256, description="A base model id, or one of your fine-tuned models "
                       "(ft:...) or checkpoints (ft:...:ckpt-step-N, ftckpt-...) to continue training from: the job "
                       "trains its base model, starting from its adapter with its LoRA configuration.")
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(None, min_length=1, max_length=64)
    suffix: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9._-]*$")
    seed: int | None = Field(None, ge=0, le=2147483647)
    metadata: dict[str, str] | None = None
    method: Method | None = None
    hyperparameters: Hyperparameters | None = Field(None, description="Deprecated by OpenAI; use method.")
    integrations: list[dict[str, Any]] | None = Field(
        None, max_length=5, description='Supported: one {"type": "mlflow", "mlflow": {"experiment_name", '
        '"run_name", "tags"}} (the job\'s run in the platform\'s MLflow, experiment <tenant>/<experiment_name>); '
        'any other type (wandb, ...) is a 400 (service.integrations).',
        examples=[[{"type": "mlflow", "mlflow": {"experiment_name": "sweep-1", "run_name": "lr-1e-4",
                                                 "tags": {"team": "vision"}}}]])
    # extensions
    lora: LoraRequest | None = Field(
        None, description="LoRA rank/alpha/dropout/targets (extension); unset fields: the base model's defaults.")
    quantization: Quantization | None = Field(None, description="'4bit' for Q-LoRA (extension).")
    compute: ComputeSpec | None = Field(None, description="Workers, GPUs, strategy ddp|zero2|zero3 (extension).")
    evaluation: EvalSpec | None = Field(None, description="Evaluation and early stopping (extension).")
    checkpoint: CheckpointSpec | None = Field(None, description="Checkpoint cadence (extension).")
    max_steps: int | None = Field(None, ge=1, le=10**9, description="Stop after this many steps (extension).")
    micro_batch_size: Annotated[int, Field(ge=1, le=1024)] | Auto | None = Field(
        None, description="Samples per forward pass per worker, 1-1024; batch_size must be a multiple "
        "(extension; unset or auto: the largest divisor of batch_size that fits the base model's tokens per "
        "forward pass, docs/hyperparameters.md).")
    min_pixels: int | None = Field(
        None, ge=MIN_PIXELS_BOUND, le=MAX_PIXELS_BOUND, description="Qwen2-VL / Qwen2.5-VL / Qwen3-VL base models: "
        "smallest image area after resizing, in pixels (extension; default: the base model's processor).")
    max_pixels: int | None = Field(
        None, ge=MIN_PIXELS_BOUND, le=MAX_PIXELS_BOUND, description="Qwen2-VL / Qwen2.5-VL / Qwen3-VL base models: "
        "largest image area after resizing, in pixels; lower it when large images run out of memory (extension; "
        "default: the base model's processor).")
    max_wall_clock_s: int | None = Field(
        None, ge=1, le=10**8, description="Seconds the job may run once started; default and upper bound: the "
        "tenant's job_max_wall_clock_s cap (extension).")

    @field_validator("micro_batch_size", mode="before")
    @classmethod
    def _micro_integer_or_auto(cls, v: Any) -> Any:
        if v is None or v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1024):
            return v
        raise ValueError(f"micro_batch_size must be an integer from 1 to 1024 or 'auto', got {v!r}")

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None:
            if len(v) > 16:
                raise ValueError(f"at most 16 metadata pairs, got {len(v)}")
            for key, value in v.items():
                if len(key) > 64 or len(value) > 512:
                    raise ValueError(f"metadata key {key[:64]!r}: keys <= 64 chars, values <= 512 chars")
        return v

    @field_validator("hyperparameters")
    @classmethod
    def _one_place_for_hyperparameters(cls, v: Hyperparameters | None, info: ValidationInfo
                                       ) -> Hyperparameters | None:
        method = info.data.get("method")
        chosen = None if method is None else method.dpo if method.type == "dpo" else method.supervised
        if v is not None and chosen is not None and "hyperparameters" in chosen.model_fields_set:
            raise ValueError(f"hyperparameters are given twice, here and in method.{method.type}.hyperparameters; "
                             f"give them in method.{method.type}.hyperparameters only (top-level hyperparameters "
                             "are deprecated by OpenAI)")
        return v

    def effective_hyperparameters(self) -> Hyperparameters:
        """The hyperparameters the job trains with: ``method.<type>.hyperparameters`` when given; else the
        deprecated top-level ``hyperparameters`` (what older OpenAI clients send), also alongside a ``method``
        without a hyperparameters block of its own, as they then conflict with nothing; else all ``auto``.
        Both at once is a 400 naming ``hyperparameters`` (``_one_place_for_hyperparameters``), not one of them
        silently ignored. DPO's ``beta`` is only ever in ``method.dpo.hyperparameters``."""
        if self.hyperparameters is not None:
            return self.hyperparameters
        if self.method is not None:
            return self.method.hyperparameters()
        return Hyperparameters()


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    model: str
    fine_tuned_model: str | None
    organization_id: str
    status: str
    error: JobError | None
    hyperparameters: dict[str, Any]
    method: dict[str, Any]
    seed: int
    training_file: str
    validation_file: str | None
    result_files: list[str]
    trained_tokens: int | None
    estimated_finish: int | None
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    suffix: str | None = None
    started_at: int | None = None
    progress: dict[str, Any] | None = Field(None, description="step, total_steps, epoch, loss, ... (extension).")
    cancel_requested: bool = False
    pause_requested: bool = Field(False, description="A pause of the running job is pending (extension): it becomes "
                                  "paused once its run has checkpointed and stopped.")
    extensions: dict[str, Any] = Field(default_factory=dict, description="lora, quantization, compute, ...")
    max_wall_clock_s: int | None = Field(None, description="Wall-clock limit from the start (extension).")
    parent_model: str | None = Field(None, description="Continued training (extension): the fine-tuned model or "
                                     "checkpoint (ft:…:ckpt-step-N) the job continues from; model shows it too, "
                                     "base_model the base model it trains on.")
    base_model: str | None = Field(None, description="The base model the job trains (extension).")


class JobList(CursorPage):
    data: list[JobPublic]


class EventPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] = Field(default_factory=dict)


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventPublic]
    has_more: bool


class CheckpointPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any]


class CheckpointList(CursorPage):
    data: list[CheckpointPublic]


class EstimateRequest(_Strict):
    model: str = Field(min_length=1, max_length=256)
    training_file: str = Field(min_length=1, max_length=64)
    n_epochs: int = Field(1, ge=1, le=50)
    tokens_per_second: float | None = Field(None, gt=0, allow_inf_nan=False,
                                            description="Throughput to assume (default: settings).")
    min_pixels: int | None = Field(None, ge=MIN_PIXELS_BOUND, le=MAX_PIXELS_BOUND,
                                   description="The job's min_pixels: image tokens are counted with it.")
    max_pixels: int | None = Field(None, ge=MIN_PIXELS_BOUND, le=MAX_PIXELS_BOUND,
                                   description="The job's max_pixels: image tokens are counted with it.")


class EstimatePublic(BaseModel):
    object: Literal["fine_tuning.estimate"] = "fine_tuning.estimate"
    model: str
    training_file: str
    samples: int
    images: int
    total_tokens: int
    supervised_tokens: int | None
    epochs: int
    estimated_train_tokens: int
    tokens_per_second: float | None
    estimated_seconds: float | None


# ----- models -------------------------------------------------------------------------------------------------
class ModelPublic(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    kind: Literal["base", "adapter", "checkpoint"] = "base"
    base_model: str | None = None
    fine_tuning_job_id: str | None = None
    parent_model: str | None = Field(None, description="The model its job continued from (continued training).")
    step_number: int | None = Field(None, description="A checkpoint's step (kind checkpoint).")
    servable: bool | None = Field(None, description="Whether POST /v1/chat/completions can serve this model now "
                                  "(qwenvl_core.serving.servable).")
    unservable_reason: str | None = Field(None, description="Why not (the same reason the chat route answers).")
    unservable_code: str | None = Field(None, description="The chat route's error code for it: "
                                        "base_model_not_deployed, adapter_files_missing or adapter_not_supported.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelPublic]


# ----- admin --------------------------------------------------------------------------------------------------
class TenantCreate(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{1,62}$", description="Lower-case slug, used in model names.")
    max_active_jobs: int | None = Field(None, ge=0, le=10_000)
    max_stored_bytes: int | None = Field(None, ge=0, le=2**62)
    limits: TenantLimits | None = Field(  # type: ignore[valid-type]
        None, description="Per-tenant caps (job_max_* names) overriding the global ones, up or down.")


class TenantUpdate(_Strict):
    max_active_jobs: int | None = Field(None, ge=0, le=10_000)
    max_stored_bytes: int | None = Field(None, ge=0, le=2**62, description="Storage quota (uploads + job outputs).")
    limits: TenantLimits | None = Field(  # type: ignore[valid-type]
        None, description="Caps to override (merged into the tenant's overrides); a cap set to null drops its "
        "override, so the global value applies again; limits: null drops every override.")


class TenantPublic(BaseModel):
    id: str
    object: Literal["tenant"] = "tenant"
    name: str
    created_at: int
    max_active_jobs: int
    max_stored_bytes: int
    used_bytes: int = Field(0, description="Bytes charged: uploaded files plus the jobs' run directories.")
    limits: dict[str, Any] = Field(default_factory=dict, description="This tenant's cap overrides.")
    caps: dict[str, Any] = Field(default_factory=dict, description="Every cap in force for the tenant.")


class UsageReconciled(BaseModel):
    object: Literal["tenant.usage"] = "tenant.usage"
    tenant_id: str
    used_bytes_before: int
    used_bytes: int
    uploaded_bytes: int
    run_bytes: int
    orphans_removed: list[str] = Field(description="Uploaded objects without a file row that were removed.")


class KeyCreate(_Strict):
    name: str = Field("", max_length=128)
    revoke_existing: bool = Field(False, description="Rotate: revoke the tenant's other keys.")


class KeyPublic(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    tenant_id: str
    name: str
    created_at: int
    revoked_at: int | None


class KeyCreated(KeyPublic):
    key: str = Field(description="The secret key; shown once, only its hash is stored.")


class TenantMlflow(BaseModel):
    """The tenant's read-only MLflow tracking UI login (only when the service provisions MLflow users)."""

    tracking_uri: str
    username: str
    password: str = Field(description="Shown once; the service does not store it.")
    experiment_id: str
    experiment_name: str
    experiment_url: str = Field(description="The experiment's page in MLflow's model-training view (runs, datasets, "
                                "metric charts); MLflow 3.17 otherwise opens experiments in its GenAI traces view.")


class TenantCreated(BaseModel):
    tenant: TenantPublic
    key: KeyCreated
    mlflow: TenantMlflow | None = Field(None, description="MLflow login, when QWENVL_MLFLOW_TRACKING_URI is set.")


class TenantList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TenantPublic]


class Health(BaseModel):
    status: str
    database: str
    scheduler_leader_present: bool | None = Field(None, description="/ready: whether a scheduler leader holds "
                                                  "the lease.")
    scheduler_leader: str | None = Field(None, description="/ready with the admin key only: the leader's "
                                         "host:pid.")


# ----- conversions --------------------------------------------------------------------------------------------
def file_public(row: File) -> FilePublic:
    return FilePublic(id=row.id, bytes=row.bytes, created_at=row.created_at, filename=row.filename,
                      purpose=row.purpose, status=row.status, sha256=row.sha256, validation=row.validation)


def job_public(row: Job) -> JobPublic:
    req = row.request
    return JobPublic(
        id=row.id, created_at=row.created_at, finished_at=row.finished_at, model=row.parent_model or row.model,
        fine_tuned_model=row.fine_tuned_model, organization_id=row.tenant_id, status=row.status,
        error=JobError(**row.error) if row.error else None, hyperparameters=req["hyperparameters"],
        method=method_public(req),
        seed=row.seed, training_file=row.training_file, validation_file=row.validation_file,
        result_files=row.result_files or [], trained_tokens=row.trained_tokens,
        estimated_finish=row.estimated_finish, integrations=req.get("integrations"), metadata=row.meta,
        suffix=row.suffix, started_at=row.started_at, progress=row.progress,
        cancel_requested=row.cancel_requested_at is not None, pause_requested=row.pause_requested_at is not None,
        extensions={k: v for k, v in req.get("extensions", {}).items() if k != "method"},
        max_wall_clock_s=row.max_wall_clock_s, parent_model=row.parent_model, base_model=row.model)


def method_public(req: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's ``method`` of a stored job request (DPO's ``beta`` is kept in its extensions' ``method``)."""
    hp, method = req["hyperparameters"], req.get("extensions", {}).get("method") or {}
    if method.get("type") == "dpo":
        return {"type": "dpo", "dpo": {"hyperparameters": {**hp, "beta": method["dpo"]["beta"]}}}
    return {"type": "supervised", "supervised": {"hyperparameters": hp}}


def event_public(row: JobEvent) -> EventPublic:
    return EventPublic(id=f"ftevent-{row.ref}", created_at=row.created_at, level=row.level, message=row.message,
                       type="metrics" if row.type == "metrics" else "message", data=dict(row.data or {}, kind=row.type))


def checkpoint_public(row: JobEvent, fine_tuned_base: str) -> CheckpointPublic:
    step = int((row.data or {}).get("step", 0))
    return CheckpointPublic(id=f"ftckpt-{row.ref}", created_at=row.created_at,
                            fine_tuned_model_checkpoint=checkpoint_model_id(fine_tuned_base, step),
                            fine_tuning_job_id=row.job_id, step_number=step,
                            metrics=dict((row.data or {}).get("metrics", {}), step=step))


def model_public(row: Model, owner: str) -> ModelPublic:
    return ModelPublic(id=row.id, created=row.created_at, owned_by=owner, kind="adapter", base_model=row.base_model,
                       fine_tuning_job_id=row.job_id, parent_model=row.parent_model)


def tenant_public(row: Tenant, settings: Settings) -> TenantPublic:
    return TenantPublic(id=row.id, name=row.name, created_at=row.created_at, max_active_jobs=row.max_active_jobs,
                        max_stored_bytes=row.max_stored_bytes, used_bytes=row.used_bytes, limits=row.limits or {},
                        caps=effective_caps(settings, row))


def key_public(row: ApiKey) -> KeyPublic:
    return KeyPublic(id=row.id, tenant_id=row.tenant_id, name=row.name, created_at=row.created_at,
                     revoked_at=row.revoked_at)
