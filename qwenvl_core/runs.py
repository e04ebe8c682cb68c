"""The layout of a fine-tuning run's directory, and reading / writing it on local disk or S3.

A run lives under one URI (a local path, or ``s3://bucket/prefix``; see ``qwenvl_core.storage``). The
training workflow writes it; the service reads it. It is the only channel between them, so it survives a restart of either:

    events/00000000.json ...  JobEvent objects, one file per event, seq = file name (written by the job)
    CANCEL                    cooperative cancellation request (written by the service, polled by the job)
    PAUSE                     cooperative pause request (the same; removed by the service when the job resumes)
    adapter/                  the final PEFT adapter: adapter_config.json, adapter_model.safetensors, meta.json
    checkpoints/{job_id}/step_{N:08d}/   Ray Train's checkpoint of step N (``workflows.finetune``): resume state,
                              and adapter/, the PEFT adapter of that step (servable like the final one)
    outcome.json              rank 0's final report to the driver (state, metrics, summary), written after the adapter
                              upload: a succeeded one means the adapter is complete even if the driver died before
    result.json               the final state and metrics (written last by the job)
    spec.json                 the FineTuneJobSpec the run was started with
    submissions/{id}.json     written by the service once Ray accepted submission {id}: a job Ray then says does
                              not exist, with no such file, never reached Ray (its attempt is not counted)

Every document is written atomically (``qwenvl_core.storage``), so a reader never sees half an event.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qwenvl_core.specs import JobEvent
from qwenvl_core.storage import StoredObject, download_dir, join_key, open_store, upload_dir

EVENTS_DIR = "events"
CANCEL_FILE = "CANCEL"
PAUSE_FILE = "PAUSE"
ADAPTER_DIR = "adapter"
RESULT_FILE = "result.json"
OUTCOME_FILE = "outcome.json"
RESULTS_CSV = "results.csv"  # OpenAI's per-step results file (``qwenvl_core.training.results``)
SPEC_FILE = "spec.json"
CHECKPOINTS_DIR = "checkpoints"
SUBMISSIONS_DIR = "submissions"
ADAPTER_CONFIG_FILE = "adapter_config.json"


def submission_marker(submission_id: str) -> str:
    """The file that records that Ray accepted ``submission_id``."""
    return f"{SUBMISSIONS_DIR}/{submission_id}.json"


def checkpoint_name(step: int) -> str:
    """The folder of step ``step``'s checkpoint under ``checkpoints/{job_id}/``."""
    return f"step_{step:08d}"


class RunDir:
    """One run's directory (see the module docstring for the layout)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")
        self.store, self.prefix = open_store(self.uri)

    def key(self, *parts: str) -> str:
        return join_key(self.prefix, *parts)

    def uri_of(self, *parts: str) -> str:
        """A URI (or local path) of ``parts`` inside the run, usable by other processes."""
        return "/".join([self.uri, *parts])

    # ----- generic JSON documents ----------------------------------------------------------------------------
    def write_json(self, rel: str, data: Any) -> None:
        self.store.put_bytes(self.key(rel), json.dumps(data, ensure_ascii=False, indent=1).encode("utf-8"))

    def read_json(self, rel: str) -> Any | None:
        """The parsed document, or None if it does not exist."""
        raw = self.store.get_bytes(self.key(rel))
        return None if raw is None else json.loads(raw.decode("utf-8"))

    def exists(self, rel: str) -> bool:
        return self.store.exists(self.key(rel))

    def list_names(self, rel_dir: str) -> list[str]:
        """Sorted names of the objects directly inside ``rel_dir`` (empty if there are none)."""
        base = self.key(rel_dir) + "/"
        return sorted(k[len(base) :] for k in self.store.list_keys(base) if "/" not in k[len(base) :])

    # ----- events ------------------------------------------------------------------------------------------------
    def write_event(self, event: JobEvent) -> None:
        self.write_json(f"{EVENTS_DIR}/{event.seq:08d}.json", event.model_dump(mode="json"))

    def _event_seqs(self) -> list[int]:
        stems = (n.removesuffix(".json") for n in self.list_names(EVENTS_DIR) if n.endswith(".json"))
        return sorted(int(s) for s in stems if s.isdigit())

    def read_events(self, after_seq: int = -1) -> list[JobEvent]:
        """Events with ``seq > after_seq``, in order. Only keys after the last seen one are listed (event names are
        zero-padded, so key order is seq order): a reader polling a long run does not re-list its history."""
        base = self.key(EVENTS_DIR) + "/"
        after = f"{base}{after_seq:08d}.json" if after_seq >= 0 else None
        stems = (k[len(base) :].removesuffix(".json") for k in self.store.list_keys(base, start_after=after)
                 if k.endswith(".json") and "/" not in k[len(base) :])
        seqs = sorted(int(stem) for stem in stems if stem.isdigit())
        return [JobEvent.model_validate(self.read_json(f"{EVENTS_DIR}/{seq:08d}.json")) for seq in seqs
                if seq > after_seq]

    def last_event_seq(self) -> int:
        """The highest event seq written so far, or -1 (lets a restarted job continue numbering)."""
        return max(self._event_seqs(), default=-1)

    # ----- cancellation, result, adapter ---------------------------------------------------------------------
    def request_cancel(self) -> None:
        self.write_json(CANCEL_FILE, {"cancel": True})

    def cancel_requested(self) -> bool:
        return self.exists(CANCEL_FILE)

    def request_pause(self) -> None:
        self.write_json(PAUSE_FILE, {"pause": True})

    def pause_requested(self) -> bool:
        return self.exists(PAUSE_FILE)

    def clear_pause(self) -> None:
        if self.exists(PAUSE_FILE):
            self.store.delete(self.key(PAUSE_FILE))

    def write_result(self, result: dict[str, Any]) -> None:
        self.write_json(RESULT_FILE, result)

    def read_result(self) -> dict[str, Any] | None:
        return self.read_json(RESULT_FILE)

    def upload_adapter(self, local_dir: str | Path) -> list[StoredObject]:
        return upload_dir(self.store, local_dir, self.key(ADAPTER_DIR))

    def download_adapter(self, local_dir: str | Path) -> list[Path]:
        return download_dir(self.store, self.key(ADAPTER_DIR), local_dir)

    # ----- checkpoints ---------------------------------------------------------------------------------------
    def checkpoint_adapter_uri(self, job_id: str, step: int) -> str:
        """Where the adapter of step ``step``'s checkpoint lives (whether or not it exists)."""
        return self.uri_of(CHECKPOINTS_DIR, job_id, checkpoint_name(step), ADAPTER_DIR)

    def checkpoint_has_adapter(self, job_id: str, step: int) -> bool:
        """Whether step ``step``'s checkpoint is stored with its adapter (one object lookup)."""
        return self.exists(f"{CHECKPOINTS_DIR}/{job_id}/{checkpoint_name(step)}/{ADAPTER_DIR}/{ADAPTER_CONFIG_FILE}")

    def checkpoint_adapter_steps(self, job_id: str) -> set[int]:
        """Steps whose checkpoint is stored with its adapter (Ray Train removes checkpoints beyond
        ``checkpoint.keep``; checkpoints written before checkpoints carried an adapter have none): one listing."""
        base = self.key(CHECKPOINTS_DIR, job_id) + "/"
        steps = set()
        for key in self.store.list_keys(base):
            parts = key[len(base):].split("/")
            if (len(parts) == 3 and parts[1:] == [ADAPTER_DIR, ADAPTER_CONFIG_FILE] and parts[0].startswith("step_")
                    and parts[0][5:].isdigit()):
                steps.add(int(parts[0][5:]))
        return steps
