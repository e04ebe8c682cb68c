"""Out-of-process file validation: ``python -m service.validation_worker --store URI --key KEY --name NAME``.

The data library (``qwenvl_core.data``) imports torch, and the API process must not, so validation runs in a
child process: it copies the object to a temporary file named like the upload (the suffix decides bundle
handling), validates it with ``validate_file`` (streaming, line-numbered issues) and prints one JSON document:
``{"report": {...}}``, plus ``"estimate"`` when ``--model`` (a base model directory, for the tokenizer; with
``--min-pixels`` / ``--max-pixels``, the job's image budget) and ``--epochs`` are given. Exit status 0 whenever a
report was produced, even for invalid data. The worker lowers its own CPU priority (``NICENESS``), so validations
and estimates never starve the API's request handling.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Any

from qwenvl_core.scratch import ScratchDir

NICENESS = 10  # the worker's CPU priority below the API process's (os.nice increment)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="service.validation_worker")
    p.add_argument("--store", required=True, help="storage root URI (local path or s3://bucket/prefix)")
    p.add_argument("--key", required=True, help="object key of the uploaded file")
    p.add_argument("--name", required=True, help="file name of the upload (decides .jsonl / .zip / .tar.gz)")
    p.add_argument("--model", default=None, help="base model directory (tokenizer) for token counts")
    p.add_argument("--epochs", type=int, default=None, help="epochs for the training-token estimate")
    p.add_argument("--tokens-per-second", type=float, default=None)
    p.add_argument("--min-pixels", type=int, default=None, help="the job's min_pixels (image token counts)")
    p.add_argument("--max-pixels", type=int, default=None, help="the job's max_pixels (image token counts)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from qwenvl_core.data.stats import estimate_training
    from qwenvl_core.data.validate import validate_file
    from qwenvl_core.storage import open_store

    store, _ = open_store(args.store)
    processor = None
    if args.model:
        from qwenvl_core.models.processing import ProcessorOptions
        from qwenvl_core.models.registry import detect_family

        options = ProcessorOptions(min_pixels=args.min_pixels, max_pixels=args.max_pixels)
        processor = detect_family(args.model).load_processor(args.model, options)
    with ScratchDir("validate") as tmp:  # swept by a later validation if this one is killed at its timeout
        local = tmp / args.name
        with store.open_read(args.key) as src, local.open("wb") as out:
            shutil.copyfileobj(src, out, 8 << 20)
        report = validate_file(local, processor)
    out_doc: dict[str, Any] = {"report": report.to_dict()}
    if args.epochs and report.ok and report.stats.total_tokens is not None:
        out_doc["estimate"] = estimate_training(report.stats, args.epochs, args.tokens_per_second).to_dict()
    return out_doc


def main(argv: list[str] | None = None) -> int:
    os.nice(NICENESS)  # batch work: under CPU contention the API's request handling goes first
    doc = run(_parse(argv))
    sys.stdout.write(json.dumps(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
