"""LoRA / Q-LoRA fine-tuning of Qwen-VL: the plain-PyTorch loop and its parts (no Ray, no MLflow here).

Modules: ``lora`` (targets, Q-LoRA, peft), ``optim`` (AdamW, schedules), ``data_loading`` (job files, global
batch plan), ``strategies`` (DDP / DeepSpeed ZeRO engines), ``checkpoint`` (exact-resume checkpoints, adapter
directory), ``evaluate`` (loss, token accuracy, exact match, grounding), ``hooks`` (progress / metrics /
checkpoint / cancel interfaces and run-directory implementations), ``loop`` (``Trainer``).
"""

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
from qwenvl_core.training.loop import Trainer, TrainResult

__all__ = [
    "CancelSignal", "CheckpointReporter", "EventProgress", "Hooks", "MetricSink", "ProgressSink",
    "RecordingSink", "RunDirCancel", "RunDirEvents", "TrainResult", "Trainer",
]
