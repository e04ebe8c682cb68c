"""The host's share of a serving engine's decode step: this tree against an earlier revision (``--before-rev``, in a
git worktree) in the same run.

Why: a GPU runs a decode step's forward (replayed from a CUDA graph, or launched op by op) while the host waits for
its sampled tokens; then the host does each row's work alone before it can launch the next step: the token's text
(incremental detokenisation, stop strings), the metrics, the stream event handed to the request's event loop. That
work grows with the rows (64 on a GPU by default) and the device idles through it, whatever the device: so it is
measured here, on the CPU, as the step's wall time less its forward's.

``--rows`` requests stream through ``ServingEngine.stream`` on one event loop, as a replica serves them (metrics on;
read as a Serve replica reads them, ``--coalesce-ms``), ``--tokens`` new tokens each, on a model with few layers (a
small forward, so the host's part stands out). Per forward: the whole step, the forward, and the rest (the host's
work, sampling's choice included). Each revision runs in its own process, ``--rounds`` times alternately; the best
round of each is printed, then after / before.

The event loop's thread shares the GIL with the engine's: a reader woken for every event (``--coalesce-ms none`` or
``0``) resumes ``--rows`` coroutines a step, and on this 2-vCPU VM whether that work lands beside the forward's
kernels (which release the GIL) or between the engine's Python is a matter of phase: such runs come out bimodal
(docs/benchmarks.md).

Usage: .venv/bin/python bench/host_step.py [--preset qwen-vl-tiny] [--rows 64] [--before-rev 8ec8255]
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from revisions import before_tree, run_json


def measure(preset: str, rows: int, tokens: int, coalesce_ms: float | None) -> dict[str, float]:
    """(in the tree on ``sys.path``) ms per forward of the engine's steps while ``rows`` streams run: step, forward,
    host (step less forward). The streams are read as ``stream(coalesce=coalesce_ms / 1000)`` where the tree's
    engine has that, else event by event."""
    from prometheus_client import CollectorRegistry
    from serving_throughput import _fixed_length, _prompt

    from qwenvl_core.conversation import text_message
    from qwenvl_core.models.registry import family_for_preset
    from qwenvl_core.serving.engine import EngineConfig, EngineRequest, ServingEngine
    from qwenvl_core.serving.metrics import ServingMetrics

    family = family_for_preset(preset)
    model_dir = family.materialize(preset, Path(tempfile.mkdtemp(prefix="bench-host-step-")) / "model", seed=0)
    engine = ServingEngine.from_model_dir(model_dir, EngineConfig(max_batch_size=rows, max_total_tokens=256,
                                                                  device="cpu"),
                                          metrics=ServingMetrics(CollectorRegistry()))
    spent = {"step": 0.0, "forward": 0.0}

    def timed(name: str, call: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start
        return run

    engine._step, engine._forward = timed("step", engine._step), timed("forward", engine._forward)
    reading = {}
    if coalesce_ms is not None and "coalesce" in inspect.signature(engine.stream).parameters:
        reading["coalesce"] = coalesce_ms / 1000

    async def stream_all(new_tokens: int) -> None:
        async def one(i: int) -> None:
            request = EngineRequest([text_message("user", _prompt(i))], _fixed_length(engine, new_tokens))
            async for _event in engine.stream(request, **reading):
                pass
        await asyncio.gather(*(one(i) for i in range(rows)))

    try:
        asyncio.run(stream_all(8))  # warm-up
        spent.update(step=0.0, forward=0.0)
        forwards = engine.stats.forwards
        asyncio.run(stream_all(tokens))
        n = engine.stats.forwards - forwards
    finally:
        engine.close()
    return {"step": spent["step"] / n * 1e3, "forward": spent["forward"] / n * 1e3,
            "host": (spent["step"] - spent["forward"]) / n * 1e3, "forwards": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen-vl-tiny")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before-rev", default="8ec8255", help="git revision to compare with ('' to skip)")
    parser.add_argument("--coalesce-ms", type=lambda v: None if v == "none" else float(v), default=50.0,
                        help="read the streams with ServingEngine.stream(coalesce=...) where the revision has it "
                             "(default 50: a Serve replica's reading; 0: the in-process backend's); 'none': event by "
                             "event")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one revision's times, as JSON on the last line
        print(json.dumps(measure(args.preset, args.rows, args.tokens, args.coalesce_ms)))
        return

    def measured(tree: Path) -> dict[str, float]:
        return run_json(tree, "host_step.py", [
            "--child", "--preset", args.preset, "--rows", str(args.rows), "--tokens", str(args.tokens),
            "--coalesce-ms", "none" if args.coalesce_ms is None else str(args.coalesce_ms)])

    trees = {"after": Path(__file__).resolve().parent.parent}
    with before_tree(args.before_rev, ["host_step.py"]) as before:
        if before is not None:
            trees["before"] = before
        runs: dict[str, list[dict[str, float]]] = {label: [] for label in trees}
        for _ in range(args.rounds):  # alternately: the machine's noise falls on both
            for label, tree in trees.items():
                runs[label].append(measured(tree))
    print(f"preset={args.preset} rows={args.rows} tokens={args.tokens} rounds={args.rounds} "
          f"coalesce_ms={args.coalesce_ms}; ms per forward "
          "(best round by host time): the engine's step, its forward, the host's work (step - forward)")
    best = {label: min(results, key=lambda r: r["host"]) for label, results in runs.items()}
    for label, result in best.items():
        rev = "working tree" if label == "after" else args.before_rev
        print(f"{label:6} ({rev}): step={result['step']:.2f} forward={result['forward']:.2f} "
              f"host={result['host']:.2f} ({result['host'] / args.rows * 1e3:.1f} us a row; "
              f"{result['forwards']:.0f} forwards)  all rounds' host: "
              + " ".join(f"{r['host']:.2f}" for r in runs[label]))
    if "before" in best:
        print(f"host after/before={best['after']['host'] / best['before']['host']:.2f}  "
              f"step after/before={best['after']['step'] / best['before']['step']:.2f}")


if __name__ == "__main__":
    main()
