"""``qwenvl finetune``: run one fine-tuning job through the same Ray Train workflow the service uses.

Mounted as ``qwenvl finetune`` by ``qwenvl_cli.main``. Flags override ``--config job.yaml``
(a ``FineTuneJobSpec`` document); the job runs on the current Ray cluster (``RAY_ADDRESS`` / a running local
one) or a new local one, shows a progress bar fed by the run directory's events, and leaves the adapter in
``--out``/adapter. Standard output is the result only (JSON: job id, state, adapter, error, metrics); the progress
bar and the workers' logs go to standard error.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from qwenvl_core.errors import QwenVLError


class FinetuneConfigError(QwenVLError):
    """The ``--config`` file cannot be read as a job spec."""


# The job fields the flags set (``build_spec``'s overrides), by flag
OVERRIDE_FLAGS = {"hyperparameters.n_epochs": "--epochs", "hyperparameters.max_steps": "--max-steps",
                  "hyperparameters.learning_rate": "--lr", "hyperparameters.batch_size": "--batch-size",
                  "lora.r": "--rank", "compute.num_workers": "--workers", "compute.strategy": "--strategy",
                  "tracking.tracking_uri": "--tracking-uri", "quantization": "--qlora"}


def _load_config(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise FinetuneConfigError(f"--config {path}: not UTF-8 text (byte {e.start}: {e.reason})") from e
    except (OSError, yaml.YAMLError) as e:
        raise FinetuneConfigError(f"--config {path}: {e}") from e
    if not isinstance(data, dict):
        raise FinetuneConfigError(f"--config {path}: expected a mapping of job fields")
    return data


def build_spec(base: Path, train: Path, val: Path | None, config: Path | None, out: Path,
               overrides: dict[str, Any]) -> Any:
    from pydantic import ValidationError

    from qwenvl_core.specs import FineTuneJobSpec

    fields = _load_config(config)
    fields.setdefault("job_id", f"cli-{int(time.time())}")
    fields.update(base_model=str(base.resolve()), train_file=str(train.resolve()), output_uri=str(out.resolve()))
    if val is not None:
        fields["validation_file"] = str(val.resolve())
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        if key:
            if not isinstance(fields.setdefault(section, {}), dict):
                flag = OVERRIDE_FLAGS.get(dotted, dotted)
                raise FinetuneConfigError(f"--config {config}: {section} must be a mapping of fields ({flag} sets "
                                          f"{dotted}), got {type(fields[section]).__name__}")
            fields[section][key] = value
        else:
            fields[section] = value
    try:
        return FineTuneJobSpec.model_validate(fields)
    except ValidationError as e:
        first = e.errors()[0]
        raise FinetuneConfigError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from e


def _watch(output_uri: str, stop: threading.Event) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from qwenvl_core.runs import RunDir

    run, seen = RunDir(output_uri), -1
    with Progress(TextColumn("[bold]finetune"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                  TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), console=Console(stderr=True)) as bar:
        task = bar.add_task("train", total=None, loss="-")
        while not stop.wait(1.0):
            for event in run.read_events(after_seq=seen):
                seen = event.seq
                progress = event.data if event.type == "metrics" else None
                if progress and "step" in progress:
                    bar.update(task, completed=progress["step"], total=progress["total_steps"],
                               loss=f"{progress['loss']:.4f}")


def finetune(
    base: Annotated[Path, typer.Option(help="Base model directory.")],
    train: Annotated[Path, typer.Option(help="Training data (.json/.jsonl or .zip/.tar.gz bundle).")],
    val: Annotated[Path | None, typer.Option(help="Validation data.")] = None,
    config: Annotated[Path | None, typer.Option(help="job.yaml with FineTuneJobSpec fields.")] = None,
    out: Annotated[Path, typer.Option(help="Run directory: adapter/, checkpoints/, events/, result.json.")] = Path(
        "finetune-run"),
    epochs: Annotated[int | None, typer.Option(help="hyperparameters.n_epochs")] = None,
    max_steps: Annotated[int | None, typer.Option(help="hyperparameters.max_steps")] = None,
    lr: Annotated[float | None, typer.Option(help="hyperparameters.learning_rate")] = None,
    batch_size: Annotated[int | None, typer.Option(help="hyperparameters.batch_size")] = None,
    rank: Annotated[int | None, typer.Option(help="lora.r")] = None,
    qlora: Annotated[bool, typer.Option(help="Q-LoRA: the LM in 4-bit NF4.")] = False,
    workers: Annotated[int | None, typer.Option(help="compute.num_workers")] = None,
    strategy: Annotated[str | None, typer.Option(help="compute.strategy: ddp, zero2 or zero3")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="tracking.tracking_uri (MLflow)")] = None,
) -> None:
    """Fine-tune BASE on TRAIN with LoRA / Q-LoRA on Ray Train; the adapter lands in OUT/adapter."""
    overrides = {"hyperparameters.n_epochs": epochs, "hyperparameters.max_steps": max_steps,
                 "hyperparameters.learning_rate": lr, "hyperparameters.batch_size": batch_size,
                 "lora.r": rank, "compute.num_workers": workers, "compute.strategy": strategy,
                 "tracking.tracking_uri": tracking_uri, "quantization": "4bit" if qlora else None}
    spec = build_spec(base, train, val, config, out, overrides)
    import ray

    from workflows.finetune import connect, run_job

    # stdout carries only the result (``qwenvl finetune ... | jq``): the progress bar and the worker logs Ray forwards
    # to the driver go to stderr, and Ray is shut down before the result is printed, so no late log line follows it
    with contextlib.redirect_stdout(sys.stderr):
        connect()
        stop = threading.Event()
        watcher = threading.Thread(target=_watch, args=(spec.output_uri, stop), daemon=True)
        watcher.start()
        try:
            result = run_job(spec)
        finally:
            stop.set()
            watcher.join(timeout=5)
            ray.shutdown()
    typer.echo(json.dumps({k: result.get(k) for k in ("job_id", "state", "adapter_uri", "error", "metrics")},
                          indent=1))
    if result["state"] == "failed":
        raise typer.Exit(1)
