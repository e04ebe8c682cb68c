"""Service settings: every knob of the control plane, read from ``QWENVL_*`` environment variables.

Settings are built by the caller (``create_app(Settings())``, tests build their own), never at import time.
Production mode fails fast: it refuses to start without an admin key, or with a placeholder one.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_KEYS = frozenset({"", "changethis", "change-me", "changeme", "admin", "secret", "password", "test"})


class Mode(StrEnum):
    LOCAL = "local"  # embedded stack: bootstraps a default tenant and an admin key into data_dir
    PRODUCTION = "production"  # the admin key must be given; nothing is bootstrapped


class Settings(BaseSettings):
    """Control-plane configuration (env prefix ``QWENVL_``; dict fields take JSON)."""

    model_config = SettingsConfigDict(env_prefix="QWENVL_", extra="forbid")

    mode: Mode = Field(Mode.LOCAL, description="local (embedded, bootstraps keys) or production (fail fast).")
    data_dir: Path = Field(Path(".qwenvl"), description="Local state: SQLite DB, objects, bootstrap keys.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default sqlite:///{data_dir}/qwenvl.db (WAL). PostgreSQL: "
        "postgresql+psycopg2://user@host:port/db.")
    storage_uri: str | None = Field(None, description="Object storage root: a local path or s3://bucket/prefix; "
                                    "default {data_dir}/objects.")
    admin_key: SecretStr | None = Field(None, description="Admin bearer key (tenants, keys). Required in production.")
    base_models: dict[str, str] = Field(
        default_factory=lambda: {"qwen-vl-chat": "Qwen/Qwen-VL-Chat", "qwen-vl": "Qwen/Qwen-VL"},
        description="Base models offered to tenants: model id -> model directory or storage URI for training.")
    max_upload_bytes: int = Field(512 << 20, ge=1, description="Largest file upload (OpenAI: 512 MB).")
    max_request_bytes: int = Field(1 << 20, ge=1024, description="Largest non-upload request body.")
    default_max_active_jobs: int = Field(4, ge=0, description="New tenants: jobs not yet finished (429 above).")
    default_max_stored_bytes: int = Field(50 << 30, ge=0, description="New tenants: bytes of stored files (403 above).")
    scheduler_enabled: bool = Field(True, description="Run the scheduler loop in this process (leader-elected).")
    scheduler_interval_s: float = Field(1.0, gt=0, description="Seconds between scheduler ticks.")
    lease_ttl_s: float = Field(15.0, gt=0, description="Leadership lease lifetime; a dead leader is replaced after it.")
    max_running_jobs: int = Field(2, ge=1, description="Jobs launched on the cluster at once (fair-shared).")
    max_job_attempts: int = Field(2, ge=1, description="Launches per job when its Ray job dies without a result.")
    cancel_grace_s: float = Field(30.0, ge=0, description="Seconds a cancelled job may take before stop_job.")
    ray_address: str | None = Field(None, description="Ray dashboard URL (http://host:8265) for Ray Jobs; "
                                    "None disables launching.")
    job_entrypoint: str = Field("{python} -m workflows.finetune --spec {spec}",
                                description="Command of one training job; {python} and {spec} are filled in.")
    job_entrypoint_num_cpus: float = Field(0.1, ge=0, description="CPUs reserved for the job's driver process.")
    job_env: dict[str, str] = Field(default_factory=dict, description="Extra env vars for training jobs.")
    job_pythonpath: str | None = Field(None, description="PYTHONPATH of training jobs (default: the project root).")
    validation_timeout_s: float = Field(3600.0, gt=0, description="Longest a file validation may run.")
    estimate_tokens_per_second: float | None = Field(
        None, gt=0, description="Measured training throughput used by /v1/fine_tuning/estimate for time.")

    @model_validator(mode="after")
    def _production_needs_admin_key(self) -> Settings:
        if self.mode is Mode.PRODUCTION:
            key = self.admin_key.get_secret_value() if self.admin_key else ""
            if key.lower() in PLACEHOLDER_KEYS or len(key) < 24:
                raise ValueError("QWENVL_ADMIN_KEY: production mode needs a real admin key (>= 24 chars, "
                                 "not a placeholder)")
        return self

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir.absolute() / 'qwenvl.db'}"

    @property
    def resolved_storage_uri(self) -> str:
        return self.storage_uri or str(self.data_dir.absolute() / "objects")
