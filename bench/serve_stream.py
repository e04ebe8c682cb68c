"""Streaming through Ray Serve: many concurrent streams from one model replica to their consumer, this tree
against an earlier revision (``--before-rev``, in a git worktree) in the same run.

Why: every item a Serve deployment streams is a Ray object on its way from the replica to the caller (~0.6 ms of
CPU each on this project's 2-vCPU VM, ~1.5k items a second per replica: docs/benchmarks.md), while a GPU batch of
64 rows makes an event per row per step, thousands a second. A replica that sends each event alone falls behind
its engine, and its event loop takes the host from the engine's thread.

Each revision runs in its own process: a local Ray (``--cpus``), the model deployment of ``workflows.serve_app``
on a tiny model (one replica, batch ``--rows``), and ``--rows`` concurrent streams of ``--tokens`` new tokens sent
by this process through ``ServeBackend`` (what the API's ingress does), greedy, the stop tokens suppressed. Printed
per revision: the generated tokens per second from the first request to the last stream's end, and the items each
stream received. Then after / before.

Usage: .venv/bin/python bench/serve_stream.py [--rows 64] [--tokens 64] [--before-rev 2a3717d]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from revisions import worktree


def measure(preset: str, rows: int, tokens: int, cpus: int) -> dict[str, float]:
    """(in the tree on ``sys.path``) one run of ``rows`` concurrent streams through a Serve model deployment."""
    import ray
    from ray import serve
    from serving_throughput import _prompt

    from qwenvl_core.conversation import text_message
    from qwenvl_core.generation import SamplingParams
    from qwenvl_core.models.registry import family_for_preset
    from qwenvl_core.serving.engine import EngineConfig, EngineRequest
    from workflows.serve_app import APP_NAME, ModelDeploymentConfig, ServeBackend, model_deployment

    family = family_for_preset(preset)
    model_dir = family.materialize(preset, Path(tempfile.mkdtemp(prefix="bench-serve-stream-")) / "model", seed=0)
    config = ModelDeploymentConfig(preset, str(model_dir), num_cpus=1,
                                   engine=EngineConfig(max_batch_size=rows, max_total_tokens=256, device="cpu"))
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        serve.run(model_deployment(config).bind(config), name=APP_NAME, route_prefix=None)
        backend = ServeBackend({preset: config.deployment_name})
        stops = tuple(family.stop_token_ids(family.load_processor(model_dir)))
        limit = SamplingParams(max_new_tokens=tokens, suppress_token_ids=stops)

        async def one(i: int) -> tuple[int, int, float]:
            request = EngineRequest([text_message("user", _prompt(i))], limit)
            items, generated, last = 0, 0, 0.0
            async for event in backend.stream(preset, request):
                items, generated, last = items + 1, generated + len(event.token_ids), time.perf_counter()
            return items, generated, last

        async def run_all() -> tuple[list[tuple[int, int, float]], float]:
            start = time.perf_counter()
            return await asyncio.gather(*(one(i) for i in range(rows))), start

        asyncio.run(run_all())  # warm-up: the replica's first steps, Ray's first objects
        results, start = asyncio.run(run_all())
    finally:
        serve.shutdown()
        ray.shutdown()
    ends = [last for _, _, last in results]
    generated = sum(g for _, g, _ in results)
    return {"tokens_per_s": generated / (max(ends) - start), "items_per_stream": sum(i for i, _, _ in results) / rows,
            "tokens_per_stream": generated / rows, "seconds": max(ends) - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen-vl-tiny")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--cpus", type=int, default=2, help="the local Ray's CPUs")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--before-rev", default="2a3717d", help="git revision to compare with ('' to skip)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one revision's figures, as JSON on the last line
        print(json.dumps(measure(args.preset, args.rows, args.tokens, args.cpus)))
        return

    def measured(tree: Path) -> dict[str, float]:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(tree / "bench"),
                                                            os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run([sys.executable, str(tree / "bench" / "serve_stream.py"), "--child", "--preset",
                               args.preset, "--rows", str(args.rows), "--tokens", str(args.tokens), "--cpus",
                               str(args.cpus)], capture_output=True, text=True, env=env, cwd=tree)
        if done.returncode != 0:
            raise SystemExit(f"measuring in {tree} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    trees = {"after": Path(__file__).resolve().parent.parent}
    with worktree(args.before_rev) if args.before_rev else contextlib.nullcontext() as before:
        if before is not None:  # this script into the old tree (it may predate it), run on that tree's code
            for name in ("serve_stream.py", "revisions.py"):
                (before / "bench" / name).write_text((Path(__file__).parent / name).read_text())
            trees["before"] = before
        elif args.before_rev:
            print(f"(no git history with {args.before_rev} here: no 'before' rows)")
        runs: dict[str, list[dict[str, float]]] = {label: [] for label in trees}
        for _ in range(args.rounds):  # alternately: the machine's noise falls on both
            for label, tree in trees.items():
                runs[label].append(measured(tree))
    print(f"preset={args.preset} rows={args.rows} tokens={args.tokens} ray cpus={args.cpus} rounds={args.rounds}: "
          f"{args.rows} concurrent streams from one Serve model replica (best round)")
    best = {label: max(results, key=lambda r: r["tokens_per_s"]) for label, results in runs.items()}
    for label, result in best.items():
        rev = "working tree" if label == "after" else args.before_rev
        print(f"{label:6} ({rev}): {result['tokens_per_s']:.0f} tokens/s ({result['seconds']:.2f} s), "
              f"{result['items_per_stream']:.1f} items for {result['tokens_per_stream']:.0f} tokens a stream; all "
              "rounds' tokens/s: " + " ".join(f"{r['tokens_per_s']:.0f}" for r in runs[label]))
    if "before" in best:
        print(f"tokens/s after/before={best['after']['tokens_per_s'] / best['before']['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
