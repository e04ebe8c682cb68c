"""``qwenvl model``: create random model directories and inspect presets or model directories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Create and inspect base models.", no_args_is_help=True)

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def _torch_dtype(name: str) -> Any:
    import torch

    from qwenvl_core.errors import QwenVLError

    if name not in _DTYPES:
        raise QwenVLError(f"--dtype: unknown dtype {name!r}; choose one of {', '.join(sorted(_DTYPES))}")
    return getattr(torch, _DTYPES[name])


@app.command("init")
def init(
    preset: Annotated[str, typer.Option(help="Preset to build, e.g. qwen-vl-tiny, qwen2.5-vl-tiny, qwen3-vl-tiny, "
                                             "qwen-vl-chat (`qwenvl model info` lists a preset's size).")],
    out: Annotated[Path, typer.Option(help="Output directory (must not exist or be empty).")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights; same seed, same files.")] = 0,
    dtype: Annotated[str, typer.Option(help="Weight dtype: float32, bfloat16 or float16.")] = "float32",
) -> None:
    """Write a complete model directory (config, tokenizer, safetensors) with random weights."""
    from qwenvl_core.errors import QwenVLError
    from qwenvl_core.generation import MAX_SEED, MIN_SEED
    from qwenvl_core.models.registry import family_for_preset

    if not MIN_SEED <= seed <= MAX_SEED:  # what torch.manual_seed takes
        raise QwenVLError(f"--seed: expected an integer in [{MIN_SEED}, {MAX_SEED}], got {seed}")
    family = family_for_preset(preset)
    path = family.materialize(preset, out, seed=seed, dtype=_torch_dtype(dtype))
    typer.echo(f"wrote {preset} (seed {seed}, {dtype}) to {path}")


def describe(preset_or_dir: str, *, with_keys: bool) -> dict[str, Any]:
    """Config, parameter counts per component and (optionally) every parameter's name and shape.

    The model is built on the meta device, so even the full-size preset costs no memory. Tied weights (the LM
    head sharing the token embedding) are counted once.
    """
    import torch

    from qwenvl_core.models.registry import detect_family, family_for_preset, parameter_counts

    path = Path(preset_or_dir)
    if path.is_dir():
        family = detect_family(path)
        config = family.load_config(path)
        source = str(path)
    else:
        family = family_for_preset(preset_or_dir)
        config = family.build_config(preset_or_dir)
        source = f"preset {preset_or_dir}"
    with torch.device("meta"):
        model = family.build_model(config)
    keys = [{"name": name, "shape": list(tensor.shape)} for name, tensor in model.state_dict().items()]
    info: dict[str, Any] = {
        "source": source,
        "family": family.name.value,
        "config": config.to_dict(),
        "parameters": parameter_counts(family, model),
    }
    if with_keys:
        info["keys"] = keys
    return info


def _print_info(info: dict[str, Any]) -> None:
    console = Console()
    console.print(f"[bold]{info['source']}[/bold] (family {info['family']})")
    console.print_json(json.dumps(info["config"], default=str))
    table = Table("component", "parameters", "share")
    total = info["parameters"]["total"]
    for component in ("vision", "adapter", "language", "total"):
        n = info["parameters"][component]
        table.add_row(component, f"{n:,} ({n / 1e9:.3f} B)", f"{100 * n / max(total, 1):.1f}%")
    console.print(table)
    if "keys" in info:
        keys = Table("parameter", "shape")
        for row in info["keys"]:
            keys.add_row(row["name"], " x ".join(map(str, row["shape"])))
        console.print(keys)


@app.command("info")
def info(
    preset_or_dir: Annotated[str, typer.Argument(help="A preset name or a model directory.")],
    keys: Annotated[bool, typer.Option("--keys", help="List every parameter name and shape.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Print the config, parameter count per component (ViT, adapter, LM) and optionally every key."""
    details = describe(preset_or_dir, with_keys=keys)
    if as_json:
        typer.echo(json.dumps(details, indent=2, default=str))
    else:
        _print_info(details)
