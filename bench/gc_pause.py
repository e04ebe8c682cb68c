"""Python GC pauses in a model replica, with and without ``freeze_startup_heap`` (the replica's default).

A full (generation 2) collection stops every thread of the process, the engine's included, for as long as it walks
the tracked objects; every stream of the replica waits meanwhile. This builds what a replica holds (it imports
``workflows.serve_app``: Ray, Serve, FastAPI; the engine with a model and 8 adapters), serves mixed image + text
traffic, and measures in one process:

1. the unfrozen heap: collections per generation during the traffic (count, longest pause, with ``gc.callbacks``),
   the longest inter-token gap, and three explicit full collections;
2. the same after ``workflows.serve_app.freeze_startup_heap()``: what a replica does once its engine has started.

It prints the full-collection pause before / after as a ratio. Which pause the traffic itself meets depends on how
many objects requests leave behind, so the per-generation counts are printed too: after the freeze Python runs its
full collections more often (its threshold is a quarter of the long-lived objects, and the frozen ones no longer
count), each walking only what was allocated since.

Command: ``.venv/bin/python bench/gc_pause.py [--preset qwen-vl-small] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class PauseProbe:
    """Every collection's pause per generation, while installed."""

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._start = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses[info["generation"]].append(time.perf_counter() - self._start)

    def __enter__(self) -> PauseProbe:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *_exc: object) -> None:
        gc.callbacks.remove(self)

    def row(self) -> str:
        return "  ".join(f"gen{g}: {len(p)} (longest {max(p, default=0) * 1000:.1f} ms)" for g, p in self.pauses.items())


def full_collection_ms(times: int = 3) -> float:
    pauses = []
    for _ in range(times):
        start = time.perf_counter()
        gc.collect()
        pauses.append((time.perf_counter() - start) * 1000)
    return statistics.median(pauses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen-vl-small")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of 32 concurrent requests per phase")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    import torch
    from serving_throughput import latency_under_load, make_adapters

    import workflows.serve_app as serve_app  # what a replica imports: Ray, Serve, FastAPI
    from qwenvl_core.models.registry import family_for_preset
    from qwenvl_core.serving.engine import EngineConfig, ServingEngine

    family = family_for_preset(args.preset)
    work = Path(tempfile.mkdtemp(prefix="bench-gc-"))
    model_dir = family.materialize(args.preset, work / "model", seed=0, dtype=torch.float32)
    adapters = make_adapters(family, model_dir, work / "adapters", 8, 16)
    engine = ServingEngine.from_model_dir(model_dir, EngineConfig(max_batch_size=32, device=args.device,
                                                                  max_adapters=10))
    engine.start()
    latency_under_load(engine, adapters, 32, 8, 224)  # warm-up: adapters loaded, buffers sized
    results = {}
    for phase in ("unfrozen", "frozen"):
        if phase == "frozen":
            serve_app.freeze_startup_heap()
        tracked = len(gc.get_objects())
        with PauseProbe() as probe:
            gaps = [latency_under_load(engine, adapters, 32, 32, 224)["max_gap"] for _ in range(args.rounds)]
        full = full_collection_ms()
        results[phase] = full
        print(f"{phase}: tracked {tracked:,} objects, frozen {gc.get_freeze_count():,}; during {args.rounds} rounds "
              f"of traffic: {probe.row()}; longest inter-token gap {max(gaps) * 1000:.0f} ms; "
              f"a full collection after: {full:.3f} ms (median of 3)", flush=True)
    engine.close()
    ratio = results["unfrozen"] / max(results["frozen"], 1e-3)
    print(f"full collection pause: unfrozen {results['unfrozen']:.1f} ms, frozen {results['frozen']:.3f} ms: "
          f"{ratio:,.0f}x shorter")


if __name__ == "__main__":
    main()
