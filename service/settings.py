"""Service settings: every knob of the control plane, read from ``QWENVL_*`` environment variables.

Settings are built by the caller (``create_app(Settings())``, tests build their own), never at import time.
Production mode fails fast: it refuses to start without an admin key, or with a placeholder one.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Literal

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
    serve_replicas: int = Field(1, ge=1, description="Ray Serve: replicas per base model (the minimum when "
                                "autoscaling); used by workflows.app.")
    serve_max_replicas: int | None = Field(None, ge=1, description="Ray Serve: autoscale each base model's "
                                           "replicas up to this many; None: a fixed serve_replicas.")
    serve_target_ongoing_requests: float = Field(8.0, gt=0, description="Ray Serve autoscaling target: "
                                                 "ongoing requests per replica.")
    serve_max_adapters_per_replica: int = Field(8, ge=1, description="LoRA adapters one model replica keeps "
                                                "loaded (LRU; Serve multiplexing bound).")
    serve_num_cpus: float = Field(0.5, gt=0, description="CPUs reserved per model replica.")
    serve_num_gpus: float = Field(0.0, ge=0, description="GPUs per model replica (1 on GPU worker groups).")
    serve_ingress_replicas: int = Field(1, ge=1, description="Replicas of the API ingress deployment.")
    serve_dtype: str | None = Field(None, description="Serving dtype of the base weights (e.g. bfloat16); None: "
                                    "the model's own.")
    serve_quantization: Literal["none", "4bit"] = Field(
        "none", description="4bit: serve the base with its language model in NF4, as Q-LoRA adapters were trained.")
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow server running the basic-auth app (http://mlflow:5000). With the admin "
        "credentials set, each new tenant gets an MLflow user that can read only its own experiment; None: "
        "nothing is created in MLflow.")
    mlflow_admin_username: str | None = Field(None, description="MLflow admin user that creates tenant users "
                                              "and experiments.")
    mlflow_admin_password: SecretStr | None = Field(None, description="Password of mlflow_admin_username.")
    mlflow_timeout_s: float = Field(10.0, gt=0, description="Timeout of one request to the MLflow server.")

    @model_validator(mode="after")
    def _production_needs_admin_key(self) -> Settings:
        if self.mode is Mode.PRODUCTION:
            key = self.admin_key.get_secret_value() if self.admin_key else ""
            if key.lower() in PLACEHOLDER_KEYS or len(key) < 24:
                raise ValueError("QWENVL_ADMIN_KEY: production mode needs a real admin key (>= 24 chars, "
                                 "not a placeholder)")
        return self

    @model_validator(mode="after")
    def _serving_and_mlflow_consistent(self) -> Settings:
        if self.serve_max_replicas is not None and self.serve_max_replicas < self.serve_replicas:
            raise ValueError("QWENVL_SERVE_MAX_REPLICAS must be >= QWENVL_SERVE_REPLICAS")
        if self.mlflow_tracking_uri and not (self.mlflow_admin_username and self.mlflow_admin_password):
            raise ValueError("QWENVL_MLFLOW_TRACKING_URI is set: QWENVL_MLFLOW_ADMIN_USERNAME and "
                             "QWENVL_MLFLOW_ADMIN_PASSWORD are required too")
        return self

    @property
    def mlflow_tenants_enabled(self) -> bool:
        """True when tenant creation also creates the tenant's MLflow user and experiment."""
        return self.mlflow_tracking_uri is not None

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir.absolute() / 'qwenvl.db'}"

    @property
    def resolved_storage_uri(self) -> str:
        return self.storage_uri or str(self.data_dir.absolute() / "objects")
