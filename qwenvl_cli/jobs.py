"""``qwenvl jobs create|list|show|watch|pause|resume|cancel``: fine-tuning jobs through the REST API
(``/v1/fine_tuning``).

``watch`` follows a job with a live progress bar (step, loss, ETA) until it ends; Ctrl-C only stops watching,
the job keeps running (cancel it with ``qwenvl jobs cancel``).
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Column, Table

from qwenvl_cli.client import (
    ApiError,
    ApiKeyOption,
    BaseUrlOption,
    Client,
    check_finite,
    parse_json_option,
    print_json,
)

app = typer.Typer(help="Fine-tuning jobs (REST API).", no_args_is_help=True)
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
STOPPED = TERMINAL | {"paused"}  # where watching ends: a paused job waits for `qwenvl jobs resume`


def job_body(model: str, training_file: str, *, validation_file: str | None = None, suffix: str | None = None,
             n_epochs: int | None = None, batch_size: int | None = None, lr_multiplier: float | None = None,
             max_steps: int | None = None, micro_batch_size: int | None = None, workers: int | None = None,
             cpus_per_worker: float | None = None, lora_r: int | None = None, lora_alpha: float | None = None,
             train_adapter: bool = False, seed: int | None = None, extra: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """The ``POST /v1/fine_tuning/jobs`` body (OpenAI fields + the platform's extensions)."""
    hp = {k: v for k, v in {"n_epochs": n_epochs, "batch_size": batch_size,
                            "learning_rate_multiplier": lr_multiplier}.items() if v is not None}
    body: dict[str, Any] = {"model": model, "training_file": training_file,
                            "method": {"type": "supervised", "supervised": {"hyperparameters": hp}}}
    optional = {"validation_file": validation_file, "suffix": suffix, "seed": seed, "max_steps": max_steps,
                "micro_batch_size": micro_batch_size}
    body.update({k: v for k, v in optional.items() if v is not None})
    compute = {k: v for k, v in {"num_workers": workers, "cpus_per_worker": cpus_per_worker}.items() if v is not None}
    if compute:
        body["compute"] = compute
    lora = {k: v for k, v in {"r": lora_r, "alpha": lora_alpha}.items() if v is not None}
    if train_adapter:
        lora["train_adapter"] = True
    if lora:
        body["lora"] = lora
    for key, value in (extra or {}).items():
        body[key] = {**body[key], **value} if isinstance(value, dict) and isinstance(body.get(key), dict) else value
    return body


def _parse_extra(extra: str | None) -> dict[str, Any] | None:
    if not extra:
        return None
    value = parse_json_option("--extra", extra)
    if not isinstance(value, dict):
        raise ApiError("--extra: expected a JSON object of job fields")
    return value


def watch_job(client: Client, job_id: str, console: Console | None = None, poll_s: float = 1.0) -> dict[str, Any]:
    """Show a live progress bar until the job ends or is paused; the job object then. KeyboardInterrupt
    propagates."""
    console = console or Console()
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
               TextColumn("loss {task.fields[loss]}"), TextColumn("ETA {task.fields[eta]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(job_id, total=None, loss="-", eta="-")
        while True:
            job = client.get(f"/v1/fine_tuning/jobs/{job_id}")
            p = job.get("progress") or {}
            loss = f"{p['loss']:.3f}" if p.get("loss") is not None else "-"
            eta = f"{p['eta_seconds']:.0f}s" if p.get("eta_seconds") is not None else "-"
            progress.update(task, description=f"{job_id} {job['status']}", total=p.get("total_steps") or None,
                            completed=p.get("step", 0), loss=loss, eta=eta)
            if job["status"] in STOPPED:
                return job
            time.sleep(poll_s)


def _summary(job: dict[str, Any]) -> str:
    line = f"{job['id']}  {job['status']}"
    if job.get("fine_tuned_model"):
        line += f"  model {job['fine_tuned_model']}"
    if job.get("error"):
        line += f"  error {job['error'].get('code')}: {job['error'].get('message')}"
    return line


def _finish_watch(client: Client, job_id: str) -> None:
    try:
        typer.echo(f"watching {job_id}; Ctrl-C stops watching, not the job")
        job = watch_job(client, job_id)
    except KeyboardInterrupt:
        typer.echo(f"\nstopped watching; {job_id} keeps running (`qwenvl jobs cancel {job_id}` cancels it)")
        raise typer.Exit(130) from None
    typer.echo(_summary(job))
    if job["status"] == "paused":
        typer.echo(f"{job_id} is paused; `qwenvl jobs resume {job_id}` continues it")
    if job["status"] != "succeeded":
        raise typer.Exit(1)


@app.command("create")
def create(
    model: Annotated[str, typer.Option("--model", "-m", help="Base model id (see `qwenvl models list`).")],
    training_file: Annotated[str, typer.Option("--training-file", "-t", help="Uploaded file id (file-...).")],
    validation_file: Annotated[str | None, typer.Option("--validation-file", "-v", help="File id.")] = None,
    suffix: Annotated[str | None, typer.Option(help="Part of the fine-tuned model's name.")] = None,
    n_epochs: Annotated[int | None, typer.Option(help="Passes over the training file.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Samples per optimizer step per worker.")] = None,
    lr_multiplier: Annotated[float | None, typer.Option("--learning-rate-multiplier",
                                                        help="Multiplier on the base learning rate 1e-5.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimizer steps.")] = None,
    micro_batch_size: Annotated[int | None, typer.Option(
        help="Samples per forward pass per worker (batch_size must be a multiple; default 1).")] = None,
    workers: Annotated[int | None, typer.Option(help="Ray Train workers.")] = None,
    cpus_per_worker: Annotated[float | None, typer.Option(help="CPUs reserved per worker.")] = None,
    lora_r: Annotated[int | None, typer.Option(help="LoRA rank.")] = None,
    lora_alpha: Annotated[float | None, typer.Option(help="LoRA alpha.")] = None,
    train_adapter: Annotated[bool, typer.Option(help="Also train the vision-language adapter.")] = False,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    extra: Annotated[str | None, typer.Option(help='More job fields as JSON, e.g. \'{"evaluation": '
                                                   '{"max_new_tokens": 8}}\'.')] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Follow the job with a progress bar.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the job as JSON.")] = False,
    base_url: BaseUrlOption = None, api_key: ApiKeyOption = None,
) -> None:
    """Create a fine-tuning job."""
    check_finite(learning_rate_multiplier=lr_multiplier, cpus_per_worker=cpus_per_worker, lora_alpha=lora_alpha)
    body = job_body(model, training_file, validation_file=validation_file, suffix=suffix, n_epochs=n_epochs,
                    batch_size=batch_size, lr_multiplier=lr_multiplier, max_steps=max_steps,
                    micro_batch_size=micro_batch_size, workers=workers, cpus_per_worker=cpus_per_worker,
                    lora_r=lora_r, lora_alpha=lora_alpha, train_adapter=train_adapter, seed=seed,
                    extra=_parse_extra(extra))
    with Client(base_url, api_key) as client:
        job = client.post("/v1/fine_tuning/jobs", body)
        if json_out:
            print_json(job)
        else:
            typer.echo(_summary(job))
        if watch:
            _finish_watch(client, job["id"])


@app.command("list")
def list_jobs(
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    base_url: BaseUrlOption = None, api_key: ApiKeyOption = None,
) -> None:
    """Your jobs, newest first."""
    with Client(base_url, api_key) as client:
        rows = list(client.paginate("/v1/fine_tuning/jobs"))
    if json_out:
        print_json(rows)
        return
    table = Table(Column("id", no_wrap=True), "model", "status", "progress", "fine-tuned model")
    for j in rows:
        p = j.get("progress") or {}
        done = f"{p.get('step', 0)}/{p.get('total_steps', '?')}" if p else ""
        table.add_row(j["id"], j["model"], j["status"], done, j.get("fine_tuned_model") or "")
    Console().print(table)


@app.command("show")
def show(
    job_id: Annotated[str, typer.Argument(help="A job id (ftjob-...).")],
    events: Annotated[bool, typer.Option("--events", help="Also print the latest events.")] = False,
    base_url: BaseUrlOption = None, api_key: ApiKeyOption = None,
) -> None:
    """One job as JSON (and its latest events)."""
    with Client(base_url, api_key) as client:
        print_json(client.get(f"/v1/fine_tuning/jobs/{job_id}"))
        if events:
            for e in reversed(client.get(f"/v1/fine_tuning/jobs/{job_id}/events", limit=50)["data"]):
                typer.echo(f"{time.strftime('%H:%M:%S', time.localtime(e['created_at']))} {e['level']:5} "
                           f"{e['message']}")


@app.command("watch")
def watch(
    job_id: Annotated[str, typer.Argument(help="A job id (ftjob-...).")],
    base_url: BaseUrlOption = None, api_key: ApiKeyOption = None,
) -> None:
    """Follow a job with a live progress bar; Ctrl-C stops watching, never the job."""
    with Client(base_url, api_key) as client:
        _finish_watch(client, job_id)


JobIdArgument = Annotated[str, typer.Argument(help="A job id (ftjob-...).")]


def _act(job_id: str, action: str, base_url: str | None, api_key: str | None) -> None:
    """POST the job action (``cancel``, ``pause``, ``resume``) and print the job's summary line."""
    with Client(base_url, api_key) as client:
        typer.echo(_summary(client.post(f"/v1/fine_tuning/jobs/{job_id}/{action}")))


@app.command("cancel")
def cancel(job_id: JobIdArgument, base_url: BaseUrlOption = None, api_key: ApiKeyOption = None) -> None:
    """Cancel a job (a running job checkpoints and stops at its next step)."""
    _act(job_id, "cancel", base_url, api_key)


@app.command("pause")
def pause(job_id: JobIdArgument, base_url: BaseUrlOption = None, api_key: ApiKeyOption = None) -> None:
    """Pause a job (a running job checkpoints at its next step and frees its slot; `resume` continues it)."""
    _act(job_id, "pause", base_url, api_key)


@app.command("resume")
def resume(job_id: JobIdArgument, base_url: BaseUrlOption = None, api_key: ApiKeyOption = None) -> None:
    """Resume a paused job from its checkpoint."""
    _act(job_id, "resume", base_url, api_key)
