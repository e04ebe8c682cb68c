"""The engine in a thread of its caller's process vs in a process of its own (``engine_process.EngineProcess``),
while the caller's event loop works for every item it reads, as a Serve replica's loop does for every item it
streams (~0.6 ms of CPU each on this project's 2-vCPU VM: docs/benchmarks.md), in the same run. No Ray: it runs
wherever the engine runs, a GPU machine without Ray included.

Why: the engine's model thread gives the GIL up around every torch call and must take it back after; with the
engine in a thread, the loop's work per item holds the GIL the model thread waits for. On a GPU, where a step's
host work sits between the device's forwards, those waits lengthen every step; in a process of its own the model
thread shares the GIL with nobody doing that work.

``--rows`` concurrent streams of ``--tokens`` new tokens (greedy, the stop tokens suppressed), read as a Serve
replica reads them (``--interval-ms``: at most one joined event per interval), the loop spinning ``--item-work-ms``
of Python per item read (each value of the list in turn; 0: the control, where only the process's socket hop
differs), the engine in a thread and in a process in turn, ``--rounds`` times. Printed per work and engine: generated
tokens per second from the first request to the last stream's end (best round, and all rounds), then the process's
over the thread's.

Usage: .venv/bin/python bench/engine_process.py [--preset qwen-vl-tiny] [--device cpu] [--dtype float32]
       [--rows 64] [--tokens 64] [--item-work-ms 0,0.6] [--interval-ms 50] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import torch

from qwenvl_core.conversation import text_message
from qwenvl_core.generation import SamplingParams
from qwenvl_core.models.registry import family_for_preset
from qwenvl_core.serving.engine import EngineConfig, EngineRequest, ServingEngine
from qwenvl_core.serving.engine_process import EngineProcess


def spin(seconds: float) -> None:
    """Python work holding the GIL for ``seconds`` (a transport's work on an item)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def tokens_per_s(engine: ServingEngine | EngineProcess, rows: int, params: SamplingParams, interval: float,
                 work: float) -> float:
    async def one(i: int) -> int:
        request = EngineRequest([text_message("user", f"describe picture number {i}")], params)
        generated = 0
        async for event in engine.stream(request, coalesce=interval):
            spin(work)
            generated += len(event.token_ids)
        return generated

    async def run_all() -> float:
        start = time.perf_counter()
        counts = await asyncio.gather(*(one(i) for i in range(rows)))
        return sum(counts) / (time.perf_counter() - start)

    return asyncio.run(run_all())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen-vl-tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--item-work-ms", default="0,0.6", help="the loop's work per item read, ms (a list)")
    parser.add_argument("--interval-ms", type=float, default=50.0, help="a stream's events joined over this")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    family = family_for_preset(args.preset)
    dtype = getattr(torch, args.dtype)
    model_dir = family.materialize(args.preset, Path(tempfile.mkdtemp(prefix="bench-engine-process-")) / "model",
                                   seed=0, dtype=dtype)
    params = SamplingParams(max_new_tokens=args.tokens,
                            suppress_token_ids=tuple(family.stop_token_ids(family.load_processor(model_dir))))
    config = EngineConfig(max_batch_size=args.rows, max_total_tokens=256, device=args.device)
    engines: dict[str, ServingEngine | EngineProcess] = {
        "thread": ServingEngine.from_model_dir(model_dir, config, dtype=dtype),
        "process": EngineProcess(model_dir, config, dtype=args.dtype)}
    works = [float(ms) for ms in args.item_work_ms.split(",")]
    runs: dict[tuple[float, str], list[float]] = {(w, name): [] for w in works for name in engines}
    interval = args.interval_ms / 1000
    try:
        for engine in engines.values():  # warm-up: first steps, lazily loaded kernels
            tokens_per_s(engine, args.rows, params, interval, 0.0)
        for _ in range(args.rounds):  # in turn: the machine's noise falls on every variant
            for work in works:
                for name, engine in engines.items():
                    runs[work, name].append(tokens_per_s(engine, args.rows, params, interval, work / 1000))
    finally:
        for engine in engines.values():
            engine.close()
    print(f"preset={args.preset} device={args.device} dtype={args.dtype} rows={args.rows} tokens={args.tokens} "
          f"interval={args.interval_ms:g} ms rounds={args.rounds}: tokens/s, best round (all rounds)")
    for work in works:
        best = {name: max(runs[work, name]) for name in engines}
        for name in engines:
            print(f"loop work {work:g} ms an item, engine in a {name}: {best[name]:.0f} tokens/s ("
                  + " ".join(f"{r:.0f}" for r in runs[work, name]) + ")")
        print(f"loop work {work:g} ms an item: process / thread {best['process'] / best['thread']:.2f}")


if __name__ == "__main__":
    main()
