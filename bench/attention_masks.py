"""The serving engine with and without explicit attention masks where causal attention is exact (issue 13):
wall time of the same requests with ``SlotKVCache.force_masks`` off (SDPA's fused causal kernel, no mask) and on
(the 4-D boolean mask every forward), alternated on one engine so both see the same machine load.

Workloads: one request at a time (a single-row prefill of a long prompt, then single-row decode steps), and
``--rows`` requests of one prompt length together (no left padding, rows of one length). Prints each time and the
ratio masked / maskless (> 1: the maskless path is faster).

Usage (CPU):  OMP_NUM_THREADS=1 .venv/bin/python bench/attention_masks.py [--preset qwen-vl-small]
GPU:          .venv/bin/python bench/attention_masks.py --preset qwen-vl-chat --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import torch

from qwenvl_core.conversation import text_message
from qwenvl_core.generation import SamplingParams
from qwenvl_core.models.registry import family_for_preset
from qwenvl_core.serving.engine import EngineConfig, EngineRequest, ServingEngine


def _requests(engine: ServingEngine, rows: int, words: int, tokens: int) -> list[EngineRequest]:
    stops = tuple(engine.family.stop_token_ids(engine.processor))
    params = SamplingParams(max_new_tokens=tokens, suppress_token_ids=stops)  # exactly ``tokens`` new tokens
    prompt = "describe the picture " + "in detail " * words
    return [EngineRequest([text_message("user", prompt)], params) for _ in range(rows)]


def _seconds(engine: ServingEngine, requests: list[EngineRequest]) -> float:
    async def run() -> None:
        await asyncio.gather(*(engine.generate(r) for r in requests))

    start = time.perf_counter()
    asyncio.run(run())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen-vl-small")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--words", type=int, default=120, help="prompt length (words of filler)")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--rows", type=int, default=8, help="rows of the equal-length batch")
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    family = family_for_preset(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = family.materialize(args.preset, Path(tmp) / args.preset, dtype=getattr(torch, args.dtype))
        config = EngineConfig(max_batch_size=args.rows, max_total_tokens=2048, prefill_chunk_tokens=0,
                              device=args.device)
        engine = ServingEngine.from_model_dir(model_dir, config, dtype=getattr(torch, args.dtype))
        try:
            print(f"preset={args.preset} device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} "
                  f"prompt={len(engine.processor.encode_chat(_requests(engine, 1, args.words, 1)[0].messages).input_ids)}"
                  f" tokens new={args.tokens} rows={args.rows}")
            for name, rows in (("one row", 1), (f"{args.rows} equal rows", args.rows)):
                requests = _requests(engine, rows, args.words, args.tokens)
                _seconds(engine, requests)  # warm-up
                times: dict[bool, list[float]] = {False: [], True: []}
                for _ in range(args.repeats):
                    for force in (False, True):
                        engine.kv.force_masks = force
                        times[force].append(_seconds(engine, requests))
                maskless, masked = statistics.median(times[False]), statistics.median(times[True])
                print(f"{name}: maskless {maskless * 1000:.0f} ms, masked {masked * 1000:.0f} ms, "
                      f"ratio masked/maskless={masked / maskless:.3f}")
        finally:
            engine.close()


if __name__ == "__main__":
    main()
