"""Service settings: every knob of the control plane, read from ``QWENVL_*`` environment variables.

Settings are built by the caller (``create_app(Settings())``, tests build their own), never at import time.
Production mode fails fast: it refuses to start without an admin key, or with a placeholder admin key, MLflow admin
password or database password.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from qwenvl_core.secret_names import looks_secret

PLACEHOLDER_KEYS = frozenset({"", "changethis", "change-me", "changeme", "admin", "secret", "password", "test"})
# ----- secrets (issue 15, "secrets"): placeholders production refuses, anywhere in a secret
PLACEHOLDER_WORDS = ("changeme", "change-me", "change_me", "changethis", "replaceme", "replace-me", "placeholder")
MIN_PASSWORD_CHARS = 12


def is_placeholder(secret: str) -> bool:
    """True for an empty secret, a well-known default (``PLACEHOLDER_KEYS``) or one containing a placeholder word
    (``changeme`` ...): what an example file or manifest ships, never a real secret."""
    value = secret.strip().lower()
    return value in PLACEHOLDER_KEYS or any(word in value for word in PLACEHOLDER_WORDS)


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
    database_pool_size: int = Field(30, ge=1, le=1000, description="PostgreSQL: connections one API process keeps "
                                    "open and reuses, and the most it opens (a request beyond waits for a free one; "
                                    "none is opened and closed per request). Size PostgreSQL's max_connections for "
                                    "this times the API processes, plus MLflow's. SQLite keeps one per API thread.")
    storage_uri: str | None = Field(None, description="Object storage root: a local path or s3://bucket/prefix; "
                                    "default {data_dir}/objects.")
    admin_key: SecretStr | None = Field(None, description="Admin bearer key (tenants, keys). Required in production.")
    base_models: dict[str, str] = Field(
        default_factory=lambda: {"qwen-vl-chat": "Qwen/Qwen-VL-Chat", "qwen-vl": "Qwen/Qwen-VL"},
        description="Base models offered to tenants: model id -> model directory or storage URI for training.")
    max_upload_bytes: int = Field(512 << 20, ge=1, description="Largest file upload (OpenAI: 512 MB).")
    max_request_bytes: int = Field(1 << 20, ge=1024, description="Largest non-upload request body.")
    # ----- serving (issue 15, "serving"): chat request limits; workflows.app passes the image ones to every model
    # replica's EngineConfig too (the engine re-checks them before decoding)
    max_chat_request_bytes: int = Field(50 << 20, ge=1024, description="Largest POST /v1/chat/completions body "
                                        "(base64 images inline; OpenAI: 50 MB per request).")
    max_chat_images: int = Field(16, ge=0, description="Images in one chat request (400 too_many_images above).")
    max_chat_image_bytes: int = Field(20 << 20, ge=1, description="Largest image of a chat request, encoded (a "
                                      "stored file, or a data URL's decoded payload); OpenAI: 20 MB.")
    max_chat_image_bytes_total: int = Field(50 << 20, ge=1, description="Encoded bytes of all images of one chat "
                                            "request together.")
    chat_default_max_tokens: int = Field(256, ge=1, description="Output limit of a chat request that sets neither "
                                         "max_tokens nor max_completion_tokens, cut to what serve_max_total_tokens "
                                         "leaves after its prompt (OpenAI's default is the rest of the context).")
    default_max_active_jobs: int = Field(4, ge=0, description="New tenants: jobs not yet finished (429 above).")
    default_max_stored_bytes: int = Field(50 << 30, ge=0, description="New tenants: bytes stored (uploads and job "
                                          "outputs: checkpoints, adapters, results); 403 above.")
    # ----- caps (issue 15, "caps"): the most one job may ask for; tenants.limits overrides any of them per tenant
    job_max_workers: int = Field(8, ge=1, le=1024, description="Cap: compute.num_workers of one job.")
    job_max_gpus_per_worker: float = Field(8.0, ge=0.0, le=16.0, description="Cap: compute.gpus_per_worker.")
    job_max_cpus_per_worker: float = Field(32.0, gt=0.0, le=256.0, description="Cap: compute.cpus_per_worker.")
    job_max_feature_cache_mb: int = Field(8192, ge=0, le=1 << 20,
                                          description="Cap: compute.image_feature_cache_mb (per worker).")
    job_max_steps: int = Field(100_000, ge=1, le=10**9, description="Cap: max_steps of one job.")
    job_max_epochs: int = Field(50, ge=1, le=100, description="Cap: hyperparameters.n_epochs.")
    job_max_micro_batch_size: int = Field(64, ge=1, le=1024, description="Cap: micro_batch_size.")
    job_max_lora_rank: int = Field(256, ge=1, le=1024, description="Cap: lora.r.")
    job_max_checkpoints_kept: int = Field(10, ge=1, le=10_000, description="Cap: checkpoint.keep (keep: null, "
                                          "i.e. keep all, is refused).")
    job_max_wall_clock_s: int = Field(86_400, ge=1, le=10**8, description="Cap and default of a job's wall-clock "
                                      "time from its start (max_wall_clock_s); the scheduler cancels it after.")
    usage_orphan_grace_s: float = Field(3600.0, ge=0, description="Usage reconciliation removes an uploaded "
                                        "object without a file row only once it is this old (uploads in flight "
                                        "are younger).")
    scheduler_enabled: bool = Field(True, description="Run the scheduler loop in this process (leader-elected).")
    scheduler_interval_s: float = Field(1.0, gt=0, description="Seconds between scheduler ticks.")
    lease_ttl_s: float = Field(15.0, gt=0, description="Leadership lease lifetime; a dead leader is replaced after it.")
    max_running_jobs: int = Field(2, ge=1, description="Jobs launched on the cluster at once (fair-shared).")
    max_job_attempts: int = Field(2, ge=1, description="Launches per job when its Ray job dies without a result.")
    stray_check_interval_s: float = Field(60.0, gt=0, description="Seconds between the scheduler's checks for "
                                          "Ray jobs of a job that are not its current submission (a late "
                                          "submission of a leader that stopped mid-launch); they are stopped.")
    cancel_grace_s: float = Field(30.0, ge=0, description="Seconds a cancelled job may take before stop_job.")
    pause_grace_s: float = Field(600.0, ge=0, description="Seconds a paused running job may take to checkpoint and "
                                 "stop before stop_job (it then resumes from its latest checkpoint).")
    ray_address: str | None = Field(None, description="Ray dashboard URL (http://host:8265) for Ray Jobs; "
                                    "None disables launching.")
    job_entrypoint: str = Field("{python} -m workflows.finetune --spec {spec}",
                                description="Command of one training job; {python} and {spec} are filled in.")
    job_entrypoint_num_cpus: float = Field(0.1, ge=0, description="CPUs reserved for the job's driver process.")
    job_env: dict[str, str] = Field(default_factory=dict, description="Extra env vars for training jobs.")
    job_pythonpath: str | None = Field(None, description="PYTHONPATH of training jobs (default: the project root).")
    validation_timeout_s: float = Field(3600.0, gt=0, description="Longest a file validation may run.")
    merge_timeout_s: float = Field(3600.0, gt=0, description="Longest a merged export (GET /v1/models/{id}/content"
                                   "?format=merged) may merge, or wait for another merge (504 merge_timeout).")
    estimate_tokens_per_second: float | None = Field(
        None, gt=0, description="Measured training throughput used by /v1/fine_tuning/estimate for time.")
    # ----- request admission (issue 15, "ratelimit"; service.admission, service.limits): per API process
    max_ongoing_requests: int = Field(256, ge=1, description="Requests one API process works on at once: Ray "
                                      "Serve's max_ongoing_requests of the ingress, uvicorn's limit_concurrency "
                                      "(which counts open connections too) for python -m service; 503 above.")
    gil_switch_interval_s: float = Field(0.0005, ge=0, description="The API process's GIL switch interval while the "
                                         "app runs (sys.setswitchinterval; 0: Python's default, 5 ms). Its request "
                                         "handlers, body parsing and image decoding share one interpreter: at 5 ms a "
                                         "busy thread (another tenant's flood) makes a short request wait up to 5 ms "
                                         "per hand-over; 0.5 ms cut the other tenant's p99 under a flood "
                                         "(bench/tenant_isolation.py, docs/benchmarks.md).")
    body_read_timeout_s: float = Field(30.0, gt=0, description="Longest wait for the next chunk of a request body "
                                       "(408 request_timeout after it; the request's slot is freed).")
    tenant_requests_per_second: float = Field(50.0, ge=0, description="Per tenant and API process: sustained "
                                              "requests per second (token bucket; 429 rate_limit_exceeded above; "
                                              "0: unlimited). The admin key is exempt.")
    tenant_request_burst: int = Field(100, ge=1, description="Per tenant and API process: requests allowed at "
                                      "once above the sustained rate (the token bucket's size).")
    tenant_request_cost_bytes: int = Field(256 << 10, ge=0, description="Rate-limit weight of request bodies "
                                           "(uploads included): every this many bytes count as one more request "
                                           "(a 1.5 MB photo counts 6; a body worth more than the burst takes a "
                                           "full bucket); 0: every request counts 1.")
    tenant_max_concurrent_requests: int = Field(32, ge=0, description="Per tenant and API process: requests in "
                                                "flight, uploads and chat streams included; a chat "
                                                "completion with n choices counts n (429 "
                                                "too_many_concurrent_requests above; 0: unlimited).")
    auth_cache_ttl_s: float = Field(5.0, ge=0, description="Seconds the admission check trusts a verified key "
                                    "without the database (the routes still check every request; 0: no cache).")
    estimate_timeout_s: float = Field(120.0, gt=0, description="Longest a /v1/fine_tuning/estimate may take, "
                                      "waiting for a slot included (504 estimate_timeout; its worker is killed).")
    max_concurrent_estimates: int = Field(2, ge=1, description="Estimate workers one API process runs at once "
                                          "(each tenant at most one: 429 too_many_concurrent_estimates).")
    serve_replicas: int = Field(1, ge=1, description="Ray Serve: replicas per base model (the minimum when "
                                "autoscaling); used by workflows.app.")
    serve_max_replicas: int | None = Field(None, ge=1, description="Ray Serve: autoscale each base model's "
                                           "replicas up to this many; None: a fixed serve_replicas.")
    serve_target_ongoing_requests: float | None = Field(None, gt=0, description="Ray Serve autoscaling target: "
                                                        "ongoing requests per replica (running and waiting); None: "
                                                        "half a replica's batch (serve_max_batch_size, else 64 on "
                                                        "GPU replicas, 16 on CPU ones).")
    serve_max_adapters_per_replica: int = Field(8, ge=1, description="LoRA adapters one model replica keeps "
                                                "loaded (LRU; Serve multiplexing bound).")
    serve_num_cpus: float = Field(0.5, gt=0, description="CPUs reserved per model replica.")
    serve_num_gpus: float = Field(0.0, ge=0, description="GPUs per model replica (1 on GPU worker groups).")
    serve_ingress_replicas: int = Field(1, ge=1, description="Replicas of the API ingress deployment.")
    serve_dtype: str | None = Field(None, description="Serving dtype of the base weights (e.g. bfloat16); None: "
                                    "the model's own.")
    serve_quantization: Literal["none", "4bit"] = Field(
        "none", description="4bit: serve the base with its language model in NF4, as Q-LoRA adapters were trained.")
    serve_decode_graphs: Literal["off", "cuda"] = Field(
        "off", description="cuda: GPU replicas replay their decode steps from CUDA graphs (one launch a step; "
        "needs serve_num_gpus > 0; a 4-bit base too; a step that cannot be captured turns them off for the "
        "replica). Off until measured on GPUs.")
    serve_max_batch_size: int | None = Field(None, ge=1, description="Requests one model replica decodes together "
                                             "(at most; the KV cache budget may allow fewer). None: 64 on a GPU, "
                                             "16 on a CPU.")
    serve_max_total_tokens: int = Field(2048, ge=16, description="Prompt + max_tokens of one chat request; the KV "
                                        "cache reserves this many tokens per running request.")
    serve_kv_cache_bytes: int | None = Field(None, ge=1, description="KV cache size per model replica; None: 85% of "
                                             "the GPU memory free after loading the model and its adapter slots, "
                                             "less serve_vision_adapter_bytes, "
                                             "times serve_num_gpus when below 1 (GPU), max_batch_size slots (CPU); "
                                             "never more than max_batch_size slots.")
    serve_prefill_chunk_tokens: int | None = Field(None, ge=0, description="Prompt tokens one prefill forward of "
                                                   "a replica takes: longer prompts are prefilled in chunks of about "
                                                   "this many between the running streams' decode steps, shorter "
                                                   "ones joining together share one forward up to it. Smaller: "
                                                   "running streams stall less while others join; larger: fewer "
                                                   "forwards per prompt token. 0: whole prompts, no limit; None: "
                                                   "2048 on a GPU, 512 on a CPU.")
    serve_adapter_slots: int = Field(8, ge=1, description="Adapters resident on a replica's device at once; "
                                     "requests whose adapter finds every slot in use wait.")
    serve_vision_adapter_bytes: int = Field(1 << 30, ge=0, description="GPU memory per model replica for copies "
                                            "of adapters' vision-tower weights (a trained merger or Resampler, "
                                            "vision LoRA), least recently used dropped beyond; reserved before the "
                                            "KV cache is sized.")
    serve_max_lora_rank: int = Field(64, ge=1, le=1024, description="Largest LoRA rank the model replicas serve: "
                                     "each adapter slot holds this rank in every language-model linear layer "
                                     "(allocated at start). Adapters of a higher rank are listed unservable; a job "
                                     "that trains one gets a warning event. Decode steps read the slots cut to "
                                     "the batch's largest rank (graphs: rounded up to a power of two), so a larger "
                                     "value costs device memory, not time.")
    serve_stream_interval_ms: int = Field(50, ge=0, description="A model replica sends each stream at most one "
                                          "event this often (the first token at once), each carrying the tokens "
                                          "made meanwhile: every item a Ray Serve stream carries costs the "
                                          "replica's host ~0.6 ms. 0: each event as soon as it is ready.")
    serve_engine_process: bool = Field(True, description="Each model replica runs its serving engine in a "
                                       "process of its own, so the model thread shares no GIL with the replica's "
                                       "streaming (false: a thread of the replica's process).")
    serve_stall_timeout_s: float = Field(300.0, ge=0, description="A model replica whose engine has been in one "
                                         "step (a forward and its rows' work) this long fails its health check and "
                                         "Serve replaces it (a device that hangs); 0: never.")
    serve_max_waiting: int = Field(256, ge=1, description="Requests waiting per model replica; beyond, chat "
                                   "answers 429 engine_overloaded with Retry-After.")
    serve_request_timeout_s: float = Field(600.0, gt=0, description="A chat request not finished this long after "
                                           "it reached its replica fails (504 generation_timeout).")
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
    def _no_placeholder_or_exposed_secrets(self) -> Settings:
        """Production refuses placeholder secrets; ``job_env`` never carries one (a Ray job's runtime env is shown
        by the dashboard)."""
        exposed = sorted(name for name in self.job_env if looks_secret(name))
        if exposed:
            raise ValueError(f"QWENVL_JOB_ENV: {', '.join(exposed)} would carry a secret into the Ray jobs' runtime "
                             "env, which the Ray dashboard shows; put secrets into the Ray nodes' environment "
                             "instead (docs/operations.md, Secrets)")
        if self.mode is not Mode.PRODUCTION:
            return self
        password = self.mlflow_admin_password.get_secret_value() if self.mlflow_admin_password else None
        if password is not None and (is_placeholder(password) or len(password) < MIN_PASSWORD_CHARS):
            raise ValueError(f"QWENVL_MLFLOW_ADMIN_PASSWORD: production mode needs a real password (>= "
                             f"{MIN_PASSWORD_CHARS} chars, not a placeholder)")
        db_password = urlsplit(self.database_url).password if self.database_url else None
        if db_password is not None and is_placeholder(db_password):
            raise ValueError("QWENVL_DATABASE_URL: production mode refuses a placeholder database password")
        return self

    @model_validator(mode="after")
    def _serving_and_mlflow_consistent(self) -> Settings:
        if self.serve_max_replicas is not None and self.serve_max_replicas < self.serve_replicas:
            raise ValueError("QWENVL_SERVE_MAX_REPLICAS must be >= QWENVL_SERVE_REPLICAS")
        if self.serve_decode_graphs == "cuda" and self.serve_num_gpus <= 0:
            raise ValueError("QWENVL_SERVE_DECODE_GRAPHS=cuda needs GPU replicas (QWENVL_SERVE_NUM_GPUS > 0)")
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
