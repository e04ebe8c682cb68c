"""The small interfaces through which a training run talks to the outside world, and RunDir-backed versions.

The loop (``qwenvl_core.training.loop``) never imports Ray or MLflow: progress, metrics, checkpoints and
cancellation reach it through these Protocols. ``workflows/`` supplies Ray / MLflow implementations; this
module supplies the ones that write ``JobEvent``\\ s into a run directory (``qwenvl_core.runs.RunDir``) and poll
its ``CANCEL`` file, plus no-op and in-memory versions for local runs and tests.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from qwenvl_core.runs import RunDir
from qwenvl_core.specs import JobEvent, JobState, Progress


class ProgressSink(Protocol):
    def on_progress(self, progress: Progress) -> None:
        """Called on rank 0 after every optimizer step."""


class MetricSink(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Per-step training metrics and evaluation metrics (names prefixed ``train/`` / ``eval/``); rank 0."""


class CheckpointReporter(Protocol):
    def report(self, step: int, local_dir: Path, metrics: dict[str, float]) -> None:
        """Called on **every** rank after each rank wrote its part of checkpoint ``step`` into ``local_dir``."""


class CancelSignal(Protocol):
    def cancelled(self) -> bool:
        """True once the job should stop (polled by rank 0; the loop broadcasts the answer)."""


class StartSink(Protocol):
    def on_start(self, info: dict[str, Any]) -> None:
        """Rank 0, once the model and data are ready: ``params`` (flat), ``config`` (the spec), ``data_reports``."""


class StepObserver(Protocol):
    def __call__(self, step: int) -> None:
        """Every rank, after each optimizer step (fault injection in tests, watchdogs)."""


class EventSink(Protocol):
    def emit(self, type_: Literal["message", "metrics", "checkpoint", "state"], message: str,
             data: dict[str, Any] | None = None, level: Literal["info", "warn", "error"] = "info") -> None:
        """Record one job event (rank 0)."""


@dataclass
class Hooks:
    """Everything injected into ``train``; every field has a do-nothing default."""

    progress: list[ProgressSink] = field(default_factory=list)
    metrics: list[MetricSink] = field(default_factory=list)
    checkpoints: CheckpointReporter | None = None
    cancel: CancelSignal | None = None
    events: EventSink | None = None
    start: list[StartSink] = field(default_factory=list)
    on_step: list[StepObserver] = field(default_factory=list)


class RunDirEvents:
    """``EventSink`` writing ``events/{seq}.json`` into a run directory, continuing the numbering on resume."""

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self.seq = run.last_event_seq() + 1

    def emit(self, type_: Literal["message", "metrics", "checkpoint", "state"], message: str,
             data: dict[str, Any] | None = None, level: Literal["info", "warn", "error"] = "info") -> None:
        event = JobEvent(seq=self.seq, created_at=time.time(), level=level, type=type_, message=message,
                         data=data or {})
        self.run.write_event(event)
        self.seq += 1

    def state(self, state: JobState, message: str, **data: Any) -> None:
        self.emit("state", message, {"state": state.value, **data}, "error" if state is JobState.FAILED else "info")


class EventProgress:
    """``ProgressSink`` turning progress into ``metrics`` events, at most one per ``every_s`` seconds."""

    def __init__(self, events: EventSink, every_s: float = 2.0) -> None:
        self.events, self.every_s, self._last = events, every_s, 0.0

    def on_progress(self, progress: Progress) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s and progress.step != progress.total_steps:
            return
        self._last = now
        # The event's data is the Progress fields themselves (the service reads them as the job's progress).
        self.events.emit("metrics", f"step {progress.step}/{progress.total_steps}", progress.model_dump(mode="json"))


class RunDirCancel:
    """``CancelSignal`` polling the run directory's ``CANCEL`` file at most every ``every_s`` seconds."""

    def __init__(self, run: RunDir, every_s: float = 1.0) -> None:
        self.run, self.every_s = run, every_s
        self._last, self._seen = 0.0, False

    def cancelled(self) -> bool:
        now = time.monotonic()
        if not self._seen and now - self._last >= self.every_s:
            self._last = now
            self._seen = self.run.cancel_requested()
        return self._seen


@dataclass
class RecordingSink:
    """In-memory ``ProgressSink`` + ``MetricSink`` (local runs, tests, the CLI's summary)."""

    progress: list[Progress] = field(default_factory=list)
    metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)

    def on_progress(self, progress: Progress) -> None:
        self.progress.append(progress)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.append((step, dict(metrics)))


class LocalCheckpoints:
    """``CheckpointReporter`` for runs without Ray: moves each checkpoint to ``root/step_{N:08d}``, keeps ``keep``.

    Only for a single process or ranks sharing one file system (every rank's files land in the same folder).
    """

    def __init__(self, root: Path, keep: int | None) -> None:
        self.root, self.keep = root, keep

    def report(self, step: int, local_dir: Path, metrics: dict[str, float]) -> None:
        target = self.root / f"step_{step:08d}"
        target.mkdir(parents=True, exist_ok=True)
        for item in local_dir.iterdir():
            shutil.move(str(item), target / item.name)
        shutil.rmtree(local_dir, ignore_errors=True)
        saved = sorted(p for p in self.root.iterdir() if p.name.startswith("step_"))
        for old in saved[: -self.keep] if self.keep else []:
            shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        saved = sorted(self.root.glob("step_*")) if self.root.is_dir() else []
        return saved[-1] if saved else None
