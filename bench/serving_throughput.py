"""Multi-adapter serving benchmark: mixed-adapter batches vs one adapter vs swapping adapters per request,
adapter cold-load latency (local disk, S3 on a local moto server), job-success-to-first-token, memory per adapter.

Generation throughput (generated tokens/s, greedy, fixed token count) of the same requests served as
- ``mixed``: the engine, batches mixing 8 adapters (grouped LoRA in one forward);
- ``single``: the engine, every request on the same adapter;
- ``swap``: peft with the 8 adapters loaded, ``set_adapter`` to each request's adapter, one request at a time
  (what a server without mixed-adapter batching does).

Usage (CPU, the numbers in docs/benchmarks.md):
    .venv/bin/python bench/serving_throughput.py
GPU (full-size random weights; needs the memory for a qwen-vl-chat model):
    .venv/bin/python bench/serving_throughput.py --preset qwen-vl-chat --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from qwenvl_core.conversation import text_message
from qwenvl_core.generation import SamplingParams, generate
from qwenvl_core.models.registry import get_family
from qwenvl_core.serving.adapter_cache import AdapterCache, AdapterFetcher
from qwenvl_core.serving.engine import EngineConfig, EngineRequest, ServingEngine
from qwenvl_core.serving.lora_batch import load_lora_weights
from qwenvl_core.storage import open_store, upload_dir


def make_adapters(model_dir: Path, out: Path, count: int, rank: int) -> list[Path]:
    from peft import LoraConfig, get_peft_model

    family = get_family("qwen-vl")
    dirs = []
    for i in range(count):
        torch.manual_seed(i + 1)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                            target_modules=list(family.default_lora_targets), task_type="CAUSAL_LM")
        get_peft_model(family.load_model(model_dir), config).save_pretrained(out / f"a{i}")
        dirs.append(out / f"a{i}")
    return dirs


def engine_throughput(engine: ServingEngine, adapters: list[Path | None], requests: int, tokens: int) -> float:
    """Generated tokens/s for ``requests`` concurrent requests, request i on ``adapters[i % len]``."""
    def req(i: int) -> EngineRequest:
        a = adapters[i % len(adapters)]
        return EngineRequest([text_message("user", f"describe picture number {i}")],
                             SamplingParams(max_new_tokens=tokens, stop_token_ids=(-1,)),
                             adapter_id=a.name if a else None, adapter_locator=str(a) if a else None)

    async def run(n: int) -> int:
        results = await asyncio.gather(*(engine.generate(req(i)) for i in range(n)))
        return sum(len(r.token_ids) for r in results)

    asyncio.run(run(len(adapters)))  # warm-up, adapters loaded
    start = time.perf_counter()
    generated = asyncio.run(run(requests))
    return generated / (time.perf_counter() - start)


def swap_throughput(model_dir: Path, adapters: list[Path], requests: int, tokens: int, dtype: torch.dtype,
                    device: str) -> float:
    """peft, one request at a time, ``set_adapter`` to the request's adapter before generating."""
    from peft import PeftModel

    family = get_family("qwen-vl")
    processor = family.load_processor(model_dir)
    model = PeftModel.from_pretrained(family.load_model(model_dir, dtype=dtype, device=device), adapters[0],
                                      adapter_name=adapters[0].name)
    for a in adapters[1:]:
        model.load_adapter(a, adapter_name=a.name)
    model.eval()
    start, generated = time.perf_counter(), 0
    for i in range(requests):
        model.set_adapter(adapters[i % len(adapters)].name)
        ids = processor.encode_chat([text_message("user", f"describe picture number {i}")]).input_ids
        out = generate(model, [ids], pad_token_id=processor.tokenizer.eod_id,
                       params=SamplingParams(max_new_tokens=tokens))
        generated += len(out[0].token_ids)
    return generated / (time.perf_counter() - start)


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def cold_loads(engine: ServingEngine, locators: list[str], rounds: int) -> list[float]:
    """Fresh cache per round: every get is a cold fetch (+ download for S3) + load."""
    times = []
    for _ in range(rounds):
        cache_dir = tempfile.mkdtemp(prefix="bench-adapters-")
        cache = AdapterCache(lambda d, i: load_lora_weights(d, i, engine.model, engine.family), AdapterFetcher(cache_dir),
                             max_adapters=len(locators))
        for i, locator in enumerate(locators):
            start = time.perf_counter()
            cache.get(f"a{i}", locator)
            times.append(time.perf_counter() - start)
        shutil.rmtree(cache_dir, ignore_errors=True)
    return times


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    return proc, env["AWS_ENDPOINT_URL"]


def job_to_first_token(engine: ServingEngine, adapter: Path, uri: str) -> float:
    """Publish an adapter (as a job does on success), then time until its first streamed token."""
    async def first_token() -> float:
        store, prefix = open_store(uri)
        start = time.perf_counter()
        upload_dir(store, adapter, prefix)
        request = EngineRequest([text_message("user", "hello")], SamplingParams(max_new_tokens=4),
                                adapter_id="fresh", adapter_locator=uri)
        async for _ in engine.stream(request):
            return time.perf_counter() - start
        return float("nan")

    return asyncio.run(first_token())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen-vl-small")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--batch", type=int, default=EngineConfig.max_batch_size,
                        help="the engine's max batch size (default: EngineConfig's, the configuration we ship)")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--load-rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    model_dir = get_family("qwen-vl").materialize(args.preset, work / "model", seed=0, dtype=dtype)
    adapters = make_adapters(model_dir, work / "adapters", args.adapters, args.rank)
    engine = ServingEngine.from_model_dir(model_dir, EngineConfig(max_batch_size=args.batch,
                                                                  max_adapters=args.adapters + 2), dtype=dtype)
    if args.device != "cpu":
        engine.model.to(args.device)
    print(f"preset={args.preset} dtype={args.dtype} device={args.device} threads={torch.get_num_threads()} "
          f"adapters={args.adapters} rank={args.rank} requests={args.requests} batch={args.batch} tokens={args.tokens}")
    best: dict[str, float] = {"mixed": 0.0, "single": 0.0, "base": 0.0}
    scenarios = {"mixed": list(adapters), "single": [adapters[0]], "base": [None]}
    for _ in range(args.repeats):  # interleaved, best of N: the machine is shared and noisy
        for name, chosen in scenarios.items():
            best[name] = max(best[name], engine_throughput(engine, chosen, args.requests, args.tokens))
    mixed, single, base = best["mixed"], best["single"], best["base"]
    swap = swap_throughput(model_dir, adapters, args.requests // 2, args.tokens, dtype, args.device)
    print(f"throughput tok/s: mixed={mixed:.1f} single={single:.1f} base={base:.1f} swap={swap:.1f}")
    print(f"ratios: mixed/single={mixed / single:.2f} (target >= 0.8)  mixed/swap={mixed / swap:.2f} (target >= 4)"
          f"  mixed/base={mixed / base:.2f}")
    local = cold_loads(engine, [str(a) for a in adapters], args.load_rounds)
    moto, _ = start_moto()
    try:
        from qwenvl_core.storage import S3Store

        S3Store("bench-adapters").client.create_bucket(Bucket="bench-adapters")
        s3_uris = []
        for a in adapters:
            store, prefix = open_store(f"s3://bench-adapters/{a.name}")
            upload_dir(store, a, prefix)
            s3_uris.append(f"s3://bench-adapters/{a.name}")
        s3 = cold_loads(engine, s3_uris, args.load_rounds)
        ttft_local = job_to_first_token(engine, adapters[0], str(work / "published"))
        engine.evict_adapter("fresh")
        ttft_s3 = job_to_first_token(engine, adapters[1], "s3://bench-adapters/published")
    finally:
        moto.terminate()
        moto.wait(timeout=10)
    for name, samples in (("local disk", local), ("S3 (moto)", s3)):
        p50, p99 = percentiles(samples)
        print(f"cold load {name}: p50={p50 * 1000:.1f} ms p99={p99 * 1000:.1f} ms (n={len(samples)})")
    print(f"job success -> first token: local={ttft_local * 1000:.1f} ms  S3={ttft_s3 * 1000:.1f} ms")
    weights = engine.cache.get("a0", str(adapters[0]))
    print(f"memory per cached adapter (rank {args.rank}): {weights.nbytes / 2**20:.2f} MiB "
          f"({len(weights.modules)} modules)")
    engine.close()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
