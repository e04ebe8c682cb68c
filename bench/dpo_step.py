"""DPO step time vs SFT step time on the same tokens.

One training step (forward, backward, AdamW) of each objective the loop calls (``qwenvl_core.training.objectives``)
on the same micro-batches: DPO takes n preference pairs (one reference forward of the 2n rows with the adapter
disabled and no gradients, then the policy forward + backward of the 2n rows), SFT takes the same 2n rows as plain
conversations (forward + backward, the LM head only at supervised positions). Same model, LoRA, tokens and labels
(the replies), so the ratio is DPO's own overhead: the extra no-grad reference forward and full-vocabulary
log-probabilities at the labelled positions. Steps alternate between the two objectives after one warm-up step of
each; wall time and this process's CPU time (one math thread) are reported.

Usage: .venv/bin/python bench/dpo_step.py [--preset qwen-vl-small] [--pairs 2] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="qwen-vl-small", help="a qwen-vl preset (random weights)")
    parser.add_argument("--pairs", type=int, default=2, help="preference pairs per micro-batch (SFT: 2x rows)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps of each objective")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from qwenvl_core.data import Collator, DataFormat, write_synth_dataset
    from qwenvl_core.data.preference import PreferenceDataset
    from qwenvl_core.data.validate import read_samples
    from qwenvl_core.models.qwen_vl.materialize import write_random_model
    from qwenvl_core.models.registry import detect_family
    from qwenvl_core.specs import LoraSpec, Precision, Quantization
    from qwenvl_core.training.dpo import DPOObjective
    from qwenvl_core.training.lora import apply_lora, load_base_model
    from qwenvl_core.training.objectives import SupervisedObjective

    root = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    model_dir = write_random_model(root / "model", preset=args.preset, seed=0)
    n = args.pairs * (args.steps + 1)
    data = write_synth_dataset(root / "data", DataFormat.PREFERENCE, n=n + 1, seed=0, bundles=False,
                               val_fraction=1 / (n + 1))
    family = detect_family(str(model_dir))
    processor = family.load_processor(str(model_dir))
    pairs = PreferenceDataset(read_samples(data.train), processor)
    model = apply_lora(load_base_model(str(model_dir), family, Quantization.NONE, Precision.FP32), family,
                       LoraSpec(r=64, alpha=16))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    engine = SimpleNamespace(model=model, module=model)
    collator = Collator(processor.pad_token_id)
    objectives: dict[str, Any] = {"sft": SupervisedObjective(collator), "dpo": DPOObjective(0.1, collator)}

    def batch(kind: str, step: int) -> list[Any]:
        chunk = [pairs[i] for i in range(step * args.pairs, (step + 1) * args.pairs)]
        return chunk if kind == "dpo" else [p.chosen for p in chunk] + [p.rejected for p in chunk]

    wall = {k: 0.0 for k in objectives}
    cpu = {k: 0.0 for k in objectives}
    tokens = 0
    for step in range(args.steps + 1):
        for kind, objective in objectives.items():
            rows = batch(kind, step)
            w0, c0 = time.perf_counter(), time.process_time()
            out = objective.step(engine, rows)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step > 0:  # step 0 warms up
                wall[kind] += time.perf_counter() - w0
                cpu[kind] += time.process_time() - c0
                tokens += int(out.tokens) if kind == "dpo" else 0
    steps = args.steps
    report = {
        "preset": args.preset, "pairs_per_step": args.pairs, "timed_steps": steps,
        "tokens_per_step": tokens / steps,
        "sft_step_s": wall["sft"] / steps, "dpo_step_s": wall["dpo"] / steps,
        "sft_step_cpu_s": cpu["sft"] / steps, "dpo_step_cpu_s": cpu["dpo"] / steps,
        "dpo_over_sft_wall": wall["dpo"] / wall["sft"], "dpo_over_sft_cpu": cpu["dpo"] / cpu["sft"],
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
