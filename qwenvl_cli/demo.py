"""``qwenvl demo [--keep]``: the whole product on this machine, through the REST API like any client.

Starts the local stack (unless one is already running in ``QWENVL_HOME``), writes the demo's synthetic shapes data
(``qwenvl_cli.demo_data``), uploads it, fine-tunes the tiny Qwen-VL with LoRA on 2 Ray Train workers with a live
progress bar, prints base vs fine-tuned metrics on the held-out validation questions (from the job's
``result.json``), asks the adapter a grounding question about a held-out image and saves it with the predicted
box drawn, prints the MLflow UI and API docs URLs, and stops the stack it started (``--keep`` leaves it running).
"""

from __future__ import annotations

import json
import math
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from qwenvl_cli.chat import ask, save_boxes
from qwenvl_cli.client import Client, qwenvl_home, read_state
from qwenvl_cli.files import upload_file, wait_processed
from qwenvl_cli.jobs import job_body, watch_job
from qwenvl_cli.stack import (
    BASE_MODEL,
    BASE_MODELS,
    ApiPort,
    DashPort,
    MlflowPort,
    StackError,
    stack_status,
    start_stack,
    stop_stack,
)

# The demo's job: only the model, the files and where to run (2 Ray Train workers); every hyperparameter and the
# LoRA settings are `auto` (docs/hyperparameters.md), resolved from the pretrained tiny base's training defaults
# (its training_defaults.json: autotune.PRETRAINED_TINY) and the training file's statistics; the job's events say
# what was chosen and why. Measured against hand-tuned settings in docs/hyperparameters.md.
DEMO_JOB: dict[str, Any] = {
    "workers": 2, "cpus_per_worker": 0.5, "seed": 0,
    "extra": {"evaluation": {"max_new_tokens": 48}, "checkpoint": {"every_n_steps": 250}},
}
METRICS = (("loss", "eval loss (lower is better)"), ("token_accuracy", "answer-token accuracy"),
           ("exact_match", "exact match: {task} questions"), ("grounding_accuracy", "grounding: box IoU >= 0.5"))
TASK_WORDS = {"colours": "colour", "counting": "counting", "line": "above / below the line"}


class DemoTask(StrEnum):
    """The demo dataset's questions (``qwenvl_cli.demo_data.write_demo_dataset``'s ``task``)."""

    COLOURS = "colours"
    COUNTING = "counting"
    LINE = "line"


def binomial_p_value(hits: int, n: int, p: float) -> float:
    """One-sided binomial test: the probability of ``hits`` or more successes in ``n`` trials at rate ``p``."""
    return min(1.0, sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(hits, n + 1)))


def grounding_summary(metrics: dict[str, float], boxes: int, chance: float | None) -> dict[str, Any] | None:
    """The held-out boxes against chance: hits of the fine-tuned and of the base model, chance (``demo_data.
    mean_box_chance``) and the one-sided binomial p-value of the fine-tuned hits at chance; None without boxes."""
    if not boxes or chance is None or "eval/grounding_accuracy" not in metrics:
        return None
    hits = round(metrics["eval/grounding_accuracy"] * boxes)
    base = round(metrics.get("eval_base/grounding_accuracy", 0.0) * boxes)
    return {"boxes": boxes, "hits": hits, "base_hits": base, "chance": chance,
            "p_value": binomial_p_value(hits, boxes, chance)}


def metrics_table(metrics: dict[str, float], task: str = "colours") -> Table:
    table = Table("held-out validation", "base model", "fine-tuned (LoRA)", title="base vs fine-tuned")
    for key, template in METRICS:
        label = template.format(task=TASK_WORDS[task])
        if f"eval/{key}" in metrics:
            table.add_row(label, f"{metrics[f'eval_base/{key}']:.3f}", f"{metrics[f'eval/{key}']:.3f}")
    return table


def run_demo(home: Path, *, keep: bool, console: Console, n_train: int = 600, max_steps: int | None = None,
             ports: dict[str, int] | None = None, task: str = "colours", model: str = BASE_MODEL,
             job: dict[str, Any] | None = None) -> dict[str, Any]:
    """The demo; returns what it measured (job id, metrics, the saved picture, seconds). ``task``: the demo
    dataset's questions (``qwenvl_cli.demo_data.TASKS``); ``model``: the base model to fine-tune (one of the local
    stack's ``BASE_MODELS``); ``job``: ``jobs.job_body`` arguments that replace the demo's ``auto`` ones (a bench
    compares hand-set hyperparameters this way: bench/demo_tasks.py)."""
    if model not in BASE_MODELS:
        raise StackError(f"--model {model!r}: the local stack serves {', '.join(BASE_MODELS)}")
    started = time.monotonic()
    state = read_state(home)
    own_stack = state is None
    if own_stack:
        console.rule("1. start the local stack")
        # a stack the demo stops again serves only the base it fine-tunes (each base is a replica with its own
        # imports and weights); one it leaves running (--keep) serves them all, as `qwenvl up` does
        start_stack(home, echo=console.print, models=BASE_MODELS if keep else (model,), **(ports or {}))
        state = read_state(home)
    elif not stack_status(home)["running"]:
        raise StackError(f"the stack recorded in {home} is not healthy: run `qwenvl down`, then `qwenvl demo`")
    assert state is not None
    try:
        report = _steps(home, state, console, n_train, max_steps, task, model, job)
    finally:
        if own_stack and not keep:
            console.rule("stop the stack")
            stop_stack(state)
            (home / "stack.json").unlink(missing_ok=True)
            console.print("stopped (use --keep to leave it running)")
    report["seconds"] = round(time.monotonic() - started, 1)
    console.print(f"demo finished in {report['seconds']:.0f} s")
    return report


def _steps(home: Path, state: dict[str, Any], console: Console, n_train: int, max_steps: int | None,
           task: str = "colours", base_model: str = BASE_MODEL, job_args: dict[str, Any] | None = None
           ) -> dict[str, Any]:
    from qwenvl_cli.demo_data import write_demo_dataset

    console.rule("2. synthetic shapes dataset")
    out = home / "demo" / time.strftime("%Y%m%d-%H%M%S")
    data = write_demo_dataset(out, n_train=n_train, task=task)
    what = "colours and boxes" if task == "colours" else task
    console.print(f"{data.train_samples} training and {data.validation_samples} held-out questions ({what}) in {out}")
    with Client(state["api_url"]) as client:
        console.rule("3. upload through the REST API")
        # both uploaded before waiting: the service validates them side by side
        uploads = [upload_file(client, bundle)["id"] for bundle in (data.train_bundle, data.validation_bundle)]
        train, val = (wait_processed(client, file_id) for file_id in uploads)
        console.print(f"{train['id']} ({train['filename']}), {val['id']} ({val['filename']}): validated")
        console.rule("4. fine-tune with LoRA on 2 Ray Train workers")
        params = {**DEMO_JOB, **({"max_steps": max_steps} if max_steps else {}), **(job_args or {})}
        job = client.post("/v1/fine_tuning/jobs", job_body(base_model, train["id"], validation_file=val["id"],
                                                           suffix="demo", **params))
        console.print(f"job {job['id']}")
        job = watch_job(client, job["id"], console)
        if job["status"] != "succeeded":
            raise StackError(f"job {job['id']} {job['status']}: {job.get('error')}")
        result = json.loads(client.request("GET", f"/v1/files/{job['result_files'][-1]}/content").content)  # result.json
        metrics = result["metrics"]
        console.rule("5. base vs fine-tuned on held-out questions")
        console.print(metrics_table(metrics, task))
        grounding = grounding_summary(metrics, data.validation_boxes, data.grounding_chance)
        if grounding is not None:
            console.print(f"boxes: {grounding['hits']} of {grounding['boxes']} held-out boxes with IoU >= 0.5 (base "
                          f"{grounding['base_hits']}); chance (the mean training box) {grounding['chance']:.3f}; "
                          f"one-sided binomial p = {grounding['p_value']:.1e}")
        console.rule("6. ask the adapter a grounding question")
        model = job["fine_tuned_model"]
        picture: Path | None = None
        answer = ""
        if data.grounding_image is not None and data.grounding_question is not None:
            # room for any family's box: a Qwen2/2.5/3-VL JSON answer ("```json [{"bbox_2d": [...], "label": ...}]
            # ```") is ~40 tokens of the tiny bases' tokenizer, which 32 cut before its box
            completion = ask(client, model, data.grounding_question, [data.grounding_image], max_tokens=64)
            choice = completion["choices"][0]
            answer = choice["message"]["content"]
            console.print(f"[bold]{model}[/bold]\nQ: {data.grounding_question}\nA: {answer}")
            first = next((g for g in choice.get("grounding") or [] if g["objects"]), None)
            if first is not None:
                picture = save_boxes(data.grounding_image, first, out / "grounding.png")
                console.print(f"box {[round(v) for v in first['objects'][0]['box']]} px; saved {picture}")
            else:
                console.print("the answer has no box this time")
    console.rule("7. where to look")
    console.print(f"MLflow UI  {state['mlflow_url']}  (user admin, password in {home / 'mlflow' / 'admin_password'})")
    console.print(f"API docs   {state['api_url']}/docs")
    return {"job_id": job["id"], "model": model, "metrics": metrics, "answer": answer, "grounding": grounding,
            "hyperparameters": job["method"]["supervised"]["hyperparameters"],
            "picture": str(picture) if picture else None, "mlflow_run_id": result.get("mlflow_run_id")}


def demo(keep: Annotated[bool, typer.Option("--keep", help="Leave the stack running afterwards.")] = False,
         json_out: Annotated[Path | None, typer.Option("--report", help="Also write the results as JSON.")] = None,
         api_port: ApiPort = 8000, mlflow_port: MlflowPort = 5000, dashboard_port: DashPort = 8265,
         task: Annotated[DemoTask, typer.Option("--task", help="The questions: colours (colour and grounding), "
                                                "counting (how many shapes) or line (is the shape above or below "
                                                "the line: a concept the pretrained base never saw).")] = DemoTask.COLOURS,
         model: Annotated[str, typer.Option("--model", help="The base model to fine-tune: one the local stack "
                                            f"serves ({', '.join(BASE_MODELS)}).")] = BASE_MODEL) -> None:
    """Upload, fine-tune, evaluate, serve and ask: the whole platform end to end on this machine."""
    ports = {"api_port": api_port, "mlflow_port": mlflow_port, "dashboard_port": dashboard_port}
    report = run_demo(qwenvl_home(), keep=keep, console=Console(), ports=ports, task=task.value, model=model)
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2))
