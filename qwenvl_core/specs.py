"""Torch-free contracts shared by every layer: what a fine-tuning job is, and what it reports.

``FineTuneJobSpec`` is the one description of a job. The REST API builds it from a request, the scheduler
stores it, the Ray workflow runs it, and ``qwenvl finetune`` builds it from flags or a YAML file. Each field is
documented once, here; defaults are the official Qwen-VL fine-tuning recipe (finetune.py and its scripts):
LoRA r 64 / alpha 16 / dropout 0.05 on ``c_attn``, ``attn.c_proj``, ``w1``, ``w2``; AdamW lr 1e-5,
betas (0.9, 0.95), weight decay 0.1; cosine schedule with 1% warm-up; max length 2048.

``JobEvent`` is what a running job reports (progress, metrics, checkpoints, its final state). Events are
written through an event sink (see ``qwenvl_core.training.hooks``) and read by the service.

This module imports only pydantic, so the API process can use it without torch.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


class _Spec(BaseModel):
    """Strict base: unknown fields are errors (a typo must not silently fall back to a default), and so is an
    infinite or NaN number in any float field (``1e309`` or ``Infinity`` in a request, ``.inf`` in a YAML file):
    no setting means anything with it. ``Progress`` alone takes them: it reports measurements (a diverged loss)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TargetPreset(StrEnum):
    """Named LoRA target sets, resolved per model family to language-model modules (never the vision tower's):
    v1 / Qwen2-VL, Qwen2.5-VL, Qwen3-VL (``docs/architecture.md``, "Training the transformers families")."""

    OFFICIAL = "official"  # v1: c_attn, attn.c_proj, w1, w2 (finetune.py); Qwen2/2.5/3-VL: all LM projections
    ATTENTION = "attention"  # v1: c_attn, attn.c_proj; Qwen2/2.5/3-VL: q_proj, k_proj, v_proj, o_proj
    ALL_LINEAR = "all-linear"  # v1: official + mlp.c_proj; Qwen2/2.5/3-VL: q/k/v/o_proj + gate/up/down_proj


ModuleName = Annotated[str, Field(min_length=1, max_length=256)]  # a module-name suffix (an empty one matches nothing)


class LoraSpec(_Spec):
    r: int = Field(64, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    targets: TargetPreset | list[ModuleName] = Field(
        TargetPreset.OFFICIAL, description="A named preset or an explicit list of module-name suffixes."
    )
    train_adapter: bool = Field(
        False, description="Also train the vision-language adapter fully and save it with the LoRA weights (v1: "
        "attn_pool, ln_post; Qwen2/2.5-VL: the merger; Qwen3-VL: the merger and the DeepStack mergers)."
    )
    vision_lora: bool = Field(
        False, description="Also put LoRA (same r / alpha / dropout) on every linear layer of the vision encoder "
        "(attention and MLP of its blocks; not the adapter, which train_adapter trains fully)."
    )
    freeze_language_model: bool = Field(
        False, description="No LoRA on the language model: only the adapter (train_adapter) and / or the vision "
        "encoder's LoRA (vision_lora) train. lora.targets must then be left unset."
    )
    modules_to_save: list[ModuleName] | None = Field(
        None,
        description="Modules trained fully and saved with the adapter, e.g. ['wte', 'lm_head'] for base "
        "(non-chat) models that must learn the ChatML special tokens.",
    )

    @field_validator("targets", mode="before")
    @classmethod
    def _no_empty_target(cls, v: Any) -> Any:  # (checked before the union: its error would be the preset's)
        if isinstance(v, list) and "" in v:
            raise ValueError(f"item {v.index('')} is empty: a module-name suffix names a module (e.g. 'q_proj')")
        return v

    @model_validator(mode="after")
    def _targets_not_empty(self) -> LoraSpec:
        if isinstance(self.targets, list) and not self.targets:
            raise ValueError("lora.targets: give a preset name or at least one module name")
        if self.freeze_language_model and self.targets != TargetPreset.OFFICIAL:
            raise ValueError("lora.targets: the language model is frozen (lora.freeze_language_model), so it takes "
                             "no LoRA targets; leave lora.targets unset")
        if self.freeze_language_model and not (self.train_adapter or self.vision_lora):
            raise ValueError("lora.freeze_language_model: nothing would train; also set lora.train_adapter "
                             "and / or lora.vision_lora")
        return self


class Quantization(StrEnum):
    NONE = "none"
    NF4 = "4bit"  # Q-LoRA: the LM in 4-bit NF4 (bitsandbytes, double quantisation); vision kept unquantised


class Precision(StrEnum):
    FP32 = "fp32"
    BF16 = "bf16"


class LossMask(StrEnum):
    OFFICIAL = "official"  # exactly finetune.py: assistant content + every <|im_start|>, <|im_end|>, "\n"
    ASSISTANT_ONLY = "assistant_only"  # only assistant content + <|im_end|>


class LengthPolicy(StrEnum):
    REJECT = "reject"  # a sample longer than max_length is an error
    TRUNCATE = "truncate"  # keep the longest prefix of whole turns that fits (never cuts an image span)


# Bounds of a job's min_pixels / max_pixels: one 28x28 merged patch .. 4096x4096 (Qwen3-VL's own max_pixels; the
# base model's processor may refuse less, e.g. Qwen3-VL's 32x32 patch: qwenvl_core.models.pixel_budget).
MIN_PIXELS_BOUND = 28 * 28
MAX_PIXELS_BOUND = 4096 * 4096


class Hyperparameters(_Spec):
    n_epochs: int = Field(1, ge=1, le=100, description="Passes over the training file.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = Field(1, ge=1, le=1024, description="Samples per optimizer step per worker (micro batch x accumulation).")
    micro_batch_size: int = Field(1, ge=1, le=1024, description="Samples per forward pass per worker.")
    learning_rate: float = Field(1e-5, gt=0, le=1.0, description="Peak learning rate (official 1e-5).")
    learning_rate_multiplier: float = Field(1.0, gt=0, le=1000.0, description="OpenAI-style multiplier on learning_rate.")
    weight_decay: float = Field(0.1, ge=0.0, le=1.0)
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.95, ge=0.0, lt=1.0)
    adam_epsilon: float = Field(1e-8, gt=0)
    warmup_ratio: float = Field(0.01, ge=0.0, lt=1.0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = Field(1.0, gt=0)
    max_length: int = Field(2048, ge=32, le=32768, description="Longest sample in tokens (images count 258 each at full size).")
    length_policy: LengthPolicy = Field(LengthPolicy.REJECT, description="What to do with longer samples.")
    min_pixels: int | None = Field(
        None, ge=MIN_PIXELS_BOUND, le=MAX_PIXELS_BOUND, description="Qwen2-VL / Qwen2.5-VL / Qwen3-VL: smallest "
        "image area after the processor's resize (smaller images are enlarged); None: the base model's "
        "preprocessor_config.json. Qwen-VL v1 takes none (fixed image size).")
    max_pixels: int | None = Field(
        None, ge=MIN_PIXELS_BOUND, le=MAX_PIXELS_BOUND, description="Qwen2-VL / Qwen2.5-VL / Qwen3-VL: largest "
        "image area after the processor's resize (larger images are shrunk, so fewer image tokens: the cure for "
        "out-of-memory on large images); None: the base model's preprocessor_config.json.")
    loss_mask: LossMask = LossMask.OFFICIAL
    packing: bool = Field(False, description="Pack several samples per row (they never attend to each other).")
    group_by_length: bool = Field(True, description="Batch samples of similar length to reduce padding.")
    precision: Precision = Precision.FP32
    gradient_checkpointing: bool = False

    @field_validator("max_pixels")
    @classmethod
    def _pixel_range(cls, value: int | None, info: ValidationInfo) -> int | None:
        low = info.data.get("min_pixels")
        if value is not None and low is not None and low > value:
            raise ValueError(f"min_pixels ({low}) must not exceed max_pixels ({value})")
        return value

    @model_validator(mode="after")
    def _accumulation_divides(self) -> Hyperparameters:
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})"
            )
        return self

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.batch_size // self.micro_batch_size

    @property
    def peak_learning_rate(self) -> float:
        return self.learning_rate * self.learning_rate_multiplier


class EarlyStopping(_Spec):
    patience: int = Field(3, ge=1, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0.0, description="Smallest validation-loss decrease that counts.")


class EvalSpec(_Spec):
    every_n_steps: int | None = Field(None, ge=1, description="Evaluate every N optimizer steps (always at the end).")
    max_samples: int | None = Field(None, ge=1, description="Evaluate on at most this many validation samples.")
    max_new_tokens: int = Field(32, ge=1, le=1024, description="Generation budget for task metrics.")
    task_metrics: bool = Field(True, description="Exact match / grounding IoU>=0.5 on short answers.")
    compare_base: bool = Field(True, description="At the end, also evaluate the base model on the same data.")
    early_stopping: EarlyStopping | None = None


class Strategy(StrEnum):
    DDP = "ddp"
    ZERO2 = "zero2"
    ZERO3 = "zero3"


class ComputeSpec(_Spec):
    num_workers: int = Field(1, ge=1, le=1024)
    gpus_per_worker: float = Field(0.0, ge=0.0, le=16.0)
    cpus_per_worker: float = Field(1.0, gt=0.0, le=256.0)
    strategy: Strategy = Strategy.DDP
    max_failures: int = Field(2, ge=0, le=100, description="Worker-group restarts Ray Train may make.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray places the workers on nodes (SPREAD puts them on different nodes)."
    )
    image_feature_cache_mb: int = Field(
        1024, ge=0, le=1 << 20, description="CPU memory per worker for the frozen vision tower's output per image, "
        "reused in later epochs (LoRA on the LM: the tower does not change); 0 disables.")


class CheckpointSpec(_Spec):
    every_n_steps: int = Field(50, ge=1)
    keep: int | None = Field(3, ge=1, description="Checkpoints kept (None keeps all).")


class TrackedDataset(_Spec):
    """A data file as the run's MLflow dataset input (what was trained on)."""

    context: Literal["training", "validation"]
    name: str = Field(..., min_length=1, max_length=500, description="The API's file id (basename for the CLI).")
    sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$", description="The file's sha256 (the dataset digest).")
    uri: str = Field(..., min_length=1, description="Where the file is stored (the dataset source).")


class TrackingSpec(_Spec):
    tracking_uri: str | None = Field(None, description="MLflow tracking server; None disables tracking.")
    experiment: str = Field("default", description="MLflow experiment (one per tenant in the service).")
    registered_model: str | None = Field(None, description="Model Registry name for the adapter.")
    tags: dict[str, str] = Field(default_factory=dict)
    run_name: str | None = Field(None, max_length=256, description="MLflow run name (default: the job id).")
    datasets: list[TrackedDataset] | None = Field(
        None, description="Dataset inputs of the run; None: the train/validation files, hashed by the tracker.")


# The MLflow experiment tag that marks an experiment as model training ("Machine learning" in MLflow 3.17's UI
# bundle) rather than GenAI; the service and the tracker set it on every experiment. MLflow 3.17.2's UI itself
# picks its view from its GenAI / Model training switch (see service.mlflow_tenants.experiment_ui_url).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND_MODEL_TRAINING = "custom_model_development"


def tenant_experiment_name(tenant_id: str, experiment: str = "default") -> str:
    """The MLflow experiment of a tenant: ``<tenant>/<experiment>`` (one per tenant; ``local/default`` for CLI)."""
    return f"{tenant_id}/{experiment}"


# DPO's beta bounds (the API answers 400 naming ``method.dpo.hyperparameters.beta`` outside them) and its default
# ("auto"): 0.1, the value of the DPO paper's experiments and TRL's DPOConfig.
DPO_BETA_MIN, DPO_BETA_MAX, DPO_BETA_DEFAULT = 0.0, 2.0, 0.1


class DpoSpec(_Spec):
    beta: float = Field(DPO_BETA_DEFAULT, gt=DPO_BETA_MIN, le=DPO_BETA_MAX,
                        description="Strength of the pull towards the reference model (the base, adapter disabled) "
                        "in the DPO loss -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))).")


class MethodSpec(_Spec):
    """How the adapter is trained: ``supervised`` (next-token loss on the training conversations) or ``dpo``
    (Direct Preference Optimization on preference pairs; the training file is in OpenAI's preference format)."""

    type: Literal["supervised", "dpo"] = "supervised"
    dpo: DpoSpec = Field(default_factory=DpoSpec, description="DPO settings (used when type is 'dpo').")


class FineTuneJobSpec(_Spec):
    """Everything needed to run one fine-tune, independent of how it was requested."""

    job_id: str = Field(..., min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    tenant_id: str = Field("local", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    base_model: str = Field(..., description="Local directory (or storage URI) of the base model.")
    train_file: str = Field(..., description="Training data: a .jsonl/.json file or a .zip/.tar.gz bundle.")
    validation_file: str | None = None
    output_uri: str = Field(..., description="Where the run lives: checkpoints/, adapter/, events/ (path or s3://).")
    seed: int = Field(42, ge=0, le=2**31 - 1)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    init_adapter: str | None = Field(
        None, description="Continued training: a PEFT adapter directory (local path or storage URI, e.g. a finished "
        "job's adapter/ or a checkpoint's adapter/) whose weights the new adapter starts from instead of LoRA's "
        "initialisation; it must have been trained with this lora configuration on this base model.")
    quantization: Quantization = Quantization.NONE
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    evaluation: EvalSpec = Field(default_factory=EvalSpec)
    compute: ComputeSpec = Field(default_factory=ComputeSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    method: MethodSpec = Field(default_factory=MethodSpec)

    @model_validator(mode="after")
    def _compatible(self) -> FineTuneJobSpec:
        if self.method.type == "dpo" and self.hyperparameters.packing:
            raise ValueError("hyperparameters.packing cannot be combined with method 'dpo' (each preference pair "
                             "is two rows of its own)")
        if self.quantization is Quantization.NF4 and self.compute.strategy is Strategy.ZERO3:
            raise ValueError("quantization '4bit' (Q-LoRA) cannot be combined with strategy 'zero3'")
        if self.lora.modules_to_save and self.compute.strategy is Strategy.ZERO3:
            raise ValueError("lora.modules_to_save cannot be combined with strategy 'zero3'")
        return self


class JobState(StrEnum):
    """OpenAI's job statuses."""

    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class Progress(_Spec):
    """A training step as measured: a diverged run's loss is NaN or infinite and is still reported."""

    model_config = ConfigDict(allow_inf_nan=True)

    step: int
    total_steps: int
    epoch: float
    loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    samples_per_second: float | None = None
    eta_seconds: float | None = None
    trained_tokens: int = 0
    metrics: dict[str, float] = Field(default_factory=dict, description="The training method's own metrics "
                                      "of the step, e.g. DPO's reward_margin and reward_accuracy.")


class JobEvent(_Spec):
    """One thing a job reports. ``seq`` orders events of a job; readers ingest each seq once.

    A ``metrics`` event's ``data`` holds the ``Progress`` fields themselves (step, total_steps, loss, ...), which
    the service copies into the job's ``progress``.
    """

    seq: int = Field(..., ge=0)
    created_at: float = Field(..., description="Unix time in seconds.")
    level: Literal["info", "warn", "error"] = "info"
    type: Literal["message", "metrics", "checkpoint", "state"] = "message"
    message: str
    data: dict[str, Any] = Field(default_factory=dict)
