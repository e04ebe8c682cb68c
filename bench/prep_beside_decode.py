"""Image requests prepared beside a decoding batch: in a thread of the engine's process (where the engine's
preprocessing pool runs them) vs in a process of their own, in the same run.

Why: a request's preparation (chat template, tokenizing, decoding and resizing its images) is Python that holds the
GIL much of the time. In the engine's process it shares the GIL with the model thread, which gives it up around
every torch call and must take it back after: each take-back can wait while a preparation runs, and a decode step
makes hundreds of them (thousands for a 7-10B model on a GPU, where the step's time is that host work). Prepared in
another process, nothing waits on it.

Measured: ``--rows`` text streams of ``--tokens`` new tokens decode (greedy, stop tokens suppressed) while image
requests (a ``--image-px`` JPEG as a data URL, what a client sends) are prepared at ``--prep-per-s`` a second with
the engine's own preparation (``preparation.RequestPreparer``: the checks, the template, the tokenizer, image
decoding and the processor's resizing): nowhere (the control), in a thread of the engine's process (where a
``ServingEngine``'s preprocessing pool prepares), in another process (where a replica prepares for the engine in its
child, ``engine_process``). Every process runs torch with one thread, so on a 2-core machine the model thread and
the preparation each have a core and only the GIL is shared. ``--device-wait-ms`` adds a wait without the GIL to
every forward (a GPU's forward, seen from the host). Printed per place: decode tokens/s and preparations
done per second (best round, and all rounds), then each place's tokens/s over the control's.

Usage: .venv/bin/python bench/prep_beside_decode.py [--preset qwen2.5-vl-tiny] [--device cpu] [--dtype float32]
       [--rows 16] [--tokens 96] [--prep-per-s 20] [--image-px 1024x768] [--device-wait-ms 0] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import multiprocessing
import tempfile
import threading
import time
from pathlib import Path

import torch
from PIL import Image

from qwenvl_core.conversation import ImagePart, Message, TextPart, text_message
from qwenvl_core.generation import SamplingParams
from qwenvl_core.models.registry import detect_family, family_for_preset
from qwenvl_core.serving.engine import EngineConfig, EngineRequest, ServingEngine
from qwenvl_core.serving.preparation import RequestPreparer


def image_request(px: tuple[int, int]) -> EngineRequest:
    """A chat request with one photo-like JPEG as a data URL (noise compresses as badly as a photo)."""
    buffer = io.BytesIO()
    Image.effect_noise(px, 64).convert("RGB").save(buffer, "JPEG", quality=90)
    url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    return EngineRequest([Message("user", [ImagePart(url), TextPart("What is in this picture?")])],
                         SamplingParams(max_new_tokens=16))


def prepare_at_rate(preparer: RequestPreparer, request: EngineRequest, per_s: float, stop: threading.Event,
                    done: list[int]) -> None:
    """Prepare ``request`` ``per_s`` times a second (on schedule, skipping none) until ``stop``."""
    start, n = time.perf_counter(), 0
    while not stop.is_set():
        preparer.prepare(request)
        n += 1
        done[0] = n
        delay = start + n / per_s - time.perf_counter()
        if delay > 0:
            stop.wait(delay)


def relay(source, target: threading.Event) -> None:
    """Set ``target`` once ``source`` (another process's event) is set."""
    source.wait()
    target.set()


def preparing_process(model_dir: str, config: EngineConfig, px: tuple[int, int], per_s: float, ready, go, stop,
                      finished, done) -> None:
    """The preparation in a process of its own (as a replica prepares for its engine's child): the same preparer
    and requests; one run from each ``go`` to its ``stop``, then its count in ``done`` and ``finished`` set."""
    torch.set_num_threads(1)
    family = detect_family(model_dir)
    preparer = RequestPreparer(family.load_processor(model_dir), family, config)
    request = image_request(px)
    ready.set()
    while True:
        go.wait()
        go.clear()
        event, count = threading.Event(), [0]
        threading.Thread(target=relay, args=(stop, event), daemon=True).start()
        prepare_at_rate(preparer, request, per_s, event, count)
        done.value = count[0]
        finished.set()


def decode_tokens_per_s(engine: ServingEngine, rows: int, params: SamplingParams) -> float:
    async def one(i: int) -> int:
        request = EngineRequest([text_message("user", f"describe picture number {i}")], params)
        return sum([len(event.token_ids) async for event in engine.stream(request)])

    async def run_all() -> float:
        start = time.perf_counter()
        counts = await asyncio.gather(*(one(i) for i in range(rows)))
        return sum(counts) / (time.perf_counter() - start)

    return asyncio.run(run_all())


def one_round(place: str, engine: ServingEngine, worker: dict, args: argparse.Namespace,
              params: SamplingParams) -> tuple[float, float]:
    """(decode tokens/s, preparations a second) with the preparation in ``place``."""
    start = time.perf_counter()
    if place == "thread":
        stop, done = threading.Event(), [0]
        thread = threading.Thread(target=prepare_at_rate,
                                  args=(engine.preparer, worker["request"], args.prep_per_s, stop, done))
        thread.start()
        rate = decode_tokens_per_s(engine, args.rows, params)
        stop.set()
        thread.join()
        return rate, done[0] / (time.perf_counter() - start)
    if place == "process":
        worker["finished"].clear()
        worker["stop"].clear()
        worker["go"].set()
        rate = decode_tokens_per_s(engine, args.rows, params)
        worker["stop"].set()
        if not worker["finished"].wait(timeout=60):
            raise RuntimeError("the preparing process did not finish its run")
        return rate, worker["done"].value / (time.perf_counter() - start)
    return decode_tokens_per_s(engine, args.rows, params), 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen2.5-vl-tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--prep-per-s", type=float, default=20.0, help="image requests prepared a second")
    parser.add_argument("--image-px", default="1024x768")
    parser.add_argument("--device-wait-ms", type=float, default=0.0, help="a wait without the GIL after each forward")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    px = tuple(int(v) for v in args.image_px.split("x"))
    family = family_for_preset(args.preset)
    dtype = getattr(torch, args.dtype)
    model_dir = str(family.materialize(args.preset, Path(tempfile.mkdtemp(prefix="bench-prep-")) / "model", seed=0,
                                       dtype=dtype))
    config = EngineConfig(max_batch_size=args.rows, max_total_tokens=2048, device=args.device)
    engine = ServingEngine.from_model_dir(model_dir, config, dtype=dtype)
    if args.device_wait_ms:
        forward, wait = engine._forward, args.device_wait_ms / 1000

        def waiting_forward(*a, **kw):
            logits = forward(*a, **kw)
            time.sleep(wait)  # (sleeping releases the GIL, as a host waiting for its GPU does)
            return logits

        engine._forward = waiting_forward
    params = SamplingParams(max_new_tokens=args.tokens,
                            suppress_token_ids=tuple(family.stop_token_ids(family.load_processor(model_dir))))
    context = multiprocessing.get_context("spawn")
    worker = {"request": image_request(px), "ready": context.Event(), "go": context.Event(),
              "stop": context.Event(), "finished": context.Event(), "done": context.Value("i", 0)}
    process = context.Process(target=preparing_process, daemon=True,
                              args=(model_dir, engine.config, px, args.prep_per_s, worker["ready"], worker["go"],
                                    worker["stop"], worker["finished"], worker["done"]))
    process.start()
    while not worker["ready"].wait(timeout=1):
        if not process.is_alive():
            raise RuntimeError(f"the preparing process exited with code {process.exitcode} while starting")
    places = ("none", "thread", "process")
    runs: dict[str, list[tuple[float, float]]] = {place: [] for place in places}
    try:
        started = time.perf_counter()
        engine.preparer.prepare(worker["request"])
        prep_ms = (time.perf_counter() - started) * 1000
        decode_tokens_per_s(engine, args.rows, params)  # warm-up
        for _ in range(args.rounds):  # in turn: the machine's noise falls on every place
            for place in places:
                runs[place].append(one_round(place, engine, worker, args, params))
    finally:
        engine.close()
        process.kill()
    print(f"preset={args.preset} device={args.device} dtype={args.dtype} rows={args.rows} tokens={args.tokens} image={args.image_px} JPEG "
          f"(one preparation alone: {prep_ms:.1f} ms) at {args.prep_per_s:g}/s, device wait={args.device_wait_ms:g} ms "
          f"a forward, torch threads=1, rounds={args.rounds}")
    best = {place: max(runs[place]) for place in places}
    for place in places:
        print(f"preparation {place:>7}: decode {best[place][0]:7.1f} tokens/s, {best[place][1]:5.1f} preparations/s"
              f" (" + "; ".join(f"{r:.1f}, {p:.1f}/s" for r, p in runs[place]) + ")")
    for place in ("thread", "process"):
        print(f"decode tokens/s with the preparation in a {place} / with none: {best[place][0] / best['none'][0]:.2f}")


if __name__ == "__main__":
    main()
