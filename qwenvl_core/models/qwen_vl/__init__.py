"""Qwen-VL v1: config, presets, architecture (ViT + adapter + QWen LM), tokenizer, processor, weights I/O.

The names below are imported lazily (PEP 562), so importing a light submodule such as ``tokenizer`` does not
pull in torch / transformers through this package.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "QWenVLConfig": "config",
    "QWenLMHeadModel": "modeling",
    "PRESETS": "presets",
    "build_config": "presets",
    "load_model": "weights",
    "save_model": "weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
