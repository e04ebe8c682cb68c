"""Streaming through Ray Serve: many concurrent streams from one model replica, each stream's events sent one by
one against joined over an interval (``ModelDeploymentConfig.stream_interval_s``, ``QWENVL_SERVE_STREAM_INTERVAL_MS``),
in the same run.

Why: every item a Serve deployment streams is a Ray object on its way from the replica to the caller (~0.6 ms of
CPU each on this project's 2-vCPU VM: docs/benchmarks.md), while a GPU batch of 64 rows makes an event per row per
step, thousands a second. Serve takes a replica's items as they come, so joining only what is ready never
happens there; a replica that sends each event alone spends its host on the transport, beside its engine's thread.

A local Ray (``--cpus``) runs the model deployment of ``workflows.serve_app`` on a tiny model (one replica, batch
``--rows``), its engine in a thread of the replica's process or in a process of its own (``--engines``;
``ModelDeploymentConfig.engine_process``); this process sends ``--rows`` concurrent streams of ``--tokens`` new
tokens through ``ServeBackend`` (what the API's ingress does), greedy, the stop tokens suppressed, once per engine and
interval of ``--intervals`` (ms; the deployment redeployed with each), ``--rounds`` times in turn, then as many
completions that are not streamed to their client (``EngineRequest.streamed`` False: one item each). Printed per
engine and interval and for those (best round): generated tokens per second from the first request to the last
stream's end, items per stream, and the longest wait between two items of a stream; then ratios over the first
interval's and over the first engine's.

``--device-wait-ms``: every forward waits this much longer, the host idle and the GIL free, as a host waits for a
GPU's forward (a ``sitecustomize`` on the ``PYTHONPATH`` that Ray's workers and the engines' processes inherit): most
of a step is then a wait, as on a GPU, not the tiny model's work on this VM's 2 cores, and the host's work competes
with the engine's for the GIL more than for the cores.

Usage: PYTHONPATH=.:bench .venv/bin/python bench/serve_stream.py [--rows 64] [--tokens 64] [--intervals 0,50]
       [--engines thread,process] [--device-wait-ms 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import ray
from ray import serve
from serving_throughput import _prompt

from qwenvl_core.conversation import text_message
from qwenvl_core.generation import SamplingParams
from qwenvl_core.models.registry import family_for_preset
from qwenvl_core.serving.engine import EngineConfig, EngineRequest
from workflows.serve_app import APP_NAME, ModelDeploymentConfig, ServeBackend, model_deployment


def streams(backend: ServeBackend, model: str, rows: int, params: SamplingParams,
            streamed: bool = True) -> dict[str, float]:
    """``rows`` concurrent streams: tokens/s, items per stream, the longest gap between two items of a stream
    (``streamed`` False: completions not streamed to their client, ``EngineRequest.streamed``)."""
    async def one(i: int) -> tuple[int, int, float, float]:
        request = EngineRequest([text_message("user", _prompt(i))], params, streamed=streamed)
        items, generated, last, gap = 0, 0, None, 0.0
        async for event in backend.stream(model, request):
            now = time.perf_counter()
            gap = gap if last is None else max(gap, now - last)
            items, generated, last = items + 1, generated + len(event.token_ids), now
        return items, generated, last or float("nan"), gap

    async def run_all() -> tuple[list[tuple[int, int, float, float]], float]:
        start = time.perf_counter()
        return await asyncio.gather(*(one(i) for i in range(rows))), start

    results, start = asyncio.run(run_all())
    seconds = max(r[2] for r in results) - start
    return {"tokens_per_s": sum(r[1] for r in results) / seconds, "seconds": seconds,
            "items_per_stream": sum(r[0] for r in results) / rows, "tokens_per_stream": sum(r[1] for r in results) / rows,
            "max_gap_ms": max(r[3] for r in results) * 1000}


DEVICE_WAIT = """\
import os, time
from qwenvl_core.serving import engine as _engine
_wait, _forward = float(os.environ["QWENVL_BENCH_DEVICE_WAIT_MS"]) / 1000, _engine.ServingEngine._forward
def _waiting_forward(self, *args, **kwargs):
    logits = _forward(self, *args, **kwargs)
    time.sleep(_wait)  # a device's forward: the host waits without the GIL
    return logits
_engine.ServingEngine._forward = _waiting_forward
"""


def device_wait(ms: float) -> None:
    """Every engine forward of this run's processes (Ray's workers, the engines' own) then waits ``ms`` more,
    without the GIL, as a host waits for a GPU's forward: a ``sitecustomize`` on their ``PYTHONPATH``, which every
    process started from here inherits."""
    folder = Path(tempfile.mkdtemp(prefix="bench-device-wait-"))
    (folder / "sitecustomize.py").write_text(DEVICE_WAIT)
    os.environ["QWENVL_BENCH_DEVICE_WAIT_MS"] = str(ms)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), str(Path(__file__).resolve().parents[1]),
                                                           os.environ.get("PYTHONPATH")) if p)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen-vl-tiny")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--intervals", default="0,50", help="stream intervals to compare, ms (the first: baseline)")
    parser.add_argument("--engines", default="thread,process",
                        help="where each replica's engine runs: 'thread' (of the replica's process), 'process' (its "
                             "own, ModelDeploymentConfig.engine_process); the first is the baseline")
    parser.add_argument("--device-wait-ms", type=float, default=0.0,
                        help="add this wait to every forward, the host idle and the GIL free, as a GPU's forward")
    parser.add_argument("--cpus", type=int, default=2, help="the local Ray's CPUs")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.device_wait_ms:
        device_wait(args.device_wait_ms)  # before Ray starts: its workers inherit the environment
    family = family_for_preset(args.preset)
    model_dir = family.materialize(args.preset, Path(tempfile.mkdtemp(prefix="bench-serve-stream-")) / "model", seed=0)
    params = SamplingParams(max_new_tokens=args.tokens,
                            suppress_token_ids=tuple(family.stop_token_ids(family.load_processor(model_dir))))
    intervals = [int(ms) for ms in args.intervals.split(",")]
    engines = args.engines.split(",")
    variants = [(engine, ms) for engine in engines for ms in [*intervals, "plain"]]
    runs: dict[tuple[str, int | str], list[dict[str, float]]] = {v: [] for v in variants}
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        for _ in range(args.rounds):  # in turn: the machine's noise falls on every variant
            for engine in engines:
                for ms in intervals:
                    config = ModelDeploymentConfig(args.preset, str(model_dir), num_cpus=1,
                                                   stream_interval_s=ms / 1000, engine_process=engine == "process",
                                                   engine=EngineConfig(max_batch_size=args.rows, max_total_tokens=256,
                                                                       device="cpu"))
                    serve.run(model_deployment(config).bind(config), name=APP_NAME, route_prefix=None)
                    backend = ServeBackend({args.preset: config.deployment_name})
                    streams(backend, args.preset, args.rows, params)  # warm-up: the replica's first steps and objects
                    runs[engine, ms].append(streams(backend, args.preset, args.rows, params))
                    if ms == intervals[-1]:  # completions not streamed to their client: one item each
                        runs[engine, "plain"].append(streams(backend, args.preset, args.rows, params, streamed=False))
                    serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"preset={args.preset} rows={args.rows} tokens={args.tokens} ray cpus={args.cpus} rounds={args.rounds} "
          f"device wait={args.device_wait_ms:g} ms a forward: {args.rows} concurrent streams from one Serve model "
          "replica (best round)")
    best = {v: max(results, key=lambda r: r["tokens_per_s"]) for v, results in runs.items()}
    for (engine, ms), result in best.items():
        name = "not streamed" if ms == "plain" else f"stream_interval={ms} ms"
        print(f"engine in a {engine}, {name}: {result['tokens_per_s']:.0f} tokens/s ({result['seconds']:.2f} s), "
              f"{result['items_per_stream']:.1f} items for {result['tokens_per_stream']:.0f} tokens a stream, "
              f"longest gap between items {result['max_gap_ms']:.0f} ms; all rounds' tokens/s: "
              + " ".join(f"{r['tokens_per_s']:.0f}" for r in runs[engine, ms]))
    first = intervals[0]
    for engine in engines:
        print(f"engine in a {engine}, tokens/s over interval {first}'s: " + "  ".join(
            f"{ms}={best[engine, ms]['tokens_per_s'] / best[engine, first]['tokens_per_s']:.2f}"
            for ms in [*intervals[1:], "plain"]))
    for engine in engines[1:]:
        print(f"engine in a {engine} over in a {engines[0]}, tokens/s: " + "  ".join(
            f"{ms}={best[engine, ms]['tokens_per_s'] / best[engines[0], ms]['tokens_per_s']:.2f}"
            for ms in [*intervals, "plain"]))


if __name__ == "__main__":
    main()
