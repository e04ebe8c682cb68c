"""Dynamic resolution per job: ``ProcessorOptions`` (``min_pixels`` / ``max_pixels``) and the pixel budget of a
model directory they override, decided from its files without torch or transformers.

The transformers families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) resize every image to a side multiple of ``factor``
(patch x merge) within a pixel budget, which their ``preprocessor_config.json`` states (``min_pixels`` /
``max_pixels``, or ``size.shortest_edge`` / ``size.longest_edge``); a job may set its own (the usual cure for
running out of memory on large images). A directory without that file (Qwen-VL v1) resizes every image to one fixed
size and takes no budget. ``resolve_budget`` is the one rule both the API process (checking a job request against
its base model, ``service/routes/jobs.py``) and the family processor (``hf_vl.processor``) apply, so a request the
API accepts is one the job's processor accepts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from qwenvl_core.errors import ConfigError
from qwenvl_core.grounding.resize import QWEN2_VL_DEFAULT_MAX_PIXELS, QWEN2_VL_DEFAULT_MIN_PIXELS, ResizeRule

PREPROCESSOR_CONFIG = "preprocessor_config.json"


@dataclass(frozen=True)
class ProcessorOptions:
    """A job's processor settings for its base model; ``None`` keeps the model directory's value."""

    min_pixels: int | None = None
    """Smallest image area, in pixels, after the processor's resize (smaller images are enlarged)."""
    max_pixels: int | None = None
    """Largest image area, in pixels, after the processor's resize (larger images are shrunk): fewer image tokens."""

    def set_fields(self) -> dict[str, int]:
        """The options that are set, by name (empty: the model's own processor settings)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


class PixelOptionsError(ConfigError):
    """``ProcessorOptions`` the base model cannot take; ``field`` names the option (``min_pixels`` / ``max_pixels``)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def directory_budget(model_dir: str | Path) -> ResizeRule | None:
    """The pixel budget of ``model_dir``'s image processor (its ``preprocessor_config.json``, read as transformers'
    ``Qwen2VLImageProcessor`` reads it: ``min_pixels`` / ``max_pixels`` over ``size``, class defaults otherwise);
    ``None`` when the directory has no such file (a family that resizes every image to a fixed size)."""
    path = Path(model_dir) / PREPROCESSOR_CONFIG
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not readable JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(config).__name__}")
    size = config.get("size") if isinstance(config.get("size"), dict) else {}
    values = {
        "min_pixels": _first(config.get("min_pixels"), size.get("shortest_edge"), QWEN2_VL_DEFAULT_MIN_PIXELS),
        "max_pixels": _first(config.get("max_pixels"), size.get("longest_edge"), QWEN2_VL_DEFAULT_MAX_PIXELS),
        "factor": _int(config.get("patch_size", 14), "patch_size", path) * _int(config.get("merge_size", 2),
                                                                                "merge_size", path),
    }
    for name in ("min_pixels", "max_pixels"):
        values[name] = _int(values[name], name, path)
    try:
        return ResizeRule(**values)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def resolve_budget(base: ResizeRule, options: ProcessorOptions, model: str = "the base model") -> ResizeRule:
    """``base`` with the options that are set; ``PixelOptionsError`` naming the option when the result is not a
    budget the processor can honour (min above max, or max below one merged patch of ``factor`` x ``factor``)."""
    min_pixels = base.min_pixels if options.min_pixels is None else options.min_pixels
    max_pixels = base.max_pixels if options.max_pixels is None else options.max_pixels
    for name, value in options.set_fields().items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PixelOptionsError(f"{name} must be a positive integer, got {value!r}", name)
    smallest = base.factor * base.factor
    if max_pixels < smallest:
        raise PixelOptionsError(f"max_pixels {max_pixels} is below the smallest image {model} makes: one merged "
                                f"patch of {base.factor}x{base.factor} = {smallest} pixels", "max_pixels")
    if min_pixels > max_pixels:
        def origin(name: str) -> str:
            return "" if getattr(options, name) is not None else f" (from {model}'s {PREPROCESSOR_CONFIG})"

        raise PixelOptionsError(f"min_pixels {min_pixels}{origin('min_pixels')} must not exceed max_pixels "
                                f"{max_pixels}{origin('max_pixels')}",
                                "max_pixels" if options.max_pixels is not None else "min_pixels")
    return ResizeRule(min_pixels, max_pixels, base.factor)


def check_pixel_options(model_dir: str | Path, options: ProcessorOptions, model: str = "the base model"
                        ) -> ResizeRule | None:
    """The budget a job with ``options`` gets on ``model_dir`` (None: a fixed-size family and no options);
    ``PixelOptionsError`` naming the option when the model takes none or the result is unusable."""
    base = directory_budget(model_dir)
    if base is None:
        if options.set_fields():
            name = next(iter(options.set_fields()))
            raise PixelOptionsError(
                f"{name}: {model} resizes every image to one fixed size (it has no {PREPROCESSOR_CONFIG} pixel "
                "budget: a Qwen-VL v1 model); min_pixels / max_pixels apply to Qwen2-VL, Qwen2.5-VL and Qwen3-VL "
                "base models", name)
        return None
    return resolve_budget(base, options, model)


def _first(*values: Any) -> Any:
    return next(v for v in values if v is not None)


def _int(value: Any, name: str, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{path}: {name} must be a positive integer, got {value!r}")
    return value
