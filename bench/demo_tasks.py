"""`auto` against the demo's hand-tuned settings, through the service, on the demo's tasks.

Starts a local stack (``qwenvl_cli.stack.start_stack``) in a temporary QWENVL_HOME on free ports and runs the demo
(``qwenvl_cli.demo.run_demo``: upload, a fine-tuning job on 2 Ray Train workers, held-out metrics from the job's
``result.json``) once per task and setting against it, then stops it. ``auto``: the job sends only the model,
the files and the placement (the demo's job); ``tuned``: the hand-tuned settings the demo used before ``auto``
(1,000 steps, batch 8 per worker, learning rate 1e-2, LoRA r 16 / alpha 32). Prints held-out exact match (and,
for ``colours``, the boxes against chance with a one-sided binomial p-value) per run and auto minus tuned per task.

``line`` ("Is the hexagon above or below the line?") is a visual concept outside the pretrained base's mix.

Usage: .venv/bin/python bench/demo_tasks.py [--tasks counting colours line] [--modes auto tuned] [--model PRESET]
[--json OUT]
(~3-5 min a run on a 2-core machine; not a suite test).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

TUNED = {"n_epochs": 28, "max_steps": 1000, "batch_size": 8, "lr_multiplier": 1000.0, "lora_r": 16,
         "lora_alpha": 32.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["counting", "colours"], choices=["counting", "colours", "line"])
    parser.add_argument("--modes", nargs="+", default=["auto", "tuned"], choices=["auto", "tuned"])
    parser.add_argument("--json", type=Path, help="also write every run's report here")
    from qwenvl_cli.stack import BASE_MODEL, BASE_MODELS

    parser.add_argument("--model", default=BASE_MODEL, choices=BASE_MODELS,
                        help="the stack's base model the demo fine-tunes (default: the stack's default)")
    args = parser.parse_args()

    from rich.console import Console

    from qwenvl_cli.client import read_state
    from qwenvl_cli.demo import run_demo
    from qwenvl_cli.ports import free_port
    from qwenvl_cli.stack import start_stack, stop_stack

    console = Console()
    reports: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        os.environ["QWENVL_HOME"] = str(home)
        start_stack(home, api_port=free_port(), mlflow_port=free_port(), dashboard_port=free_port(),
                    echo=console.print)
        state = read_state(home)
        try:
            for task in args.tasks:
                for mode in args.modes:
                    console.rule(f"{task}, {mode}")
                    report = run_demo(home, keep=True, console=console, task=task, model=args.model,
                                      job=TUNED if mode == "tuned" else None)
                    reports.setdefault(task, {})[mode] = report
        finally:
            if state is not None:
                stop_stack(state)
    print("\ntask      setting  hyperparameters  held-out exact match (base)  boxes IoU>=0.5 (base)  chance  p-value")
    for task, runs in reports.items():
        for mode, r in runs.items():
            m, g, hp = r["metrics"], r["grounding"], r["hyperparameters"]
            boxes = (f"{g['hits']}/{g['boxes']} ({g['base_hits']})  {g['chance']:.3f}  {g['p_value']:.1e}"
                     if g else "")
            print(f"{task:9s} {mode:8s} {hp} {m['eval/exact_match']:.3f} ({m['eval_base/exact_match']:.3f})  {boxes}")
        if {"auto", "tuned"} <= set(runs):
            diff = runs["auto"]["metrics"]["eval/exact_match"] - runs["tuned"]["metrics"]["eval/exact_match"]
            print(f"{task}: auto - tuned held-out exact match = {diff:+.3f}")
    if args.json:
        args.json.write_text(json.dumps(reports, indent=1, default=str))


if __name__ == "__main__":
    main()
