"""``auto`` hyperparameters: the training defaults kept with a base model, and the rule that turns a job's ``auto``
values into numbers from those defaults and the training file's statistics (docs/hyperparameters.md).

Owns three things:

- ``TrainingDefaults``: what a base model needs to learn with LoRA (learning rate and the global batch it was
  tuned at, per-worker batch, epochs, the least number of optimizer steps, the tokens one forward pass may hold,
  LoRA rank / alpha / dropout / targets), each with its source. A model directory carries them in
  ``training_defaults.json`` (``materialize`` writes it from the preset's ``training`` field); an official
  checkpoint without that file gets its family's defaults (``FAMILY_DEFAULTS``, keyed by ``config.json``'s
  ``model_type``); a directory the process cannot read gets ``PLATFORM_DEFAULTS`` (v1's official recipe, which
  is also ``FineTuneJobSpec``'s).
- ``DataStats``: the size and token statistics of a training file, from its validation report (token counts are
  estimated from images and turns when the report was made without a tokenizer, as uploads are).
- ``resolve``: the rule itself, a pure function from (what the request left ``auto``, defaults, statistics, the
  number of workers, the tenant's caps) to values and a one-line reason per value.

Torch-free (json, math, pydantic), so the API process and the scheduler import it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qwenvl_core.errors import ConfigError

DEFAULTS_FILE = "training_defaults.json"
# FineTuneJobSpec's hyperparameters.learning_rate default: a job's learning_rate_multiplier multiplies it, so the
# auto multiplier is (the base model's learning rate) / this.
SPEC_LEARNING_RATE = 1e-5
MAX_MULTIPLIER = 1000.0  # the API's bound on learning_rate_multiplier
MAX_BATCH_SIZE = 1024
MAX_EPOCHS = 50  # the API's bound on n_epochs
# OpenAI's published epoch rule (openai-cookbook, "Data preparation and analysis for chat model fine-tuning"):
# 3 epochs, raised so that at least 100 examples are seen (at most 25 epochs), lowered so that at most 25,000 are.
OPENAI_MIN_TARGET_EXAMPLES = 100
OPENAI_MAX_TARGET_EXAMPLES = 25_000
OPENAI_MAX_DEFAULT_EPOCHS = 25
MIN_STEPS_PER_EPOCH = 10  # auto batch_size shrinks for small files so that an epoch has at least this many steps
TEXT_TOKENS_PER_TURN = 64  # token allowance per turn when the report has no token counts (upload validation)


class LoraDefaults(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(ge=1, le=1024)
    alpha: float = Field(gt=0)
    dropout: float = Field(ge=0.0, lt=1.0)
    targets: str = Field(description="A LoRA target preset name (official, attention, all-linear).")


class TrainingDefaults(BaseModel):
    """What a base model needs to learn with LoRA; ``training_defaults.json`` in its directory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    learning_rate: float = Field(gt=0, le=1.0, description="Peak LoRA learning rate at reference_batch_size.")
    reference_batch_size: int = Field(ge=1, description="Global batch (all workers) learning_rate was tuned at.")
    batch_size: int = Field(ge=1, le=MAX_BATCH_SIZE, description="Per-worker batch when the data allows it.")
    target_epochs: int = Field(ge=1, le=MAX_EPOCHS, description="Epochs before the data-size adjustments.")
    min_steps: int = Field(0, ge=0, description="Optimizer steps the model needs at least (0: no minimum).")
    micro_batch_tokens: int = Field(ge=1, description="Tokens one forward pass per worker may hold (memory).")
    lora: LoraDefaults
    source: str = Field("", description="Where the numbers come from.")

    def write(self, model_dir: str | Path) -> Path:
        """Write ``training_defaults.json`` into ``model_dir``."""
        path = Path(model_dir) / DEFAULTS_FILE
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=1) + "\n", encoding="utf-8")
        return path


# Qwen-VL v1: QwenLM/Qwen-VL finetune/finetune_lora_single_gpu.sh + finetune.py (lr 1e-5, batch 1 x accumulation 8
# on one GPU, 5 epochs, model_max_length 2048, LoRA r 64 / alpha 16 / dropout 0.05 on c_attn, attn.c_proj, w1, w2).
V1_OFFICIAL = TrainingDefaults(
    learning_rate=1e-5, reference_batch_size=8, batch_size=8, target_epochs=5, min_steps=0, micro_batch_tokens=2048,
    lora=LoraDefaults(r=64, alpha=16.0, dropout=0.05, targets="official"),
    source="QwenLM/Qwen-VL finetune.py and finetune/finetune_lora_single_gpu.sh",
)
# Qwen2-VL, Qwen2.5-VL, Qwen3-VL: hiyouga/LLaMA-Factory examples/train_lora/qwen2_5vl_lora_sft.yaml (lr 1e-4,
# batch 1 x accumulation 8, 3 epochs, cutoff_len 2048, lora_rank 8, lora_target all; lora_alpha defaults to
# 2 x rank and lora_dropout to 0 in its finetuning_args).
LLAMA_FACTORY_LORA = TrainingDefaults(
    learning_rate=1e-4, reference_batch_size=8, batch_size=8, target_epochs=3, min_steps=0, micro_batch_tokens=2048,
    lora=LoraDefaults(r=8, alpha=16.0, dropout=0.0, targets="all-linear"),
    source="hiyouga/LLaMA-Factory examples/train_lora/qwen2_5vl_lora_sft.yaml (LoRA defaults of its "
    "finetuning_args)",
)
# A randomly initialised tiny model (hidden 64): measured with the demo (600 colour / grounding samples, 2 workers
# x batch 8, 1,000 steps; README "What works today"): it needs a learning rate 1,000 x the official one and about
# 1,000 optimizer steps before its answers depend on the picture.
RANDOM_TINY = TrainingDefaults(
    learning_rate=1e-2, reference_batch_size=16, batch_size=8, target_epochs=3, min_steps=1000,
    micro_batch_tokens=4096, lora=LoraDefaults(r=16, alpha=32.0, dropout=0.0, targets="all-linear"),
    source="measured: qwen-vl-tiny learns the demo's colour questions with these (qwenvl demo)",
)
# The pretrained tiny base (qwen-vl-tiny-seeing, docs/pretraining.md): measured with bench/auto_tiny.py on the demo's
# colour / grounding and counting data (docs/hyperparameters.md): at 3e-3 (batch 8) and about 600 steps it matches the
# demo's hand-tuned settings (1e-2, 1,000 steps) on colour and boxes and beats them on counting; at 1e-3 and 300 steps
# its boxes stay at chance.
PRETRAINED_TINY = TrainingDefaults(
    learning_rate=3e-3, reference_batch_size=8, batch_size=8, target_epochs=3, min_steps=600,
    micro_batch_tokens=4096, lora=LoraDefaults(r=16, alpha=32.0, dropout=0.0, targets="all-linear"),
    source="measured: qwen-vl-tiny-seeing with bench/auto_tiny.py (docs/hyperparameters.md)",
)
# The other families' pretrained tiny bases (qwenvl_core.pretrain.families; family name -> the defaults shipped in
# <family>-tiny-seeing): qwen-vl-tiny-seeing's values (same LM size, same pretraining), measured on qwen2.5-vl's and
# qwen3-vl's with the demo through the service (docs/pretraining.md sections 6 and 7).
_MEASURED_ON_FAMILY_BASE = {  # family -> where its tiny base's defaults were measured (if they were)
    "qwen2.5-vl": "measured: qwen2.5-vl-tiny-seeing with `qwenvl demo --model qwen2.5-vl-tiny-seeing` "
                  "(docs/pretraining.md)",
    "qwen3-vl": "measured: qwen3-vl-tiny-seeing with `bench/demo_tasks.py --tasks line colours --model "
                "qwen3-vl-tiny-seeing` (docs/pretraining.md section 7)",
}
PRETRAINED_TINY_FAMILIES: dict[str, TrainingDefaults] = {
    name: PRETRAINED_TINY.model_copy(update={"source": _MEASURED_ON_FAMILY_BASE.get(
        name, f"qwen-vl-tiny-seeing's measured defaults, not re-measured on {name}-tiny-seeing (docs/pretraining.md)")})
    for name in ("qwen2.5-vl", "qwen3-vl", "qwen2-vl")
}
FAMILY_DEFAULTS: dict[str, TrainingDefaults] = {  # config.json model_type -> defaults of official checkpoints
    "qwen": V1_OFFICIAL,
    "qwen2_vl": LLAMA_FACTORY_LORA,
    "qwen2_5_vl": LLAMA_FACTORY_LORA,
    "qwen3_vl": LLAMA_FACTORY_LORA,
}
PLATFORM_DEFAULTS = V1_OFFICIAL


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not readable JSON: {exc}") from None


def base_defaults(model_dir: str | Path) -> tuple[TrainingDefaults, str]:
    """The training defaults of a base model directory and where they came from (for the job's event).

    ``training_defaults.json`` when present (``ConfigError`` naming the file when it is broken); else the family's
    from ``config.json``'s ``model_type``; else (no readable directory, unknown family) ``PLATFORM_DEFAULTS``."""
    root = Path(model_dir)
    path = root / DEFAULTS_FILE
    if path.is_file():
        try:
            return TrainingDefaults.model_validate(_read_json(path)), DEFAULTS_FILE
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ConfigError(f"{path}: {where}: {first['msg']}") from None
    config_path = root / "config.json"
    if config_path.is_file():
        config = _read_json(config_path)
        model_type = config.get("model_type") if isinstance(config, dict) else None
        if model_type in FAMILY_DEFAULTS:
            return FAMILY_DEFAULTS[model_type], f"the {model_type} family's defaults"
    return PLATFORM_DEFAULTS, "the platform's defaults"


def image_tokens(model_dir: str | Path, max_pixels: int | None = None) -> int:
    """Tokens one image takes at most in the base model's prompts, read from its files without torch: v1, the
    adapter's query count (``visual.n_queries``) + <img> </img>; the dynamic-resolution families, the pixel budget
    (``max_pixels``, the job's or the processor's) over one merged patch, + the vision start / end tokens.
    Unknown directories: v1's official 256 queries + 2."""
    from qwenvl_core.models.pixel_budget import directory_budget

    root = Path(model_dir)
    config_path = root / "config.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    visual = config.get("visual") if isinstance(config, dict) else None
    if isinstance(visual, dict) and isinstance(visual.get("n_queries"), int):
        return int(visual["n_queries"]) + 2
    budget = directory_budget(root) if root.is_dir() else None
    if budget is not None:
        return (max_pixels or budget.max_pixels) // (budget.factor * budget.factor) + 2
    return 256 + 2


@dataclass(frozen=True)
class DataStats:
    """What the rule needs to know about a training file."""

    samples: int
    tokens_per_sample: int  # the longest sample when the report has token counts, else an estimate of the mean
    tokens_counted: bool  # False: estimated from images and turns

    @classmethod
    def from_report(cls, stats: dict[str, Any] | None, tokens_per_image: int) -> DataStats | None:
        """From a validation report's ``stats``; None when it has no sample count (a file stored unvalidated)."""
        if not stats or not isinstance(stats.get("samples"), int) or stats["samples"] < 1:
            return None
        n = int(stats["samples"])
        if isinstance(stats.get("max_length"), int):
            return cls(n, int(stats["max_length"]), True)
        per_sample = (int(stats.get("images") or 0) * tokens_per_image
                      + int(stats.get("turns") or 0) * TEXT_TOKENS_PER_TURN) / n
        return cls(n, max(1, math.ceil(per_sample)), False)


@dataclass(frozen=True)
class Requested:
    """A job's values; None means ``auto``."""

    n_epochs: int | None = None
    batch_size: int | None = None
    learning_rate_multiplier: float | None = None
    micro_batch_size: int | None = None
    max_steps: int | None = None
    workers: int = 1


@dataclass(frozen=True)
class Caps:
    """The tenant's caps that bound auto values (auto never asks for more than the tenant may)."""

    max_epochs: int = MAX_EPOCHS
    max_micro_batch_size: int = MAX_BATCH_SIZE
    max_lora_rank: int = 1024


NO_CAPS = Caps()


@dataclass(frozen=True)
class Resolution:
    """Resolved values (``n_epochs``, ``batch_size``, ``learning_rate_multiplier``, ``micro_batch_size``) and why."""

    values: dict[str, Any]
    reasons: dict[str, str] = field(default_factory=dict)  # only for the values that were auto

    def message(self) -> str:
        """The job event: ``auto: n_epochs 28 (...), batch_size 8 (...)``."""
        return "auto: " + ", ".join(f"{k} {_show(self.values[k])} ({why})" for k, why in self.reasons.items())


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _pow2_floor(x: float) -> int:
    return 1 << max(0, math.floor(math.log2(x))) if x >= 1 else 1


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, max(1, limit)) + 1) if n % d == 0)


def _batch(req: Requested, d: TrainingDefaults, data: DataStats | None) -> tuple[int, str | None]:
    if req.batch_size is not None:
        return req.batch_size, None
    batch, why = d.batch_size, f"the base model's {d.batch_size}"
    if data is not None:
        room = _pow2_floor(data.samples / (MIN_STEPS_PER_EPOCH * req.workers))
        if room < batch:
            batch = room
            why = (f"{data.samples} samples on {req.workers} worker(s): at most {room} for {MIN_STEPS_PER_EPOCH} "
                   f"steps per epoch; the base model's is {d.batch_size}")
    if req.micro_batch_size is not None and batch % req.micro_batch_size:
        batch = min(MAX_BATCH_SIZE, max(1, batch // req.micro_batch_size) * req.micro_batch_size)
        why += f"; a multiple of micro_batch_size {req.micro_batch_size}"
    return batch, why


def _micro(req: Requested, d: TrainingDefaults, data: DataStats | None, batch: int, caps: Caps
           ) -> tuple[int, str | None]:
    if req.micro_batch_size is not None:
        return req.micro_batch_size, None
    if data is None:
        return 1, "no token statistics: one sample per forward pass"
    fit = max(1, d.micro_batch_tokens // data.tokens_per_sample)
    micro = _largest_divisor(batch, min(fit, caps.max_micro_batch_size))
    what = "longest sample" if data.tokens_counted else "about"
    why = (f"{what} {data.tokens_per_sample} tokens per sample, {d.micro_batch_tokens} tokens per forward pass: "
           f"{fit} fit; the largest divisor of batch_size {batch} up to that")
    if fit > caps.max_micro_batch_size:
        why += f" and the cap {caps.max_micro_batch_size}"
    return micro, why


def _epochs(req: Requested, d: TrainingDefaults, data: DataStats | None, batch: int, caps: Caps
            ) -> tuple[int, str | None]:
    if req.n_epochs is not None:
        return req.n_epochs, None
    if data is None:
        epochs, why = d.target_epochs, "no sample count: the base model's target"
    else:
        n, epochs = data.samples, d.target_epochs
        why = f"{n} samples: the base model's target {d.target_epochs}"
        if n * epochs < OPENAI_MIN_TARGET_EXAMPLES:
            epochs = min(OPENAI_MAX_DEFAULT_EPOCHS, OPENAI_MIN_TARGET_EXAMPLES // n)
            why = f"{n} samples: at least {OPENAI_MIN_TARGET_EXAMPLES} samples seen"
        elif n * epochs > OPENAI_MAX_TARGET_EXAMPLES:
            epochs = max(1, OPENAI_MAX_TARGET_EXAMPLES // n)
            why = f"{n} samples: at most {OPENAI_MAX_TARGET_EXAMPLES} samples seen"
        steps_per_epoch = max(1, n // (batch * req.workers))
        if d.min_steps and epochs * steps_per_epoch < d.min_steps:
            epochs = max(epochs, round(d.min_steps / steps_per_epoch))  # the whole epochs nearest to min_steps
            why = (f"{n} samples, {steps_per_epoch} steps per epoch: the base model needs about {d.min_steps} "
                   "steps")
    limit = min(MAX_EPOCHS, caps.max_epochs)
    if epochs > limit:
        epochs, why = limit, f"{why}; capped at {limit}"
    epochs = max(1, epochs)
    if req.max_steps is not None:
        why += f"; max_steps {req.max_steps} ends the run first if sooner"
    return epochs, why


def _multiplier(req: Requested, d: TrainingDefaults, batch: int) -> tuple[float, str | None]:
    if req.learning_rate_multiplier is not None:
        return req.learning_rate_multiplier, None
    global_batch = batch * req.workers
    lr = d.learning_rate * math.sqrt(global_batch / d.reference_batch_size)
    multiplier = float(f"{min(MAX_MULTIPLIER, lr / SPEC_LEARNING_RATE):.4g}")
    why = (f"learning rate {multiplier * SPEC_LEARNING_RATE:.3g}: the base model's {d.learning_rate:g} at batch "
           f"{d.reference_batch_size}, x sqrt({global_batch}/{d.reference_batch_size}) for batch {global_batch}")
    if lr / SPEC_LEARNING_RATE > MAX_MULTIPLIER:
        why += f", capped at {MAX_MULTIPLIER:g}"
    return multiplier, why


def resolve(req: Requested, defaults: TrainingDefaults, data: DataStats | None, caps: Caps = NO_CAPS) -> Resolution:
    """The rule (docs/hyperparameters.md). Explicit values are kept as they are; every ``auto`` one is decided:

    1. ``batch_size``: the base model's, shrunk (to a power of two) for small files so that an epoch keeps at least
       ``MIN_STEPS_PER_EPOCH`` optimizer steps over all workers; a multiple of an explicit ``micro_batch_size``.
    2. ``micro_batch_size``: the largest divisor of ``batch_size`` whose samples fit the base model's
       ``micro_batch_tokens`` (longest sample, or an estimate) and the tenant's cap.
    3. ``n_epochs``: OpenAI's rule around the base model's ``target_epochs``, raised to the whole number of epochs
       nearest to the base model's ``min_steps`` optimizer steps; at most 50 and the tenant's cap.
    4. ``learning_rate_multiplier``: the base model's learning rate, scaled by the square root of the global batch
       over the batch it was tuned at (square-root scaling for Adam), over the spec's 1e-5; at most 1000.
    """
    batch, batch_why = _batch(req, defaults, data)
    micro, micro_why = _micro(req, defaults, data, batch, caps)
    epochs, epochs_why = _epochs(req, defaults, data, batch, caps)
    multiplier, lr_why = _multiplier(req, defaults, batch)
    values = {"n_epochs": epochs, "batch_size": batch, "learning_rate_multiplier": multiplier,
              "micro_batch_size": micro}
    reasons = {k: why for k, why in (("n_epochs", epochs_why), ("batch_size", batch_why),
                                     ("micro_batch_size", micro_why), ("learning_rate_multiplier", lr_why))
               if why is not None}
    return Resolution(values, reasons)


def resolve_lora(given: dict[str, Any], defaults: TrainingDefaults, caps: Caps = NO_CAPS) -> tuple[dict[str, Any],
                                                                                                  dict[str, str]]:
    """A request's ``lora`` fields with the ones it left unset (or ``r: "auto"``) taken from the base model:
    ``r`` (at most the tenant's cap), ``alpha`` (the base model's alpha / r ratio times the rank used),
    ``dropout`` and ``targets`` (not when ``freeze_language_model``, which takes none). (fields, reasons)."""
    d, out, reasons = defaults.lora, dict(given), {}
    if out.get("r", "auto") == "auto":
        out["r"] = min(d.r, caps.max_lora_rank)
        reasons["lora.r"] = f"the base model's {d.r}" + (f", capped at {caps.max_lora_rank}"
                                                         if d.r > caps.max_lora_rank else "")
    if "alpha" not in out:
        out["alpha"] = d.alpha * out["r"] / d.r
        reasons["lora.alpha"] = f"the base model's alpha / r = {d.alpha / d.r:g}"
    if "dropout" not in out:
        out["dropout"] = d.dropout
        reasons["lora.dropout"] = "the base model's"
    if "targets" not in out and not out.get("freeze_language_model"):
        out["targets"] = d.targets
        reasons["lora.targets"] = "the base model's"
    return out, reasons
