"""`auto` hyperparameters on a tiny base: the platform's rule against hand-tuned settings, offline.

For a base model directory and a task, writes the task's training / held-out files, resolves the job's ``auto``
values exactly as the scheduler does (``qwenvl_core.autotune``: the base model's ``training_defaults.json`` and
the training file's validation statistics, for ``--workers`` Ray workers) and trains with the platform's
``Trainer`` in this process, one worker holding the whole global batch (``batch_size x workers``: the same
averaged gradient as the workers' all-reduce). ``--mode tuned`` runs the demo's hand-tuned settings instead
(1,000 steps, batch 8 per worker, learning rate 1e-2, LoRA r 16 / alpha 32, all-linear). Prints held-out exact
match (and grounding IoU >= 0.5 where the task has boxes) of the base and of the fine-tuned model.

Tasks: ``colours`` and ``counting`` (the demo's data, ``qwenvl_cli.demo_data``); ``corners``, ``line``,
``ground_arrow`` (rendered tasks outside the pretraining mix, ``qwenvl_core.pretrain.render``).

Usage: OMP_NUM_THREADS=1 .venv/bin/python bench/auto_tiny.py --base DIR --task colours [--mode auto|tuned]
       [--seed 0] [--n-train 600] [--eval-every N]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

TUNED = {"max_steps": 1000, "batch_size": 8, "learning_rate": 1e-2, "lora": {"r": 16, "alpha": 32.0}}
DEMO_TASKS = ("colours", "counting")


def task_files(task: str, out: Path, n_train: int, seed: int, n_validation: int | None = None
               ) -> tuple[Path, Path, int]:
    """(training file, held-out file, held-out samples) of ``task``; ``n_validation``: the held-out size (default:
    the demo's, or ``FineTuneCheck``'s)."""
    if task in DEMO_TASKS:
        from qwenvl_cli.demo_data import write_demo_dataset

        extra = {} if n_validation is None else {"n_validation": n_validation}
        data = write_demo_dataset(out, n_train=n_train, task=task, seed=seed, **extra)
        return data.train_bundle, data.validation_bundle, data.validation_samples
    from qwenvl_core.pretrain.recipe import FineTuneCheck, write_task_files

    check = FineTuneCheck(task, n_train=n_train, seed=seed,
                          **({} if n_validation is None else {"n_validation": n_validation}))
    train, val = write_task_files(out, check)
    return train, val, check.n_validation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="base model directory")
    parser.add_argument("--task", default="colours")
    parser.add_argument("--mode", choices=("auto", "tuned"), default="auto")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers the job would run on (the demo's 2)")
    parser.add_argument("--n-train", type=int, default=600)
    parser.add_argument("--n-validation", type=int, default=None, help="held-out samples (default: the task's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=None,
                        help="also evaluate the validation loss every N steps (printed as a curve at the end)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from qwenvl_core import autotune
    from qwenvl_core.data import validate_file
    from qwenvl_core.specs import FineTuneJobSpec
    from qwenvl_core.training import Hooks, RecordingSink, Trainer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train, val, n_val = task_files(args.task, root / "data", args.n_train, args.seed,
                                        args.n_validation)
        stats = validate_file(train).to_dict()["stats"]  # what the service stores for an upload
        defaults, source = autotune.base_defaults(args.base)
        if args.mode == "auto":
            data = autotune.DataStats.from_report(stats, autotune.image_tokens(args.base))
            res = autotune.resolve(autotune.Requested(workers=args.workers), defaults, data)
            lora, _ = autotune.resolve_lora({}, defaults)
            per_epoch = max(1, stats["samples"] // (res.values["batch_size"] * args.workers))
            steps = res.values["n_epochs"] * per_epoch
            batch = res.values["batch_size"]
            lr = res.values["learning_rate_multiplier"] * autotune.SPEC_LEARNING_RATE
            print(f"defaults from {source}; {res.message()}; {lora}")
        else:
            steps, batch, lr = TUNED["max_steps"], TUNED["batch_size"], TUNED["learning_rate"]
            lora = {**TUNED["lora"], "dropout": 0.0, "targets": "all-linear"}
        global_batch = batch * args.workers
        print(f"{args.mode}: {steps} steps of {global_batch} ({batch} x {args.workers} workers), lr {lr:.3g}, "
              f"LoRA {lora}", flush=True)
        spec = FineTuneJobSpec.model_validate({
            "job_id": f"auto-{args.task}", "base_model": str(args.base), "train_file": str(train),
            "validation_file": str(val), "output_uri": str(root / "run"), "seed": args.seed, "lora": lora,
            "hyperparameters": {"max_steps": steps, "batch_size": global_batch, "micro_batch_size": global_batch,
                                "learning_rate": lr},
            "evaluation": {"max_new_tokens": 48, "max_samples": n_val, "every_n_steps": args.eval_every},
            "checkpoint": {"every_n_steps": 100_000},
        })
        start = time.monotonic()
        curve = RecordingSink()
        metrics = Trainer(spec, Hooks(metrics=[curve]), work_dir=root / "run").run().metrics
        if args.eval_every:
            print("validation loss by step: " + ", ".join(f"{step} {m['eval/loss']:.3f}" for step, m in curve.metrics
                                                          if "eval/loss" in m and "eval_base/loss" not in m))
        keep = {k: round(v, 3) for k, v in metrics.items()
                if k.split("/")[-1] in ("exact_match", "grounding_accuracy", "loss")}
        print(json.dumps({"task": args.task, "mode": args.mode, "steps": steps, "lr": lr,
                          "seconds": round(time.monotonic() - start), **keep}))


if __name__ == "__main__":
    main()
