"""A training entrypoint with the workflow's run-directory contract whose outputs have a known size, for the
storage-accounting tests.

``python checkpointing_workflow.py --spec SPEC_URI`` writes a checkpoint of ``CKPT_BYTES`` bytes under
``checkpoints/{job_id}/step_1/`` (where Ray Train puts them), then its checkpoint event, then waits until the file
``RELEASE`` appears in the run directory (or ``CANCEL``), and finishes with ``adapter/`` and ``result.json``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from qwenvl_core.runs import RunDir
from qwenvl_core.specs import FineTuneJobSpec, JobEvent


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    spec_uri = parser.parse_args().spec
    spec = FineTuneJobSpec.model_validate(RunDir(spec_uri.rsplit("/", 1)[0]).read_json("spec.json"))
    run = RunDir(spec.output_uri)
    run.store.put_bytes(run.key("checkpoints", spec.job_id, "step_1", "adapter_model.safetensors"),
                        b"\0" * int(os.environ["CKPT_BYTES"]))
    run.write_event(JobEvent(seq=run.last_event_seq() + 1, created_at=time.time(), type="checkpoint",
                             message="checkpoint at step 1", data={"step": 1, "metrics": {"train_loss": 1.0}}))
    deadline = time.monotonic() + 120
    while not (run.exists("RELEASE") or run.cancel_requested()) and time.monotonic() < deadline:
        time.sleep(0.05)
    if run.cancel_requested() or not run.exists("RELEASE"):
        run.write_result({"state": "cancelled"})
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
        (Path(tmp) / "adapter_model.safetensors").write_bytes(b"\1" * 4096)
        run.upload_adapter(tmp)
    run.write_result({"state": "succeeded", "trained_tokens": 100})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
