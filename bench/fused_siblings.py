"""Decode-step time of the serving engine with the base's sibling layers as one matmul per group
(``EngineConfig.fuse_siblings="on"``: q / k / v and gate / up, v1's w1 / w2) against the separate layers ("off"),
in the same run: two engines over two copies of one model, 16 rows, rounds interleaved, min per step of each.

Why: on a GPU a decode step is bound by its launches, and fusing drops 3 a Qwen2/2.5-VL layer (1 a v1 layer;
``bench/step_ops.py`` counts them); on this project's CPU the fused matmuls ran slower, so the engine fuses only on
a GPU ("auto"). This prints what each costs where it runs: base rows, and rows over 8 adapters (the engine's LoRA
decode for the device: dense on a GPU, grouped on the CPU), as ms per step and the ratio fused / separate (below 1:
fusing pays). ``bench/gpu_check.sh`` runs it on the GPU (the ``fused_siblings`` row of its first pass).

Usage: .venv/bin/python bench/fused_siblings.py [--preset qwen2.5-vl-small] [--device cuda] [--dtype bfloat16]
       [--rounds 5] [--steps 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from serving_throughput import make_adapters
from step_ops import ROWS, finish, start_decoding

from qwenvl_core.models.registry import family_for_preset
from qwenvl_core.serving.engine import EngineConfig, ServingEngine


def step_ms(engine: ServingEngine, adapters: list[Path | None], steps: int) -> float:
    """Mean ms per decode step of ``ROWS`` rows (adapters round-robin), after their prefill and one untimed step.
    Each step reads its sampled tokens back from the device, so its time includes the device's work."""
    start_decoding(engine, adapters, steps + 2)
    start = time.perf_counter()
    for _ in range(steps):
        engine._step([])
    elapsed = (time.perf_counter() - start) / steps
    finish(engine)
    return 1000 * elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="qwen2.5-vl-small")
    parser.add_argument("--device", default=None, help="the engine's device (default: the GPU when one is visible)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()

    family = family_for_preset(args.preset)
    work = Path(tempfile.mkdtemp(prefix="bench-fused-"))
    model_dir = family.materialize(args.preset, work / "model", seed=0)
    adapters = make_adapters(family, model_dir, work / "adapters", 8, 8, torch.float32)
    dtype = getattr(torch, args.dtype)
    engines = {setting: ServingEngine.from_model_dir(model_dir, EngineConfig(
        max_batch_size=ROWS, max_adapters=10, max_lora_rank=8, fuse_siblings=setting, device=args.device),
        dtype=dtype) for setting in ("off", "on")}
    rows: dict[str, list[Path | None]] = {"base": [None], "8 adapters": list(adapters)}
    times = {(setting, name): [] for setting in engines for name in rows}
    try:
        for _ in range(args.rounds):  # interleaved: a slow spell of a shared machine hits both
            for name, chosen in rows.items():
                for setting, engine in engines.items():
                    times[(setting, name)].append(step_ms(engine, chosen, args.steps))
        device = engines["on"].device
    finally:
        for engine in engines.values():
            engine.close()
    print(f"preset={args.preset} device={device} dtype={args.dtype} rows={ROWS} steps={args.steps} "
          f"rounds={args.rounds}; ms per decode step (min of rounds):")
    for name in rows:
        separate, fused = min(times[("off", name)]), min(times[("on", name)])
        print(f"{name:11s} separate={separate:.2f}  fused={fused:.2f}  fused/separate={fused / separate:.3f}")


if __name__ == "__main__":
    main()
