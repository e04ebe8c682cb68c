"""Data pipeline throughput: validation and encoding samples/s on a generated file, peak memory at two file
sizes (to show that validation memory stays flat), and padding with length grouping vs naive batching.

Run:  .venv/bin/python bench/data_throughput.py --n 100000
Each measurement of peak memory runs in a fresh subprocess (``--child``), so numbers do not mix.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

WORDS = ("red green blue yellow circle square triangle left right top bottom how many shapes are there "
         "picture the a is of in on what colour shape 红色 圆形 左边 图片 里 有 几个").split()


def make_file(path: Path, n: int, seed: int, n_images: int = 32) -> None:
    """An OpenAI-format JSONL of ``n`` samples (1-3 rounds, 0-2 images each, varied lengths)."""
    from qwenvl_core.data.synth import generate_samples

    image_dir = path.parent / "images"
    generate_samples(n_images, seed, image_dir, image_size=112)
    images = sorted(p.name for p in image_dir.glob("*.png"))
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps(_record(rng, i, images), ensure_ascii=False) + "\n")


def _record(rng: random.Random, i: int, images: list[str]) -> dict:
    messages = []
    for turn in range(rng.choice((1, 1, 2, 3))):
        text = " ".join(rng.choice(WORDS) for _ in range(int(rng.expovariate(1 / 25)) + 3))
        content: list[dict] = [{"type": "image_url", "image_url": {"url": f"images/{rng.choice(images)}"}}
                               for _ in range(rng.choice((0, 1, 1, 2)) if turn == 0 else 0)]
        content.append({"type": "text", "text": text + "?"})
        answer = " ".join(rng.choice(WORDS) for _ in range(int(rng.expovariate(1 / 15)) + 1))
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    return {"id": f"s{i}", "messages": messages}


def child(args: argparse.Namespace) -> None:
    """One measurement in this process; prints a JSON line."""
    from qwenvl_core.data import EncodeOptions, ValidationOptions, encode_sample, validate_file
    from qwenvl_core.data.bundle import open_bundle
    from qwenvl_core.data.validate import iter_samples
    from qwenvl_core.models.qwen_vl.processor import QwenVLProcessor

    processor = QwenVLProcessor.from_dir(args.model) if args.model else None
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.trace:
        tracemalloc.start()
    start = time.perf_counter()
    if args.child == "validate":
        report = validate_file(args.file, processor, ValidationOptions(encode=EncodeOptions(max_length=2048)))
        n, extra = report.records, {"errors": report.issues.error_count, "stats": report.stats.to_dict()}
    else:
        n = 0
        with open_bundle(args.file) as bundle:
            for sample in iter_samples(bundle, None, ValidationOptions(check_images=False)):
                encode_sample(sample, processor)
                n += 1
                if n >= args.limit:
                    break
        extra = {}
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    traced = tracemalloc.get_traced_memory()[1] / 2**20 if args.trace else None
    print(json.dumps({"samples": n, "seconds": seconds, "samples_per_s": n / seconds, "traced_peak_mib": traced,
                      "rss_after_imports_mib": base_rss / 1024, "peak_rss_mib": peak / 1024, **extra}))


def _run_child(kind: str, file: Path, model: Path | None, limit: int = 0, trace: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--file", str(file), "--limit", str(limit)]
    cmd += ["--trace"] if trace else []
    if model is not None:
        cmd += ["--model", str(model)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def padding(file: Path, model: Path, batch_size: int) -> dict:
    from qwenvl_core.data import length_grouped_batches, naive_batches, padding_ratio, tokenize_sample
    from qwenvl_core.data.bundle import open_bundle
    from qwenvl_core.data.validate import ValidationOptions, iter_samples
    from qwenvl_core.models.qwen_vl.processor import QwenVLProcessor

    processor = QwenVLProcessor.from_dir(model)
    with open_bundle(file) as bundle:
        lengths = [len(tokenize_sample(s, processor).input_ids)
                   for s in iter_samples(bundle, None, ValidationOptions(check_images=False))]
    naive = padding_ratio(lengths, naive_batches(len(lengths), batch_size, seed=0))
    grouped = padding_ratio(lengths, length_grouped_batches(lengths, batch_size, seed=0))
    return {"batch_size": batch_size, "naive": naive, "grouped": grouped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--encode-n", type=int, default=5_000, help="samples encoded with pixels")
    parser.add_argument("--child")
    parser.add_argument("--file", type=Path)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--trace", action="store_true", help="measure Python peak memory with tracemalloc")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    from qwenvl_core.models.qwen_vl.materialize import write_random_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = write_random_model(root / "model", preset="qwen-vl-tiny")
        small, large = root / "small" / "train.jsonl", root / "large" / "train.jsonl"
        for path, n in ((small, args.n // 10), (large, args.n)):
            path.parent.mkdir()
            make_file(path, n, seed=0)
        size_mib = large.stat().st_size / 2**20
        results = {
            "file_mib": size_mib,
            "validate_small_no_tokenizer": _run_child("validate", small, None),
            "validate_large_no_tokenizer": _run_child("validate", large, None),
            "validate_small_tokenizer": _run_child("validate", small, model),
            "validate_large_tokenizer": _run_child("validate", large, model),
            "encode_with_pixels": _run_child("encode", large, model, limit=args.encode_n),
            "memory_small": _run_child("validate", small, model, trace=True),
            "memory_large": _run_child("validate", large, model, trace=True),
            "padding": [padding(small, model, bs) for bs in (8, 32)],
        }
    _print(results, args.n)


def _print(r: dict, n: int) -> None:
    print(f"# data pipeline throughput ({n} samples, {r['file_mib']:.1f} MiB JSONL, tiny tokenizer)\n")
    print("| measurement | samples | samples/s | peak RSS MiB (after imports) |")
    print("|---|---|---|---|")
    for key in ("validate_small_no_tokenizer", "validate_large_no_tokenizer", "validate_small_tokenizer",
                "validate_large_tokenizer", "encode_with_pixels"):
        m = r[key]
        print(f"| {key} | {m['samples']} | {m['samples_per_s']:.0f} | {m['peak_rss_mib']:.0f} "
              f"({m['rss_after_imports_mib']:.0f}) |")
    print("\n| validation (with tokenizer) of | samples | Python peak (tracemalloc) MiB |")
    print("|---|---|---|")
    for key in ("memory_small", "memory_large"):
        print(f"| {key} | {r[key]['samples']} | {r[key]['traced_peak_mib']:.2f} |")
    print("\n| batch size | padding, naive batches | padding, length-grouped |")
    print("|---|---|---|")
    for p in r["padding"]:
        print(f"| {p['batch_size']} | {p['naive']:.1%} | {p['grouped']:.1%} |")


if __name__ == "__main__":
    main()
