"""Pretrain the tiny Qwen-VL on rendered image-text data and measure what it learnt (docs/pretraining.md).

1. ``qwenvl_core.pretrain.recipe.pretrain_base``: qwen-vl-tiny-v2 materialised with the seed, every weight trained
   on the rendered mix (captions, shape / colour / region / count / glyph questions, grounding), 1 CPU thread;
2. held-out accuracy on the pretraining task kinds (greedy answers; grounding: IoU >= 0.5), random vs pretrained;
3. LoRA fine-tunes through the platform's ``Trainer`` (LM LoRA, frozen vision tower, as the demo runs) on tasks
   never in the pretraining mix -- ``corners`` (a new question about known shapes), ``line`` (a new visual
   concept: above or below a line), ``ground_arrow`` (grounding a new object kind) -- on the random tiny base and
   on the pretrained one, against chance (the most frequent answer / the mean box).

Usage: OMP_NUM_THREADS=1 .venv/bin/python bench/pretrain_tiny.py [--steps 4000] [--out DIR] [--base DIR]
(``--base`` skips pretraining and measures an existing pretrained directory)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def weights_mb(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors")) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="pretraining steps (default: the recipe's)")
    parser.add_argument("--out", type=Path, default=None, help="keep the pretrained model here (new directory)")
    parser.add_argument("--base", type=Path, default=None, help="measure this pretrained directory instead")
    parser.add_argument("--eval-per-task", type=int, default=100)
    parser.add_argument("--ft-steps", type=int, default=300)
    parser.add_argument("--ft-tasks", default="corners,line,ground_arrow")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from qwenvl_core.models.qwen_vl.materialize import write_random_model
    from qwenvl_core.models.registry import detect_family
    from qwenvl_core.pretrain.recipe import (
        FineTuneCheck,
        PretrainConfig,
        chance,
        evaluate_tasks,
        pretrain_base,
        run_fine_tune,
    )
    from qwenvl_core.pretrain.render import PRETRAIN_TASKS

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        random_dir = write_random_model(root / "random", preset="qwen-vl-tiny", seed=0)
        base = args.base
        if base is None:
            config = PretrainConfig() if args.steps is None else PretrainConfig(steps=args.steps)
            print(f"pretraining: {config}")
            base, log = pretrain_base(args.out or root / "pretrained", config, log_every=max(1, config.steps // 10),
                                      on_log=lambda s, loss: print(f"  step {s:5d}  loss {loss:.3f}", flush=True))
            print(f"pretraining wall time: {log.seconds:.0f} s on 1 thread; weights {weights_mb(base):.2f} MB")

        print(f"\nheld-out accuracy on the pretraining tasks ({args.eval_per_task} per task):")
        scores = {}
        for name, directory in (("random qwen-vl-tiny", random_dir), ("pretrained", base)):
            family = detect_family(directory)
            model, processor = family.load_model(directory), family.load_processor(directory)
            scores[name] = evaluate_tasks(model, processor, list(PRETRAIN_TASKS), 1, args.eval_per_task,
                                          family.stop_token_ids(processor))
        print(f"  {'task':18s} {'random':>8s} {'pretrained':>10s}")
        for task in PRETRAIN_TASKS:
            print(f"  {task:18s} {scores['random qwen-vl-tiny'][task]:8.3f} {scores['pretrained'][task]:10.3f}")

        print(f"\nLoRA fine-tunes on held-out tasks ({args.ft_steps} steps of 8, LM LoRA r16, frozen vision tower):")
        print(f"  {'task':14s} {'chance':>7s} {'random base':>12s} {'pretrained':>11s} {'(before FT)':>11s}")
        for task in args.ft_tasks.split(","):
            check = FineTuneCheck(task, steps=args.ft_steps)
            out = {}
            for name, directory in (("random", random_dir), ("pretrained", base)):
                start = time.monotonic()
                metrics = run_fine_tune(directory, check, root / f"ft-{task}-{name}")
                key = "grounding_accuracy" if "eval/grounding_accuracy" in metrics else "exact_match"
                out[name] = (metrics[f"eval/{key}"], metrics[f"eval_base/{key}"], time.monotonic() - start)
            print(f"  {task:14s} {chance(check):7.3f} {out['random'][0]:12.3f} {out['pretrained'][0]:11.3f} "
                  f"{out['pretrained'][1]:11.3f}   ({out['random'][2]:.0f} s / {out['pretrained'][2]:.0f} s)")


if __name__ == "__main__":
    main()
