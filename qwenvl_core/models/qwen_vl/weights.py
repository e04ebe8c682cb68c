"""Strict Qwen-VL weights I/O: read (sharded) safetensors or .bin checkpoints, load them into a meta-built model, save.

Loading is strict: any missing / unexpected key or shape mismatch is a ModelLoadError listing the keys. GPTQ Int4
checkpoints are recognised and refused with a clear message.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from qwenvl_core.errors import ConfigError, ModelLoadError
from qwenvl_core.models.qwen_vl.config import QWenVLConfig
from qwenvl_core.models.qwen_vl.modeling import QWenLMHeadModel
from qwenvl_core.models.registry import read_config_json

MAX_LISTED_KEYS = 20
_WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


def _format_keys(keys: list[str]) -> str:
    """Comma list of at most MAX_LISTED_KEYS keys, with a count of the rest."""
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    return shown if len(keys) <= MAX_LISTED_KEYS else f"{shown}, ... and {len(keys) - MAX_LISTED_KEYS} more"


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    """One safetensors or .bin file (the latter only with weights_only=True)."""
    if not path.is_file():
        raise ModelLoadError(f"weights file {path} is missing")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path), device="cpu")
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise ModelLoadError(f"weights file {path} cannot be read: {err}") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"weights file {path} does not hold a state dict of tensors")
    return state


def _read_index(index_path: Path) -> dict[str, torch.Tensor]:
    """All shards named by an index.json weight_map."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelLoadError(
            f"weights index {index_path} is unreadable or has no 'weight_map': {err}"
        ) from err
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state.update(_read_file(index_path.parent / shard))
    return state


def read_state_dict(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """Read the checkpoint of ``model_dir``: safetensors index, safetensors, .bin index, .bin (in that order)."""
    model_dir = Path(model_dir)
    for name in _WEIGHT_FILES:
        path = model_dir / name
        if path.is_file():
            return _read_index(path) if name.endswith(".index.json") else _read_file(path)
    raise ModelLoadError(f"no weights in {model_dir}: expected one of {', '.join(_WEIGHT_FILES)}")


def read_config(model_dir: str | Path) -> QWenVLConfig:
    """QWenVLConfig from ``model_dir/config.json``; errors name the file."""
    fields = read_config_json(model_dir)
    fields.pop("model_type", None)
    try:
        return QWenVLConfig(**fields)
    except ConfigError as err:
        raise ConfigError(f"{Path(model_dir) / 'config.json'}: {err}") from err
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{Path(model_dir) / 'config.json'}: invalid config: {err}") from err


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Raise ModelLoadError unless ``state`` has exactly the model's keys and shapes."""
    if any(key.endswith(".qweight") for key in state):
        raise ModelLoadError(
            f"{source} is a GPTQ Int4 checkpoint (keys ending in .qweight), which is not supported; use the bf16 "
            "checkpoint (Q-LoRA here quantizes with bitsandbytes at load time)"
        )
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_format_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_format_keys(unexpected)}")
    if wrong:
        details = [f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}" for k in wrong]
        problems.append(f"{len(wrong)} shape mismatches: {_format_keys(details)}")
    if problems:
        raise ModelLoadError(f"weights in {source} do not match the config: " + "; ".join(problems))


def load_model(
    model_dir: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> QWenLMHeadModel:
    """Build the model from ``model_dir/config.json`` on meta, load its weights strictly, cast, eval()."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    state = read_state_dict(model_dir)
    with torch.device("meta"):
        model = QWenLMHeadModel(config)
    check_state_dict(model, state, model_dir)
    target = dtype or torch.float32
    state = {key: value.to(device=device, dtype=target) for key, value in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.reset_non_persistent_buffers()
    model.config.dtype = target
    return model.eval()


def save_model(model: QWenLMHeadModel, out_dir: str | Path, max_shard_size: int | str = "2GB") -> Path:
    """Write config.json + (sharded) safetensors with save_pretrained; returns the directory."""
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir), max_shard_size=max_shard_size)
    return out_dir
