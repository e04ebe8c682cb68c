"""One sampling step of the serving engine (``qwenvl_core.generation.next_tokens``): this tree's batched sampler
against an earlier revision's row-by-row one (``--before-rev``, read with ``git show``), on the same logits and rows.

Rows: ``--rows`` sampling rows with a production vocabulary (151,936, Qwen's), temperature 0.7 and every other row
with top-k 50 (``--top-k``), all with top-p 0.9 (OpenAI clients' usual settings), each with its own seed; ``--greedy`` greedy rows
beside them. ``--penalised-tokens N``: the sampling rows also carry OpenAI's presence / frequency penalties and N
tokens generated so far, and each step adds one more (the penalty counts are what is measured then: rebuilt from
every token at each step up to 4834b42, kept and updated with each step's new tokens after it). Prints the min
time of each over interleaved repeats and the ratio old / new; on CUDA also how many times each step waited for the
device (``torch.cuda.set_sync_debug_mode``'s warnings).

Usage: .venv/bin/python bench/sampling_step.py [--device cuda] [--rows 16 --greedy 16 --vocab 151936]
       .venv/bin/python bench/sampling_step.py --penalised-tokens 4096 --before-rev 4834b42 [--vocab 1280]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before-rev", default="c039973",
                        help="the revision whose sampler is 'old' (row by row); '' to measure this tree's only")
    parser.add_argument("--before-file", help="that revision's qwenvl_core/generation.py, where there is no git "
                        "history (the device copy: bench/gpu_wheels.sh writes it next to the wheels)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=16, help="sampling rows")
    parser.add_argument("--greedy", type=int, default=0, help="greedy rows next to them")
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--top-k", type=int, default=50, help="top-k of every other sampling row (0: none)")
    parser.add_argument("--penalised-tokens", type=int, default=0,
                        help="tokens each sampling row has generated so far, with presence / frequency penalties")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from lora_forward_ab import old_module

    from qwenvl_core import generation as new

    modules = {"new": new}
    if args.before_rev or args.before_file:
        source = Path(args.before_file).read_text() if args.before_file else None
        modules["old"] = old_module("old_generation", args.before_rev, "qwenvl_core/generation.py", source=source)
    sampling = [new.SamplingParams(do_sample=True, temperature=0.7, top_p=0.9, top_k=args.top_k if i % 2 else 0, seed=i)
                for i in range(args.rows)]
    if args.penalised_tokens:
        sampling = [dataclasses.replace(p, presence_penalty=0.5, frequency_penalty=0.5) for p in sampling]
    params = sampling + [new.SamplingParams()] * args.greedy
    logits = torch.randn(len(params), args.vocab, generator=torch.Generator().manual_seed(0)).mul_(4).to(args.device)
    rows = {tag: module.make_rows(params, len(params), args.device) for tag, module in modules.items()}

    def token(row: int, position: int) -> int:  # the same tokens for old and new, spread over the vocabulary
        return (row * 7919 + position * 104_729) % args.vocab

    penalised_rows = range(len(sampling) if args.penalised_tokens else 0)
    for tag_rows in rows.values():
        for row in penalised_rows:
            tag_rows[row].tokens = [token(row, i) for i in range(args.penalised_tokens)]

    def step(tag: str) -> list[int]:
        for row in penalised_rows:  # one new token per step, as in decoding
            tokens = rows[tag][row].tokens
            tokens.append(token(row, len(tokens)))
        return modules[tag].next_tokens(logits, rows[tag])

    def syncs(tag: str) -> int:
        if not args.device.startswith("cuda"):
            return -1
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step(tag)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    for tag in modules:  # warm-up
        step(tag)
    waits = {tag: syncs(tag) for tag in modules}
    best = dict.fromkeys(modules, float("inf"))
    for _ in range(args.repeats):
        for tag in modules:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(tag)  # ends with the copy of the choices to the host, so the device's work is inside the time
            best[tag] = min(best[tag], time.perf_counter() - start)
    print(f"device={args.device} sampling rows={args.rows} greedy rows={args.greedy} vocab={args.vocab} "
          f"penalised tokens={args.penalised_tokens} threads={torch.get_num_threads()} "
          f"old={args.before_file or args.before_rev or 'none'}")
    ratio = f"  old/new={best['old'] / best['new']:.2f}" if "old" in best else ""
    print("min ms per step: " + " ".join(f"{tag}={t * 1000:.2f}" for tag, t in best.items()) + ratio)
    if args.device.startswith("cuda"):
        print("waits for the device per step: " + " ".join(f"{tag}={n}" for tag, n in waits.items()))


if __name__ == "__main__":
    main()
