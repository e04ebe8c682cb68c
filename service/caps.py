"""Operator caps on what one fine-tuning job may ask for, and their check at submit time.

The global caps are the ``job_max_*`` settings named in ``CAP_FIELDS``; a tenant's ``limits`` document
(``tenants.limits``, set through the admin API) overrides any of them for that tenant, upwards or downwards: the
operator sets both. ``check_job`` compares a job's effective values (its ``FineTuneJobSpec``, defaults included,
so a default above a lowered cap is caught too) with the tenant's caps and answers 400 ``limit_exceeded`` naming
the request field, the cap and its value. It returns the job's wall-clock limit, stored in
``jobs.max_wall_clock_s`` (enforced by the scheduler).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from qwenvl_core import autotune
from qwenvl_core.specs import FineTuneJobSpec
from service.errors import InvalidRequest
from service.limits import ADMISSION_LIMITS
from service.settings import Settings

if TYPE_CHECKING:
    from service.models import Tenant
    from service.schemas import JobCreate


@dataclass(frozen=True)
class Cap:
    """One cap: its settings name, the request field it bounds, and how to read the job's value."""

    name: str
    param: str
    value: Callable[[FineTuneJobSpec], float | int | None]


def _epochs_param(body: JobCreate) -> str:
    """Where the request gave ``n_epochs`` (``JobCreate.effective_hyperparameters`` reads the same place)."""
    if body.hyperparameters is not None:
        return "hyperparameters.n_epochs"
    return f"method.{body.method.type if body.method is not None else 'supervised'}.hyperparameters.n_epochs"


def _keeps_all(body: JobCreate) -> bool:
    """``checkpoint.keep: null`` given explicitly (the request's nulls are dropped before the spec is built)."""
    return body.checkpoint is not None and "keep" in body.checkpoint.model_fields_set and body.checkpoint.keep is None


CAPS: tuple[Cap, ...] = (
    Cap("job_max_workers", "compute.num_workers", lambda s: s.compute.num_workers),
    Cap("job_max_gpus_per_worker", "compute.gpus_per_worker", lambda s: s.compute.gpus_per_worker),
    Cap("job_max_cpus_per_worker", "compute.cpus_per_worker", lambda s: s.compute.cpus_per_worker),
    Cap("job_max_feature_cache_mb", "compute.image_feature_cache_mb", lambda s: s.compute.image_feature_cache_mb),
    Cap("job_max_steps", "max_steps", lambda s: s.hyperparameters.max_steps),
    Cap("job_max_epochs", "n_epochs", lambda s: s.hyperparameters.n_epochs),  # param resolved per request
    Cap("job_max_micro_batch_size", "micro_batch_size", lambda s: s.hyperparameters.micro_batch_size),
    Cap("job_max_lora_rank", "lora.r", lambda s: s.lora.r),
    Cap("job_max_checkpoints_kept", "checkpoint.keep", lambda s: s.checkpoint.keep),
)
WALL_CLOCK_CAP = "job_max_wall_clock_s"
CAP_FIELDS: tuple[str, ...] = (*(c.name for c in CAPS), WALL_CLOCK_CAP)
# Every name a tenant's ``limits`` may set: the job caps and the request-admission limits (``service.limits``).
LIMIT_FIELDS: tuple[str, ...] = (*CAP_FIELDS, *ADMISSION_LIMITS)


def _limit_field(name: str) -> Any:
    info = Settings.model_fields[name]
    return (Annotated[info.annotation, *info.metadata] | None, Field(None, description=info.description))


class _LimitsBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known_caps(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(str(k) for k in data if k not in LIMIT_FIELDS)
            if unknown:
                raise ValueError(f"unknown cap name(s) {', '.join(map(repr, unknown))}; the caps are "
                                 f"{', '.join(LIMIT_FIELDS)}")
        return data


TenantLimits: type[BaseModel] = create_model(  # one optional field per cap, with the setting's bounds
    "TenantLimits", __base__=_LimitsBase, __doc__="Per-tenant caps overriding the global job_max_* and tenant_* admission settings.",
    **{name: _limit_field(name) for name in LIMIT_FIELDS})


def merge_limits(current: dict[str, Any] | None, patch: BaseModel) -> dict[str, Any]:
    """``current`` overrides updated with the caps ``patch`` sets; a cap set to null drops its override."""
    merged = dict(current or {})
    for name, value in patch.model_dump(exclude_unset=True).items():
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = value
    return merged


def effective_caps(settings: Settings, tenant: Tenant) -> dict[str, Any]:
    """Every cap's value for ``tenant``: its override where it has one, the global setting otherwise."""
    overrides = tenant.limits or {}
    return {name: overrides.get(name, getattr(settings, name)) for name in LIMIT_FIELDS}


def auto_caps(settings: Settings, tenant: Tenant) -> autotune.Caps:
    """The caps ``auto`` hyperparameters stay within for ``tenant`` (``qwenvl_core.autotune``)."""
    caps = effective_caps(settings, tenant)
    return autotune.Caps(max_epochs=int(caps["job_max_epochs"]), max_micro_batch_size=int(caps["job_max_micro_batch_size"]),
                         max_lora_rank=int(caps["job_max_lora_rank"]))


def _who(tenant: Tenant, name: str) -> str:
    return "this tenant's cap" if name in (tenant.limits or {}) else "the cap"


def check_job(settings: Settings, tenant: Tenant, body: JobCreate, spec: FineTuneJobSpec) -> int:
    """400 ``limit_exceeded`` when a value of the job is over the tenant's cap; else the job's wall-clock limit."""
    caps = effective_caps(settings, tenant)
    over: list[tuple[str, str]] = []
    for cap in CAPS:
        value, limit = cap.value(spec), caps[cap.name]
        param = _epochs_param(body) if cap.name == "job_max_epochs" else cap.param
        if cap.name == "job_max_checkpoints_kept" and (value is None or _keeps_all(body)):
            over.append((param, f"{param}: null (keep every checkpoint) is not allowed; {_who(tenant, cap.name)} "
                                f"{cap.name} is {limit}"))
        elif value is not None and value > limit:
            over.append((param, f"{param} = {value} exceeds {_who(tenant, cap.name)} {cap.name} = {limit}"))
    wall_limit = int(caps[WALL_CLOCK_CAP])
    wall = body.max_wall_clock_s if body.max_wall_clock_s is not None else wall_limit
    if wall > wall_limit:
        over.append(("max_wall_clock_s", f"max_wall_clock_s = {wall} exceeds {_who(tenant, WALL_CLOCK_CAP)} "
                                         f"{WALL_CLOCK_CAP} = {wall_limit}"))
    if over:
        message = over[0][1]
        if len(over) > 1:
            message += f" (also over their caps: {', '.join(p for p, _ in over[1:])})"
        raise InvalidRequest(message, param=over[0][0], code="limit_exceeded")
    return wall
