"""A small real training entrypoint with the workflow's contract, for scheduler tests on real Ray Jobs.

``python tests/service/fake_workflow.py --spec SPEC_URI``: reads the spec, writes one metrics event per step
(``hyperparameters.max_steps`` steps, ``FAKE_STEP_S`` seconds each), a checkpoint (its adapter/ and event) at the
middle, polls ``CANCEL`` between steps, then writes ``adapter/`` and ``result.json``. ``FAKE_MODE=crash_once`` makes the
first attempt die without a result (exit 1), as a Ray job whose node died would.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from qwenvl_core.runs import ADAPTER_DIR, CHECKPOINTS_DIR, RunDir, checkpoint_name
from qwenvl_core.specs import FineTuneJobSpec, JobEvent
from qwenvl_core.storage import open_store, upload_dir


def _event(run: RunDir, type_: str, message: str, **data: object) -> None:
    run.write_event(JobEvent(seq=run.last_event_seq() + 1, created_at=time.time(), type=type_,  # type: ignore[arg-type]
                             message=message, data=data))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    uri = parser.parse_args().spec
    store, key = open_store(uri.rsplit("/", 1)[0])
    spec = FineTuneJobSpec.model_validate(json.loads(store.get_bytes(store_key(key, "spec.json")) or b"{}"))
    run = RunDir(spec.output_uri)
    if os.environ.get("FAKE_MODE") == "crash_once" and not run.exists("attempted"):
        run.write_json("attempted", {"pid": os.getpid()})
        return 1
    steps, step_s = spec.hyperparameters.max_steps or 4, float(os.environ.get("FAKE_STEP_S", "0.5"))
    _event(run, "message", f"Training started: {steps} steps")
    for step in range(1, steps + 1):
        if run.cancel_requested():
            run.write_result({"state": "cancelled", "trained_tokens": step * 100})
            return 0
        time.sleep(step_s)
        _event(run, "metrics", f"step {step}", step=step, total_steps=steps, epoch=step / steps,
               loss=1.0 / step, trained_tokens=step * 100, eta_seconds=(steps - step) * step_s)
        if step == steps // 2:
            _write_adapter(run, spec, run.key(CHECKPOINTS_DIR, spec.job_id, checkpoint_name(step), ADAPTER_DIR))
            _event(run, "checkpoint", f"checkpoint at step {step}", step=step, metrics={"train_loss": 1.0 / step})
    _write_adapter(run, spec, run.key(ADAPTER_DIR))
    run.write_result({"state": "succeeded", "trained_tokens": steps * 100, "metrics": {"train_loss": 1.0 / steps}})
    return 0


def _write_adapter(run: RunDir, spec: FineTuneJobSpec, key: str) -> None:
    """A stand-in adapter directory (the workflow's final adapter, or a checkpoint's) at ``key`` of the run."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": spec.lora.r}))
        (Path(tmp) / "adapter_model.safetensors").write_bytes(b"\0" * 64)
        upload_dir(run.store, tmp, key)


def store_key(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


if __name__ == "__main__":
    raise SystemExit(main())
