"""``qwenvl data``: validate a data file or bundle before uploading it, and write synthetic datasets.

Thin: parses flags, calls ``qwenvl_core.data`` and prints. ``validate`` exits with status 1 when the data has
errors (warnings alone do not fail), so it can gate a script or CI step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from qwenvl_core.data.validate import ValidationReport
    from qwenvl_core.models.processing import FamilyProcessor

app = typer.Typer(help="Validate instruction datasets and generate synthetic ones.", no_args_is_help=True)


@app.command("validate")
def validate(
    file: Annotated[Path, typer.Argument(help="A .json/.jsonl data file or a .zip/.tar.gz bundle.")],
    model: Annotated[Path | None, typer.Option(help="Model directory: enables token counts and length checks.")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    max_length: Annotated[int | None, typer.Option(help="Maximum sample length in tokens (needs --model).")]
    = None,
    length_policy: Annotated[str, typer.Option(help="Over-long samples: reject or truncate.")] = "reject",
    max_errors: Annotated[int, typer.Option(help="Errors (and warnings) listed; all are counted.")] = 50,
    max_images: Annotated[int, typer.Option(help="Maximum images per sample.")] = 10,
    check_images: Annotated[bool, typer.Option(help="Decode every image.")] = True,
    epochs: Annotated[int, typer.Option(help="Epochs for the training-token estimate.")] = 1,
    tokens_per_second: Annotated[float | None, typer.Option(help="Measured training throughput, for a time "
                                                            "estimate.")] = None,
) -> None:
    """Check every sample (schema, roles, images, boxes, ids, length) and print a report with statistics."""
    from qwenvl_core.data.checks import SampleRules
    from qwenvl_core.data.encode import EncodeOptions, LengthPolicy
    from qwenvl_core.data.validate import ValidationOptions, validate_file
    from qwenvl_core.errors import QwenVLError

    if max_length is not None and model is None:
        raise QwenVLError("--max-length needs --model (lengths are counted with the model's tokenizer)")
    if length_policy not in {p.value for p in LengthPolicy}:
        raise QwenVLError(f"--length-policy: expected reject or truncate, got {length_policy!r}")
    options = ValidationOptions(
        max_issues=max_errors, rules=SampleRules(max_images=max_images), check_images=check_images,
        encode=EncodeOptions(max_length=max_length, length_policy=LengthPolicy(length_policy)),
    )
    report = validate_file(file, _processor(model), options)
    payload = report.to_dict()
    if report.stats.total_tokens is not None:
        from qwenvl_core.data.stats import estimate_training

        payload["estimate"] = estimate_training(report.stats, epochs, tokens_per_second).to_dict()
    if as_json:
        typer.echo(json.dumps(payload, ensure_ascii=False, indent=2))
    else:
        _print_report(report, payload)
    if not report.ok:
        raise typer.Exit(code=1)


def _processor(model: Path | None) -> FamilyProcessor | None:
    if model is None:
        return None
    from qwenvl_core.models.registry import detect_family

    return detect_family(model).load_processor(model)


def _print_report(report: ValidationReport, payload: dict) -> None:
    console = Console(highlight=False, soft_wrap=True)
    status = "[green]OK[/green]" if report.ok else "[red]FAILED[/red]"
    console.print(f"{payload['file']} ({payload['format'] or 'unknown format'}): {status}, "
                  f"{payload['valid_samples']}/{payload['records']} samples valid, "
                  f"{payload['error_count']} errors, {payload['warning_count']} warnings")
    for kind in ("errors", "warnings"):
        for issue in payload[kind]:
            console.print(f"  {issue['severity']}: {issue['text']}", markup=False)
    if payload["errors_truncated"]:
        console.print(f"  ... {payload['error_count'] - len(payload['errors'])} more errors not listed")
    console.print(_stats_table(payload))


def _stats_table(payload: dict) -> Table:
    stats = payload["stats"]
    table = Table(title="statistics", show_header=False)
    for key in ("samples", "turns", "images", "text_tokens", "image_tokens", "supervised_tokens",
                "total_tokens", "truncated_samples", "min_length", "mean_length", "max_length"):
        value = stats[key]
        table.add_row(key, "-" if value is None else str(value))
    if stats["total_tokens"] is not None:
        for row in stats["length_histogram"]:
            table.add_row(f"length {row['range']}", str(row["samples"]))
        estimate = payload["estimate"]
        table.add_row(f"training tokens ({estimate['epochs']} epochs)", str(estimate["estimated_train_tokens"]))
        if estimate["estimated_seconds"] is not None:
            table.add_row("estimated training time", f"{estimate['estimated_seconds'] / 3600:.2f} h")
    else:
        table.add_row("tokens", "pass --model DIR for token counts and lengths")
    return table


@app.command("synth")
def synth(
    out: Annotated[Path, typer.Option(help="Output directory (must not exist or be empty).")],
    fmt: Annotated[str, typer.Option("--format", help="qwen (official JSON list), openai (JSONL) or preference (JSONL pairs for DPO).")] = "qwen",
    n: Annotated[int, typer.Option(help="Number of samples (train + validation).")] = 200,
    seed: Annotated[int, typer.Option(help="Seed; same seed, same files.")] = 0,
    val_fraction: Annotated[float, typer.Option(help="Fraction of samples in the validation split.")] = 0.1,
    image_size: Annotated[int, typer.Option(help="Image side in pixels.")] = 112,
) -> None:
    """Write a coloured-shapes dataset: images, train/validation files and one .zip bundle per split."""
    from qwenvl_core.data.formats import DataFormat
    from qwenvl_core.data.synth import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, write_synth_dataset
    from qwenvl_core.errors import QwenVLError

    if fmt not in {f.value for f in DataFormat}:
        raise QwenVLError(f"--format: expected qwen, openai or preference, got {fmt!r}")
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise QwenVLError(f"--image-size: expected {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels, got {image_size}")
    try:
        result = write_synth_dataset(out, DataFormat(fmt), n=n, seed=seed, val_fraction=val_fraction,
                                     image_size=image_size)
    except OSError as exc:  # e.g. a parent of --out is a file, or not writable
        raise QwenVLError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
    typer.echo(f"wrote {result.samples} samples with {result.images} images ({fmt} format) to {out}:")
    for path in (result.train, result.validation, result.train_bundle, result.validation_bundle):
        if path is not None:
            typer.echo(f"  {path}")
