"""Build, and check, the pretrained tiny base shipped with the package (``qwenvl_core/assets/qwen-vl-tiny-seeing``).

This module owns how the shipped directory is made: the recipe (``recipe.pretrain_base`` with ``RECIPE``, one CPU
thread) plus the files ``qwenvl_core.models.shipped`` reads: ``training_defaults.json`` (``autotune.PRETRAINED_TINY``,
what ``auto`` hyperparameters use on it) and ``pretraining.json`` (the recipe, the torch version, the loss curve,
the sha256 of every file, and the fingerprint of a short exact prefix of the run: ``PREFIX`` steps of each stage,
which the test suite re-runs in seconds to show the recipe still produces these weights).

    python -m qwenvl_core.pretrain.ship --out DIR     # build into a new directory (~6 min on one thread)
    python -m qwenvl_core.pretrain.ship --check       # rebuild in a temporary directory, compare with the shipped
    python -m qwenvl_core.pretrain.ship --refresh-defaults DIR   # new autotune.PRETRAINED_TINY, same weights

``--family NAME`` (qwen2-vl, qwen2.5-vl, qwen3-vl) does the same for that family's tiny base,
``qwenvl_core/assets/NAME-tiny-seeing`` (``pretrain.families``: the same recipe through the family's processor and
forward; its defaults are ``autotune.PRETRAINED_TINY_FAMILIES[NAME]``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qwenvl_core.autotune import DEFAULTS_FILE, PRETRAINED_TINY, PRETRAINED_TINY_FAMILIES, TrainingDefaults
from qwenvl_core.models.shipped import MANIFEST_FILE, digests, shipped_dir
from qwenvl_core.pretrain.families import SEEING, pretrain_family_base, recipe_of
from qwenvl_core.pretrain.recipe import PretrainConfig, PretrainLog, pretrain_base

NAME = "qwen-vl-tiny-seeing"
RECIPE = PretrainConfig()
PREFIX = (8, 8)  # (vision warm-up steps, LM steps) of the prefix the test suite re-runs
FINGERPRINT_RTOL = 1e-4  # the prefix's per-tensor sums and norms agree to this across CPUs and thread counts
# Tensors that hold attention key biases are left out of the comparison. A key bias adds the same amount to all of a
# query's scores, which softmax ignores, so its gradient is zero up to rounding; Adam scales that rounding noise
# into full-size steps, and the noise differs between CPUs. On a second AMD EPYC machine these tensors differed from
# the recorded fingerprints by 1e-5 to 3e-2 of their norm, while every other tensor agreed to within 4e-6.
KEY_BIAS_SUFFIXES = ("k_proj.bias", "qkv.bias", "in_proj.bias", "in_proj_bias", "c_attn.bias")


def fingerprint(model_dir: Path) -> dict[str, list[float]]:
    """Per weight tensor: [sum, L2 norm] in float64: changes when any weight changes beyond rounding."""
    from qwenvl_core.models.qwen_vl.weights import read_state_dict

    return {k: [float(v.double().sum()), float(v.double().norm())]
            for k, v in sorted(read_state_dict(model_dir).items())}


def fingerprints_match(a: dict[str, list[float]], b: dict[str, list[float]], rtol: float = FINGERPRINT_RTOL
                       ) -> list[str]:
    """The tensors whose fingerprints differ (beyond ``rtol`` of the tensor's norm); [] when all agree. Tensors
    holding attention key biases are not compared (``KEY_BIAS_SUFFIXES``)."""
    if set(a) != set(b):
        return sorted(set(a) ^ set(b))
    return [k for k in a if not k.endswith(KEY_BIAS_SUFFIXES)
            and any(abs(x - y) > rtol * max(a[k][1], 1e-6) for x, y in zip(a[k], b[k], strict=True))]


def one_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` on one CPU thread (the shipped weights were made so), restoring the thread count after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def _run(out_dir: Path, config: PretrainConfig, family: str | None, **kwargs: Any) -> tuple[Path, PretrainLog]:
    """v1's recipe (``family`` None) or a transformers family's (``families.pretrain_family_base``)."""
    if family is None:
        return pretrain_base(out_dir, config, **kwargs)
    return pretrain_family_base(family, out_dir, config, **kwargs)


def name_of(family: str | None) -> str:
    """The shipped directory of v1's base (``family`` None) or of ``family``'s."""
    return NAME if family is None else SEEING[family]


def defaults_of(family: str | None) -> TrainingDefaults:
    """The ``auto`` defaults shipped with v1's base (``family`` None) or with ``family``'s."""
    return PRETRAINED_TINY if family is None else PRETRAINED_TINY_FAMILIES[family]


def prefix_fingerprint(config: PretrainConfig = RECIPE, prefix: tuple[int, int] = PREFIX,
                       family: str | None = None) -> dict[str, list[float]]:
    """The fingerprint of the recipe's first ``prefix`` steps (a few seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        out, _ = one_thread(lambda: _run(Path(tmp) / "prefix", config, family, prefix=prefix))
        return fingerprint(out)


def build(out_dir: Path, config: PretrainConfig = RECIPE, echo: Callable[[str], None] = print,
          family: str | None = None) -> Path:
    """Run the recipe into the new directory ``out_dir`` and write the shipped files there."""
    out, log = one_thread(lambda: _run(out_dir, config, family, log_every=500,
                                       on_log=lambda s, loss: echo(f"  step {s:5d}  loss {loss:.4f}")))
    finish(out, config, {"seconds": round(log.seconds), "losses": log.losses, "vision_warmup": log.vision_warmup},
           family)
    echo(f"wrote {out} in {log.seconds:.0f} s")
    return out


def finish(out: Path, config: PretrainConfig, run: dict[str, Any], family: str | None = None) -> None:
    """Add the training defaults and the manifest to ``out``, which ``recipe.pretrain_base(out, config)`` (or
    ``families.pretrain_family_base(family, out, config)``) wrote on one thread; ``run``: what the run logged
    (seconds, losses, vision warm-up accuracy)."""
    defaults_of(family).write(out)
    files = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    manifest = {
        "name": name_of(family), "recipe": dataclasses.asdict(config), "threads": 1, "torch": torch.__version__,
        **run, "prefix": {"steps": list(PREFIX), "fingerprint": prefix_fingerprint(config, family=family)},
        "files": digests(out, files),
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def shipped_recipe(family: str | None = None) -> PretrainConfig:
    """The recipe recorded in the shipped manifest of v1's base (``family`` None) or of ``family``'s."""
    shipped = json.loads((shipped_dir(name_of(family)) / MANIFEST_FILE).read_text(encoding="utf-8"))
    recipe = shipped["recipe"]
    return PretrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in recipe.items()})


def check(echo: Callable[[str], None] = print, family: str | None = None) -> bool:
    """Rebuild into a temporary directory; True when every weight file is bit-equal to the shipped one."""
    name = name_of(family)
    shipped = json.loads((shipped_dir(name) / MANIFEST_FILE).read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        out = build(Path(tmp) / name, shipped_recipe(family), echo, family)
        rebuilt = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))
        differ = [n for n in shipped["files"] if rebuilt["files"].get(n) != shipped["files"][n]]
        if differ:
            tensors = fingerprints_match(fingerprint(out), fingerprint(shipped_dir(name)), rtol=0.0)
            echo(f"differ from the shipped files: {', '.join(differ)}; tensors that differ: {tensors[:5]} "
                 f"({len(tensors)} in all)")
        else:
            echo(f"bit-equal to {shipped_dir(name)}")
        return not differ


def refresh_defaults(model_dir: Path, family: str | None = None) -> None:
    """Rewrite ``training_defaults.json`` of a built directory from ``autotune.PRETRAINED_TINY`` (or the family's
    ``PRETRAINED_TINY_FAMILIES`` entry) and its sha256 in the manifest: the defaults are measured after the weights,
    and changing them does not retrain."""
    defaults_of(family).write(model_dir)
    path = model_dir / MANIFEST_FILE
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["files"].update(digests(model_dir, [DEFAULTS_FILE]))
    path.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--out", type=Path, help="build into this new directory")
    group.add_argument("--check", action="store_true", help="rebuild and compare with the shipped directory")
    group.add_argument("--refresh-defaults", type=Path, metavar="DIR",
                       help="rewrite DIR's training_defaults.json from autotune.PRETRAINED_TINY")
    parser.add_argument("--family", choices=sorted(SEEING),
                        help="the tiny base of this transformers family (default: v1's qwen-vl-tiny-seeing)")
    args = parser.parse_args(argv)
    if args.check:
        return 0 if check(family=args.family) else 1
    if args.refresh_defaults:
        refresh_defaults(args.refresh_defaults, args.family)
        return 0
    build(args.out, RECIPE if args.family is None else recipe_of(args.family), family=args.family)
    return 0


if __name__ == "__main__":
    sys.exit(main())
