"""A candidate v1 recipe with more grounding: build it as ``ship`` builds the shipped base, and measure it.

The candidate (docs/pretraining.md section 5): the shipped recipe plus a ``box`` readout in the vision warm-up (a
linear regression of the object's corners, objects 16-60 px) and ``render.GROUNDING_TASKS`` in the LM stage
(``ground_one``: a lone object of any size, a ninth of the mix). Writes a complete shippable directory (weights,
``training_defaults.json``, ``pretraining.json``) with ``ship.build`` and prints the warm-up's held-out readouts and
held-out accuracy on rendered tasks (greedy answers; grounding: IoU >= 0.5). Then measure fine-tunes with
``bench/auto_tiny.py --base OUT``.

Usage: OMP_NUM_THREADS=1 .venv/bin/python bench/pretrain_grounding.py --out DIR [--steps 4000]
(~35 min on one thread of a loaded 2-core machine)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="new directory for the candidate base")
    parser.add_argument("--steps", type=int, default=4000, help="LM-stage steps")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from qwenvl_core.models.registry import detect_family
    from qwenvl_core.pretrain import ship
    from qwenvl_core.pretrain.recipe import PretrainConfig, evaluate_tasks
    from qwenvl_core.pretrain.render import GROUNDING_TASKS

    config = PretrainConfig(steps=args.steps, vision_warmup_targets=("shape", "colour", "region", "box"),
                            vision_warmup_side=(16, 60), tasks=tuple(GROUNDING_TASKS))
    out = ship.build(args.out, config)
    manifest = json.loads((out / "pretraining.json").read_text())
    print("vision warm-up held-out readouts:", manifest["vision_warmup"])
    family = detect_family(out)
    model, processor = family.load_model(out), family.load_processor(out)
    scores = evaluate_tasks(model, processor, ("ground", "ground_one", "grounded_caption", "shape", "region", "count"),
                            seed=7, n_per_task=100, stop_ids=family.stop_token_ids(processor))
    print("held-out (100 each):", json.dumps(scores))


if __name__ == "__main__":
    main()
