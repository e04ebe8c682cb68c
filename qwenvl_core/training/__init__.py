"""LoRA / Q-LoRA fine-tuning of Qwen-VL: the plain-PyTorch loop and its parts (no Ray, no MLflow here).

Modules: ``lora`` (targets, Q-LoRA, peft), ``optim`` (AdamW, schedules), ``data_loading`` (job files, global
batch plan), ``strategies`` (DDP / DeepSpeed ZeRO engines), ``checkpoint`` (exact-resume checkpoints, adapter
directory), ``evaluate`` (loss, token accuracy, exact match, grounding), ``hooks`` (progress / metrics /
checkpoint / cancel interfaces and run-directory implementations), ``objectives`` (what a micro-step optimises),
``dpo`` (preference optimisation), ``feature_cache`` (frozen vision features reused), ``results`` (checkpoint
metrics and ``results.csv``), ``loop`` (``Trainer``).

``Trainer`` and ``TrainResult`` are imported on first use (PEP 562): the loop pulls in peft, transformers and
bitsandbytes (about 7 s of imports on a 2-core machine), which a job's driver and the service only need the hooks
of, never the loop.
"""

from typing import TYPE_CHECKING, Any

from qwenvl_core.training.hooks import (
    CancelSignal,
    CheckpointReporter,
    EventProgress,
    Hooks,
    MetricSink,
    ProgressSink,
    RecordingSink,
    RunDirCancel,
    RunDirEvents,
)

if TYPE_CHECKING:
    from qwenvl_core.training.loop import Trainer, TrainResult

__all__ = [
    "CancelSignal", "CheckpointReporter", "EventProgress", "Hooks", "MetricSink", "ProgressSink",
    "RecordingSink", "RunDirCancel", "RunDirEvents", "TrainResult", "Trainer",
]


def __getattr__(name: str) -> Any:
    if name in ("Trainer", "TrainResult"):
        from qwenvl_core.training import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
