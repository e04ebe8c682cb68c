"""A job's driver stays light (``workflows.finetune``): it imports Ray Train and the run-directory hooks, never the
training loop (peft, transformers, bitsandbytes: seconds of imports that only the workers need), and it turns Ray
Train's preemption watcher off through the variable Ray Train still reads and passes on to its controller."""

from __future__ import annotations

import subprocess
import sys

from ray.train.v2._internal.constants import ENABLE_PREEMPTION_WATCHER_ENV_VAR, ENV_VARS_TO_PROPAGATE

from workflows.finetune import PREEMPTION_WATCHER

HEAVY = ("peft", "transformers", "bitsandbytes", "deepspeed", "mlflow", "qwenvl_core.training.loop")


def test_the_driver_imports_no_training_library() -> None:
    code = f"import sys, workflows.finetune; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_the_preemption_watcher_setting_is_the_one_ray_train_reads_and_propagates() -> None:
    assert PREEMPTION_WATCHER == ENABLE_PREEMPTION_WATCHER_ENV_VAR
    assert PREEMPTION_WATCHER in ENV_VARS_TO_PROPAGATE  # the driver's value reaches the controller actor
