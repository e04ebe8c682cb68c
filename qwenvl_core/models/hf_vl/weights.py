"""Strict weights I/O of the transformers-native Qwen VL families, through transformers' own loader.

Loading reads only a local directory (``local_files_only``), only safetensors (sharded or not; a ``.bin``-only
directory is refused, never unpickled), never remote code, and is strict: transformers' loading report is checked
and any missing, unexpected or mis-shaped key is a ``ModelLoadError`` that lists them, instead of a model with
silently random-initialised weights. transformers maps the official key layouts (``visual.*`` / ``model.layers.*``
of the Qwen2/2.5-VL checkpoints, ``model.visual.*`` / ``model.language_model.*`` of Qwen3-VL) onto its modules,
and ``save_pretrained`` writes them back in the official layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qwenvl_core.errors import ModelLoadError
from qwenvl_core.models.hf_vl.fused_norms import fuse_rms_norms
from qwenvl_core.models.hf_vl.fused_rotary import install_fused_rotary
from qwenvl_core.models.hf_vl.spec import FamilySpec
from qwenvl_core.models.qwen_vl.weights import _format_keys


def check_weight_files(model_dir: str | Path) -> None:
    """Refuse a directory without safetensors weights, naming what it has instead."""
    directory = Path(model_dir)
    if any(directory.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in directory.glob("*.bin"))
    if pickled:
        raise ModelLoadError(
            f"{directory} has only pickled weights ({', '.join(pickled[:3])}); only safetensors are loaded, "
            "since unpickling can run code. Convert them to (sharded) safetensors first"
        )
    raise ModelLoadError(f"no weights in {directory}: expected model.safetensors or model.safetensors.index.json")


def load_model(
    spec: FamilySpec,
    model_dir: str | Path,
    config: Any,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """Load ``model_dir`` strictly into the family's transformers model built from ``config``; eval mode; its
    RMSNorm layers computed by one fused op (``fused_norms``), its rotary embedding in fewer kernels
    (``fused_rotary``): the same values either way."""
    from safetensors import SafetensorError

    directory = Path(model_dir)
    check_weight_files(directory)
    extra: dict[str, Any] = {} if str(device) == "cpu" else {"device_map": {"": str(device)}}
    try:
        model, report = spec.transformers_class("model_class").from_pretrained(
            str(directory),
            config=config,
            dtype=dtype or torch.float32,
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=False,
            output_loading_info=True,
            # Report mis-shaped keys in the loading info (listed below) instead of a bare RuntimeError.
            ignore_mismatched_sizes=True,
            **extra,
        )
    except (OSError, SafetensorError, RuntimeError, ValueError, KeyError) as err:
        message = " ".join(str(err).split())
        raise ModelLoadError(f"weights in {directory} cannot be loaded: {message[:2000]}") from None
    problems = []
    for label, key in (("missing", "missing_keys"), ("unexpected", "unexpected_keys"), ("mis-shaped", "mismatched_keys")):
        keys = sorted(_describe_key(k) for k in report.get(key) or ())
        if keys:
            problems.append(f"{len(keys)} {label} keys: {_format_keys(keys)}")
    if report.get("error_msgs"):
        problems.append("; ".join(str(m) for m in report["error_msgs"]))
    if problems:
        raise ModelLoadError(f"weights in {directory} do not match its config.json: " + "; ".join(problems))
    fuse_rms_norms(model)
    install_fused_rotary(type(model).__module__)
    return model.eval()


def _describe_key(entry: Any) -> str:
    """A key of transformers' loading report; mis-shaped ones come as (key, checkpoint shape, model shape)."""
    if isinstance(entry, tuple) and len(entry) == 3:
        key, found, expected = entry
        return f"{key} {tuple(found)} != {tuple(expected)}"
    return str(entry)


def save_model(model: torch.nn.Module, out_dir: str | Path, max_shard_size: int | str = "2GB") -> Path:
    """Write ``config.json``, ``generation_config.json`` and (sharded) safetensors in the official key layout."""
    out = Path(out_dir)
    model.save_pretrained(str(out), max_shard_size=max_shard_size)
    return out
