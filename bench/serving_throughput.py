"""Multi-adapter serving benchmark: mixed-adapter batches vs one adapter vs swapping adapters per request,
adapter cold-load latency (local disk, S3 on a local moto server), job-success-to-first-token, memory per adapter;
the engine vs static-batch ``generate``; TTFT and the longest inter-token gap of mixed image + text traffic; peak
memory of long requests with this engine vs an earlier revision's (``--before-rev``).

Generation throughput (generated tokens/s, greedy, fixed token count) of the same requests served as
- ``mixed``: the engine, batches mixing 8 adapters (grouped LoRA in one forward);
- ``single``: the engine, every request on the same adapter;
- ``swap``: peft with the 8 adapters loaded, ``set_adapter`` to each request's adapter, one request at a time
  (what a server without mixed-adapter batching does).

- ``static``: the baseline of issue 13: the same requests in static batches of ``--batch`` through
  ``generate`` (transformers' own ``generate`` for the transformers families; ``qwenvl_core.generation.generate``
  for v1, which has no GenerationMixin), one adapter per batch as peft serves it, greedy; with equal lengths, and
  with lengths varied over ``--varied-tokens`` (a static batch runs to its longest request, the engine refills a
  finished row's slot at the next step);

Any family's preset (``--preset qwen2.5-vl-small``): adapters on the family's official LoRA targets.
The LoRA rows are also given per CPU-second of this process (``time.process_time``, all its threads), whose ratios
hold on a machine shared with other jobs; ``--lora-only`` stops after them.

Usage (CPU, the numbers in docs/benchmarks.md):
    .venv/bin/python bench/serving_throughput.py [--preset qwen2.5-vl-small]
    .venv/bin/python bench/serving_throughput.py --latency-only --prefill-chunk 64,512   (the latency rows only)
    .venv/bin/python bench/serving_throughput.py --memory-only --before-rev ''   (the peak-memory row only)
GPU (full-size random weights; needs the memory for a qwen-vl-chat model):
    .venv/bin/python bench/serving_throughput.py --preset qwen-vl-chat --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import inspect
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from revisions import worktree

from qwenvl_core.conversation import text_message
from qwenvl_core.generation import SamplingParams, generate
from qwenvl_core.models.registry import family_for_preset
from qwenvl_core.serving.adapter_cache import AdapterCache, AdapterFetcher
from qwenvl_core.serving.engine import EngineConfig, EngineRequest, ServingEngine
from qwenvl_core.serving.lora_batch import load_lora_weights
from qwenvl_core.storage import open_store, upload_dir


def make_adapters(family: Any, model_dir: Path, out: Path, count: int, rank: int, dtype: torch.dtype) -> list[Path]:
    """``count`` random LoRA adapters (non-zero B) on the family's official language-model targets: ``out/a0`` ...,
    all added to one host copy of the base (a full-size base is loaded once, not once per adapter)."""
    from peft import LoraConfig, get_peft_model

    from qwenvl_core.specs import TargetPreset
    from qwenvl_core.training.lora import resolve_targets

    base = family.load_model(model_dir, dtype=dtype)
    targets = resolve_targets(base, family, TargetPreset.OFFICIAL)
    model = None
    for i in range(count):
        torch.manual_seed(i + 1)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False, target_modules=targets)
        if model is None:
            model = get_peft_model(base, config, adapter_name=f"a{i}")
        else:
            model.add_adapter(f"a{i}", config)
    model.save_pretrained(out)  # peft writes each adapter not called "default" into out/<its name>
    return [out / f"a{i}" for i in range(count)]


def sync(device: str) -> None:
    """Wait for the device's queued work, so that the clock read after it covers that work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


CONTEXT = 512  # prompt tokens the main engine's rows have room for: an image (v1: 256) and a short text


def release(device: str) -> None:
    """Free what the finished measurement left (models, caches): collected, and on a GPU handed back by PyTorch's
    allocator, so that the next model (or the memory measurement's own process) finds the memory free."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _prompt(i: int) -> str:
    return f"describe picture number {i}"


def _fixed_length(engine: ServingEngine, tokens: int) -> SamplingParams:
    """Greedy, exactly ``tokens`` new tokens (the family's stop tokens suppressed), as the baselines generate."""
    return SamplingParams(max_new_tokens=tokens, suppress_token_ids=tuple(engine.family.stop_token_ids(engine.processor)))


class Rate(NamedTuple):
    """Generated tokens per second of wall-clock time, and per CPU-second of this process (all its threads): the
    second is what one math thread costs whatever else the machine runs, so its ratios hold on a shared machine."""

    wall: float
    cpu: float


def _rate(tokens: int, wall_start: float, cpu_start: float) -> Rate:
    return Rate(tokens / (time.perf_counter() - wall_start), tokens / (time.process_time() - cpu_start))


def varied_lengths(requests: int, shortest: int, longest: int) -> list[int]:
    """New-token counts spread evenly over ``shortest..longest``, in a fixed shuffled order (request i gets
    ``[i]``): what requests of real traffic ask for, unlike the equal lengths of the other rows."""
    return [shortest + (i * 37) % (longest - shortest + 1) for i in range(requests)]


def engine_throughput(engine: ServingEngine, adapters: list[Path | None], requests: int,
                      tokens: int | list[int]) -> Rate:
    """Generated tokens/s for ``requests`` concurrent requests, request i on ``adapters[i % len]``, with
    ``tokens`` new tokens (or ``tokens[i]``)."""
    def req(i: int) -> EngineRequest:
        a = adapters[i % len(adapters)]
        length = tokens if isinstance(tokens, int) else tokens[i]
        return EngineRequest([text_message("user", _prompt(i))], _fixed_length(engine, length),
                             adapter_id=a.name if a else None, adapter_locator=str(a) if a else None)

    async def run(n: int) -> int:
        results = await asyncio.gather(*(engine.generate(req(i)) for i in range(n)))
        return sum(len(r.token_ids) for r in results)

    # Warm-up: the same workload once, untimed: adapters loaded, and on a GPU every kernel and matmul shape of the
    # timed run used once (lazily loaded CUDA modules, cuBLAS heuristics), so no first use is timed, whichever
    # scenario runs first (the device run has one repeat; its first run, 2026-12-04, had an 8-request warm-up).
    asyncio.run(run(requests))
    sync(engine.device.type)
    start, cpu_start = time.perf_counter(), time.process_time()
    generated = asyncio.run(run(requests))
    return _rate(generated, start, cpu_start)


def swap_throughput(family: Any, model_dir: Path, adapters: list[Path], requests: int, tokens: int,
                    dtype: torch.dtype, device: str) -> Rate:
    """peft, one request at a time, ``set_adapter`` to the request's adapter before generating."""
    from peft import PeftModel

    processor = family.load_processor(model_dir)
    base = family.forward_contract(family.load_model(model_dir, dtype=dtype, device=device))
    model = PeftModel.from_pretrained(base, adapters[0], adapter_name=adapters[0].name)
    for a in adapters[1:]:
        model.load_adapter(a, adapter_name=a.name)
    model.eval()
    generate(model, [processor.encode_chat([text_message("user", _prompt(0))]).input_ids],  # warm-up, untimed
             pad_token_id=processor.pad_token_id, params=SamplingParams(max_new_tokens=tokens, stop_token_ids=(-1,)))
    sync(device)
    start, cpu_start, generated = time.perf_counter(), time.process_time(), 0
    for i in range(requests):
        model.set_adapter(adapters[i % len(adapters)].name)
        ids = processor.encode_chat([text_message("user", _prompt(i))]).input_ids
        out = generate(model, [ids], pad_token_id=processor.pad_token_id,
                       params=SamplingParams(max_new_tokens=tokens, stop_token_ids=(-1,)))
        generated += len(out[0].token_ids)
    sync(device)
    return _rate(generated, start, cpu_start)


def static_throughput(family: Any, model_dir: Path, adapter: Path, batch: int, workloads: list[list[int]],
                      dtype: torch.dtype, device: str) -> list[float]:
    """The baseline, tokens/s of each workload (one model load for all: a full-size load is tens of seconds of a
    device lease): static batches of ``batch`` requests (left padded) on one peft adapter, greedy, request i of a
    workload run to its ``workload[i]`` new tokens: each batch to the longest of its requests, the shorter ones'
    extra tokens computed and dropped, as a static-batch server does; only each request's own count is counted.
    transformers' ``generate`` where the family has it, else ours."""
    from peft import PeftModel

    processor = family.load_processor(model_dir)
    hf_class = getattr(getattr(family, "spec", None), "transformers_class", None)
    if hf_class is not None:
        base = hf_class("model_class").from_pretrained(model_dir, dtype=dtype).to(device)
    else:
        base = family.forward_contract(family.load_model(model_dir, dtype=dtype, device=device))
    model = PeftModel.from_pretrained(base, adapter).eval()
    prompts = [processor.encode_chat([text_message("user", _prompt(i))]).input_ids
               for i in range(max(len(w) for w in workloads))]

    def run_batch(chunk: list[list[int]], wanted: list[int]) -> int:
        """One static batch run to its longest request: the tokens of each request's own count."""
        longest = max(wanted)
        if hf_class is None:
            outs = generate(model, chunk, pad_token_id=processor.pad_token_id,
                            params=SamplingParams(max_new_tokens=longest, stop_token_ids=(-1,)))
            return sum(min(len(o.token_ids), n) for o, n in zip(outs, wanted, strict=True))
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[processor.pad_token_id] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                                 do_sample=False, pad_token_id=processor.pad_token_id)
        return sum(min(out.shape[1] - width, n) for n in wanted)

    rates = []
    for lengths in workloads:
        run_batch(prompts[:batch], lengths[:batch])  # warm-up, untimed (first uses on a GPU; see engine_throughput)
        sync(device)
        start, generated = time.perf_counter(), 0
        for first in range(0, len(lengths), batch):
            generated += run_batch(prompts[first : first + batch], lengths[first : first + batch])
        sync(device)
        rates.append(generated / (time.perf_counter() - start))
    return rates


def latency_under_load(engine: ServingEngine, adapters: list[Path], requests: int, tokens: int,
                       image_size: int) -> dict[str, float]:
    """``requests`` concurrent requests, every other one with an image, mixed adapters: TTFT p50 / p99 and the
    longest gap between two tokens of any stream (a prefill of arriving requests stalls running streams).

    Where TTFT goes, p50 of each part per request: ``prepare`` (sent until the engine's checks, image decoding and
    adapter load are done, in its thread pool), ``wait`` (queued until its prefill starts: whole, or its first
    chunk) and ``prefill`` (until the model thread chose its first token: the prefill forward, or every chunk
    between the running rows' decode steps).

    Two gaps: ``max_gap`` between two tokens of a stream as the model thread produced them (the times of the
    engine's per-step token choice for each row: what the scheduling decides), and ``max_event_gap`` between two
    stream events as the client receives them. The second also counts tokens the engine holds back because their
    text is not whole yet (a partial UTF-8 character, which random weights produce often): it measures the random
    token stream as much as the engine."""
    from PIL import Image

    from qwenvl_core.conversation import ImagePart, Message, TextPart

    produced: dict[str, list[float]] = {}
    sent: dict[str, float] = {}
    prepared: dict[str, float] = {}
    started: dict[str, float] = {}  # its prefill (or first chunk) began
    # the engine's steps, wrapped to time them: the token choice for a step's rows, preparation, prefills
    choose, prepare, prefill, chunk = engine._after_step, engine._prepare, engine._prefill, engine._prefill_chunk

    def timed_choice(seqs: list, logits: torch.Tensor) -> None:
        choose(seqs, logits)
        now = time.perf_counter()
        for seq in seqs:
            produced.setdefault(seq.request.request_id, []).append(now)

    def timed_prepare(request: EngineRequest, arrived: float) -> object:
        seq = prepare(request, arrived)
        prepared[request.request_id] = time.perf_counter()
        return seq

    def timed_prefill(seqs: list) -> None:
        now = time.perf_counter()
        for seq in seqs:
            started.setdefault(seq.request.request_id, now)
        prefill(seqs)

    def timed_chunk(seq: object, slot: int) -> torch.Tensor | None:
        started.setdefault(seq.request.request_id, time.perf_counter())
        return chunk(seq, slot)

    engine._after_step, engine._prepare = timed_choice, timed_prepare
    engine._prefill, engine._prefill_chunk = timed_prefill, timed_chunk

    def req(i: int) -> EngineRequest:
        parts: list = [TextPart(_prompt(i))]
        if i % 2 == 0:
            parts.insert(0, ImagePart(Image.new("RGB", (image_size, image_size), (i * 7 % 255, 80, 160))))
        a = adapters[i % len(adapters)]
        return EngineRequest([Message(role="user", parts=parts)], _fixed_length(engine, tokens),
                             adapter_id=a.name, adapter_locator=str(a))

    async def one(i: int) -> tuple[float, float]:
        await asyncio.sleep(0.002 * i)  # arrivals spread a little, so some join a running batch
        request = req(i)
        start, first, gap, last = time.perf_counter(), None, 0.0, None
        sent[request.request_id] = start
        async for _event in engine.stream(request):
            now = time.perf_counter()
            first = first if first is not None else now - start
            gap = gap if last is None else max(gap, now - last)
            last = now
        return first or float("nan"), gap

    async def run() -> list[tuple[float, float]]:
        return await asyncio.gather(*(one(i) for i in range(requests)))

    try:
        results = asyncio.run(run())
    finally:
        engine._after_step, engine._prepare, engine._prefill, engine._prefill_chunk = choose, prepare, prefill, chunk
    p50, p99 = percentiles([r[0] for r in results])
    token_gaps = [b - a for times in produced.values() for a, b in itertools.pairwise(times)]
    parts = {"prepare": (sent, prepared), "wait": (prepared, started),
             "prefill": (started, {rid: times[0] for rid, times in produced.items()})}
    part_p50 = {f"{name}_p50": percentiles([end[rid] - begin[rid] for rid in sent])[0]
                for name, (begin, end) in parts.items()}
    return {"ttft_p50": p50, "ttft_p99": p99, "max_gap": max(token_gaps), "max_event_gap": max(r[1] for r in results),
            **part_p50}


def latency_rows(engine: ServingEngine, adapters: list[Path], args: argparse.Namespace) -> None:
    """``latency_under_load`` at the engine's batch size with whole prefills and with each ``--prefill-chunk``: the
    stall of running streams; then at each ``--latency-batch`` with the engine's prefill budget: the queue. First,
    untimed, a few image and text requests, so that the first row does not time the vision tower's first use (the
    throughput rows before it send text only)."""
    def probe(requests: int, **changes: int) -> dict[str, float]:
        with sibling_engine(engine, **changes) as prober:  # (its KV slots: the batch, or fewer where memory is short)
            return {**latency_under_load(prober, adapters, requests, args.tokens, args.image_size),
                    "slots": prober.slots}

    probe(4, prefill_chunk_tokens=0)  # the warm-up
    batch, budget = engine.config.max_batch_size, engine.config.prefill_chunk_tokens
    rows = [(batch, chunk) for chunk in (0, *(int(c) for c in args.prefill_chunk.split(",")))]
    rows += [(int(b), budget) for b in args.latency_batch.split(",") if b]
    for batch, chunk in rows:
        lat = probe(args.latency_requests, max_batch_size=batch, prefill_chunk_tokens=chunk)
        print(f"{args.latency_requests} concurrent mixed image + text requests, batch={batch} "
              f"prefill_chunk_tokens={chunk}: "
              f"TTFT p50={lat['ttft_p50'] * 1000:.0f} ms p99={lat['ttft_p99'] * 1000:.0f} ms (p50 of its parts: "
              f"prepare {lat['prepare_p50'] * 1000:.0f}, wait {lat['wait_p50'] * 1000:.0f}, prefill "
              f"{lat['prefill_p50'] * 1000:.0f} ms), "
              f"longest inter-token gap={lat['max_gap'] * 1000:.0f} ms (between stream events, text held back "
              f"for partial characters included: {lat['max_event_gap'] * 1000:.0f} ms); {lat['slots']:.0f} KV slots")


def long_request_memory(preset: str, requests: int, prompt_tokens: int, tokens: int, dtype: str, device: str,
                        model_dir: str | None) -> None:
    """(subprocess) Peak memory of ``requests`` concurrent requests of ``prompt_tokens`` prompt tokens each, on the
    ``qwenvl_core`` found on ``sys.path`` (this tree, or an earlier revision's): prints ``PEAK <bytes>``. The model:
    ``model_dir``, or (None) a fresh ``preset`` directory written by that ``qwenvl_core``."""
    import resource

    from qwenvl_core.serving.engine import EngineConfig as Config

    family = family_for_preset(preset)
    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))  # holds the model written here, if any
    if model_dir is None:  # initialised on the device where that revision can (7B on the CPU: over 90 s on the H200's)
        placing = "device" in inspect.signature(family.materialize).parameters
        model_dir = family.materialize(preset, work / "model", seed=0, dtype=getattr(torch, dtype),
                                       **({"device": device} if placing else {}))
    limits = {"max_batch_size": requests, "max_total_tokens": prompt_tokens + tokens}
    placed = "device" in {f.name for f in dataclasses.fields(Config)}  # earlier revisions loaded on the CPU only
    config = Config(**limits, device=device) if placed else Config(**limits)
    engine = ServingEngine.from_model_dir(model_dir, config, dtype=getattr(torch, dtype))
    if device != "cpu":
        if not placed:
            engine.model.to(device)
        torch.cuda.reset_peak_memory_stats()
    processor = family.load_processor(model_dir)
    words = [f"w{i % 50}" for i in range(prompt_tokens)]
    while len(processor.encode_conversation([text_message("user", " ".join(words))],
                                            add_generation_prompt=True).input_ids) > prompt_tokens:
        words = words[: int(len(words) * 0.9)]
    prompts = [" ".join(words[: len(words) - i]) for i in range(requests)]  # all about prompt_tokens long

    async def run() -> None:
        await asyncio.gather(*(engine.generate(EngineRequest(
            [text_message("user", prompt)], SamplingParams(max_new_tokens=tokens))) for prompt in prompts))

    asyncio.run(run())
    peak = (torch.cuda.max_memory_allocated() if device != "cpu"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(f"PEAK {peak}")
    engine.close()
    shutil.rmtree(work, ignore_errors=True)


def memory_row(args: argparse.Namespace, model_dir: Path | None) -> None:
    """Prints the peak-memory row of the long-request workload (``memory_before_after``)."""
    after, before = memory_before_after(args, model_dir)
    row = f"after={after / 2**20:.0f} MiB" + (f" before ({args.before_rev})={before / 2**20:.0f} MiB "
                                              f"ratio={after / before:.2f}" if before else "")
    print(f"peak memory, {args.memory_requests} concurrent {args.memory_prompt}-token requests: {row}")


def memory_before_after(args: argparse.Namespace, model_dir: Path | None) -> tuple[int, int | None]:
    """Peak memory of the long-request workload on ``model_dir`` (None: one the measuring process writes) with this
    tree and, in a git worktree, at ``args.before_rev`` (on a model directory that revision writes itself)."""
    def peak(pythonpath: str, model_dir: Path | None = None) -> int:
        cmd = [sys.executable, __file__, "--memory-child", "--preset", args.preset, "--dtype", args.dtype,
               "--device", args.device, "--memory-requests", str(args.memory_requests),
               "--memory-prompt", str(args.memory_prompt)] + (["--model-dir", str(model_dir)] if model_dir else [])
        # The tree measured first, then whatever else the path held (the device run's carried packages).
        others = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != root]
        done = subprocess.run(cmd, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join([pythonpath, *others])})
        if done.returncode != 0:
            raise SystemExit(f"the memory measurement ({pythonpath}) failed:\n{done.stderr[-3000:]}")
        return int(next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("PEAK ")))

    root = Path(__file__).resolve().parent.parent
    after = peak(str(root), model_dir)
    if not args.before_rev:
        return after, None
    with worktree(args.before_rev) as tree:
        if tree is None:
            print(f"(no git history with {args.before_rev} here, as on the device machine: no 'before' row)")
            return after, None
        return after, peak(str(tree))


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


def _print_cpu_rates(runs: dict[str, list[Rate]], swap: Rate) -> None:
    """The LoRA rows per CPU-second (best of the runs), their ratios, and every run's two rates."""
    cpu = {name: max(r.cpu for r in rates) for name, rates in runs.items()}
    print("per CPU-second of this process: " + " ".join(f"{n}={v:.1f}" for n, v in cpu.items())
          + f" swap={swap.cpu:.1f}; ratios: mixed/single={cpu['mixed'] / cpu['single']:.2f} mixed/base="
          f"{cpu['mixed'] / cpu['base']:.2f} mixed/swap={cpu['mixed'] / swap.cpu:.2f}; each run (wall | cpu): "
          + "  ".join(f"{n} " + ",".join(f"{r.wall:.0f}|{r.cpu:.0f}" for r in rates) for n, rates in runs.items()))


@contextlib.contextmanager
def sibling_engine(engine: ServingEngine, **changes: Any) -> Iterator[ServingEngine]:
    """A second engine over ``engine``'s model (no second copy of a full-size model's weights; a KV cache of its
    own), configured as ``engine`` with ``changes``. ``engine`` stays idle meanwhile; its LoRA hooks are taken off
    the shared model (its next plan puts them back), so they do not run, as no-ops, in the sibling's forwards."""
    engine.lora.remove_hooks()
    sibling = ServingEngine(engine.model, engine.processor, engine.family,
                            dataclasses.replace(engine.config, **changes))
    try:
        yield sibling
    finally:
        sibling.close()  # also takes its LoRA hooks off the shared model
        del sibling
        release(engine.device.type)


def static_rows_with_graphs(engine: ServingEngine, adapter: Path, varied: list[int], static: tuple[float, float],
                            args: argparse.Namespace) -> None:
    """The engine's rows against static batches (equal and varied lengths, ``--static-batch`` rows) again on a
    sibling engine with ``EngineConfig.decode_graphs``: a join's eager prefill against replayed decode steps."""
    capacity = -(-(64 + 2 * max(args.tokens, *varied)) // 64) * 64
    with sibling_engine(engine, max_batch_size=args.static_batch, max_total_tokens=capacity,
                        decode_graphs=args.decode_graphs) as graphs:
        equal, uneven = (max(engine_throughput(graphs, [adapter], len(work), work).wall for _ in range(args.repeats))
                         for work in ([args.tokens] * args.static_batch, varied))
    print(f"decode graphs ({args.decode_graphs}), engine vs static batches of {args.static_batch}: equal lengths "
          f"engine={equal:.1f} tok/s engine/static={equal / static[0]:.2f}; lengths "
          f"{args.varied_tokens.replace(',', '-')} engine={uneven:.1f} tok/s engine/static={uneven / static[1]:.2f}")


def graphs_rows(engine: ServingEngine, scenarios: dict[str, list], args: argparse.Namespace,
                without: dict[str, float]) -> None:
    """The mixed / single / base rows again on a sibling engine (its KV cache sized for these short requests) with
    ``EngineConfig.decode_graphs``."""
    capacity = -(-(64 + 2 * args.tokens) // 64) * 64
    with sibling_engine(engine, max_total_tokens=capacity, decode_graphs=args.decode_graphs) as graphs:
        rates = {name: max(engine_throughput(graphs, chosen, args.requests, args.tokens).wall
                           for _ in range(args.repeats)) for name, chosen in scenarios.items()}
        shapes = len(graphs._graphs._buffers)
    print(f"decode graphs ({args.decode_graphs}, {shapes} shapes) tok/s: " + " ".join(
        f"{name}={rate:.1f}" for name, rate in rates.items())
        + f"  mixed/single={rates['mixed'] / rates['single']:.2f} mixed/base={rates['mixed'] / rates['base']:.2f}"
        + "  with/without graphs: " + " ".join(f"{name}={rates[name] / without[name]:.2f}" for name in rates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen-vl-small")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-lora-rank", type=int, default=EngineConfig.max_lora_rank,
                        help="the engine's adapter slots' rank (a deployment whose adapters share a rank sets it to "
                             "that rank: at it, sibling targets share one product)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--batch", type=int, default=None,
                        help="the engine's max batch size (default: EngineConfig's for the device, what we ship)")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--load-rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--static-batch", type=int, default=16, help="the static-batch baseline's batch size")
    parser.add_argument("--varied-tokens", default="4,64",
                        help="shortest,longest new tokens of the engine vs static row with varied lengths")
    parser.add_argument("--swap-requests", type=int, default=0,
                        help="requests of the per-request swapping row (one at a time; default: half of --requests)")
    parser.add_argument("--latency-requests", type=int, default=32, help="0: no latency rows")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--prefill-chunk", default="64",
                        help="the chunked engines' prefill_chunk_tokens in the latency rows, comma-separated (each "
                             "against 0: whole prefills)")
    parser.add_argument("--latency-batch", default="",
                        help="also the latency row at these max batch sizes (comma-separated; the engine's prefill "
                             "budget), against the engine's own")
    parser.add_argument("--memory-requests", type=int, default=32, help="0: no memory row")
    parser.add_argument("--memory-prompt", type=int, default=2000, help="prompt tokens of each long request")
    parser.add_argument("--before-rev", default="d30b903",
                        help="git revision whose engine the memory row compares with ('' to skip)")
    parser.add_argument("--skip-loads", action="store_true", help="skip cold loads and job-to-first-token")
    parser.add_argument("--lora-only", action="store_true",
                        help="only the mixed / single / base / swap rows (the LoRA ratios), then stop")
    parser.add_argument("--latency-only", action="store_true",
                        help="only the latency rows (TTFT, longest gap; whole vs chunked prefills), then stop")
    parser.add_argument("--memory-only", action="store_true",
                        help="only the peak-memory row of long requests (on a model directory it writes), then stop")
    parser.add_argument("--decode-graphs", default="off", choices=["off", "cuda", "static"],
                        help="also run the mixed / single / base rows with EngineConfig.decode_graphs (A/B)")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        long_request_memory(args.preset, args.memory_requests, args.memory_prompt, 4, args.dtype, args.device,
                            args.model_dir)
        return
    if args.memory_only:
        memory_row(args, None)
        return
    dtype = getattr(torch, args.dtype)
    family = family_for_preset(args.preset)
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    model_dir = family.materialize(args.preset, work / "model", seed=0, dtype=dtype, device=args.device)
    adapters = make_adapters(family, model_dir, work / "adapters", args.adapters, args.rank, dtype)
    release(args.device)
    # Each row's context fits (an image's tokens, a short prompt, the new tokens), not the default 2,048: a GPU's
    # KV cache is sized from the memory left free, and the sibling engines of the latency and graph rows (their own
    # caches, beside this one's) must find room for as many slots as the requests they run.
    longest = max(args.tokens, *(int(n) for n in args.varied_tokens.split(",")))
    engine = ServingEngine.from_model_dir(model_dir, EngineConfig(
        max_batch_size=args.batch, device=args.device, max_adapters=args.adapters + 2,
        max_lora_rank=args.max_lora_rank, max_total_tokens=-(-(CONTEXT + longest) // 64) * 64), dtype=dtype)
    print(f"preset={args.preset} dtype={args.dtype} device={args.device} threads={torch.get_num_threads()} "
          f"adapters={args.adapters} rank={args.rank} max_lora_rank={args.max_lora_rank} requests={args.requests} "
          f"batch={engine.config.max_batch_size} ({engine.slots} KV slots) tokens={args.tokens}")
    if args.latency_only:
        latency_rows(engine, adapters, args)
        engine.close()
        shutil.rmtree(work, ignore_errors=True)
        return
    runs: dict[str, list[Rate]] = {"mixed": [], "single": [], "base": []}
    scenarios = {"mixed": list(adapters), "single": [adapters[0]], "base": [None]}
    for _ in range(args.repeats):  # interleaved, best of N: the machine is shared and noisy
        for name, chosen in scenarios.items():
            runs[name].append(engine_throughput(engine, chosen, args.requests, args.tokens))
    mixed, single, base = (max(r.wall for r in runs[name]) for name in scenarios)
    if args.decode_graphs != "off":
        graphs_rows(engine, scenarios, args, {"mixed": mixed, "single": single, "base": base})
    swap_rate = swap_throughput(family, model_dir, adapters, args.swap_requests or args.requests // 2, args.tokens,
                                dtype, args.device)
    swap = swap_rate.wall
    release(args.device)
    if args.lora_only:
        print(f"throughput tok/s: mixed={mixed:.1f} single={single:.1f} base={base:.1f} swap={swap:.1f}")
        print(f"ratios: mixed/single={mixed / single:.2f} (target >= 0.95)  mixed/swap={mixed / swap:.2f} (target >= 5)"
              f"  mixed/base={mixed / base:.2f} (LoRA overhead, target >= 0.85)")
        _print_cpu_rates(runs, swap_rate)
        engine.close()
        shutil.rmtree(work, ignore_errors=True)
        return
    varied = varied_lengths(args.static_batch * 2, *(int(n) for n in args.varied_tokens.split(",")))
    static, static_varied = static_throughput(family, model_dir, adapters[0], args.static_batch,
                                              [[args.tokens] * args.static_batch * 2, varied], dtype, args.device)
    release(args.device)
    engine_16 = max(engine_throughput(engine, [adapters[0]], args.static_batch, args.tokens).wall
                    for _ in range(args.repeats))
    with sibling_engine(engine, max_batch_size=args.static_batch) as equal:  # as many rows as a static batch
        engine_varied = max(engine_throughput(equal, [adapters[0]], len(varied), varied).wall
                            for _ in range(args.repeats))
    print(f"throughput tok/s: mixed={mixed:.1f} single={single:.1f} base={base:.1f} swap={swap:.1f} "
          f"engine@{args.static_batch}={engine_16:.1f} static@{args.static_batch}={static:.1f}")
    print(f"ratios: mixed/single={mixed / single:.2f} (target >= 0.95)  mixed/swap={mixed / swap:.2f} (target >= 5)"
          f"  mixed/base={mixed / base:.2f} (LoRA overhead, target >= 0.85)  engine/static={engine_16 / static:.2f}"
          f" (target >= 2)")
    print(f"{len(varied)} requests of {args.varied_tokens.replace(',', '-')} new tokens, batch {args.static_batch}: "
          f"engine={engine_varied:.1f} static={static_varied:.1f} tok/s  engine/static={engine_varied / static_varied:.2f}")
    if args.decode_graphs != "off":  # the same two engine rows with the decode steps the graphs rows used
        static_rows_with_graphs(engine, adapters[0], varied, (static, static_varied), args)
    _print_cpu_rates(runs, swap_rate)
    if args.latency_requests:
        latency_rows(engine, adapters, args)
    if args.memory_requests:
        memory_row(args, model_dir)
    if args.skip_loads:
        engine.close()
        shutil.rmtree(work, ignore_errors=True)
        return
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
