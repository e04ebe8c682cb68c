"""Configs of the transformers-native Qwen VL families: build a preset's, read and validate a directory's.

The config objects are transformers' own (``Qwen2VLConfig``, ``Qwen2_5_VLConfig``, ``Qwen3VLConfig``). On top of
transformers' type checks, ``validate`` checks what would otherwise fail deep inside a forward or silently
produce a wrong model: head sizes, the M-RoPE sections, vision output width, special-token ids inside the
vocabulary, DeepStack / full-attention layer indexes. Every error names ``config.json`` and the field.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

from qwenvl_core.errors import ConfigError, PresetError
from qwenvl_core.models.hf_vl.spec import FamilySpec
from qwenvl_core.models.registry import read_config_json

_TOKEN_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


def build_config(spec: FamilySpec, preset: str) -> Any:
    """A fresh transformers config for ``preset``; ``PresetError`` lists the family's presets."""
    found = spec.presets.get(preset)
    if found is None:
        raise PresetError(f"unknown model preset {preset!r}; known presets: {', '.join(sorted(spec.presets))}")
    fields = copy.deepcopy(dict(found.config))
    names = _field_names(fields)
    config = _construct(spec, fields, source=f"preset {preset}")
    problems = validate(config, *names)
    if problems:  # a broken preset is a bug, but say what is wrong rather than fail later
        raise ConfigError(f"preset {preset}: " + "; ".join(problems))
    return config


def load_config(spec: FamilySpec, model_dir: str | Path) -> Any:
    """The validated config of ``model_dir/config.json``; errors name the file and the field."""
    path = Path(model_dir) / "config.json"
    fields = read_config_json(model_dir)
    model_type = fields.get("model_type")
    if model_type != spec.model_type:
        raise ConfigError(f"{path}: model_type {model_type!r} is not {spec.model_type!r} ({spec.name.value})")
    names = _field_names(fields)
    config = _construct(spec, fields, source=str(path))
    problems = validate(config, *names)
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return config


def _construct(spec: FamilySpec, fields: dict[str, Any], *, source: str) -> Any:
    from huggingface_hub.errors import StrictDataclassError

    fields = {key: value for key, value in fields.items() if key not in ("model_type", "architectures")}
    for sub in ("text_config", "vision_config"):
        if sub in fields and not isinstance(fields[sub], dict):
            raise ConfigError(f"{source}: {sub} must be a JSON object, got {type(fields[sub]).__name__}")
    try:
        return spec.transformers_class("config_class")(**fields)
    except StrictDataclassError as err:
        raise ConfigError(f"{source}: invalid config: {_one_line(err)}") from None
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise ConfigError(f"{source}: invalid config: {_one_line(err)}") from None


def _field_names(fields: dict[str, Any]) -> tuple[str, str]:
    """Where a config.json keeps the language-model fields ("" or "text_config.") and its M-RoPE dict."""
    text = fields.get("text_config")
    prefix, text = ("text_config.", text) if isinstance(text, dict) else ("", fields)
    return prefix, "rope_parameters" if "rope_parameters" in text else "rope_scaling"


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def head_dim(config: Any) -> int:
    """The attention head size of the language model."""
    text = config.text_config
    explicit = getattr(text, "head_dim", None)
    return int(explicit) if explicit else text.hidden_size // text.num_attention_heads


def validate(config: Any, prefix: str = "", rope_key: str = "rope_scaling") -> list[str]:
    """Problems of ``config`` as ``field: message`` strings (empty when it is usable).

    ``prefix`` / ``rope_key`` name the fields as the file spells them (flat Qwen2/2.5-VL files or ``text_config``).
    """
    text, vision = config.text_config, config.vision_config
    problems: list[str] = []
    for name in ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
                 "intermediate_size", "vocab_size"):
        if getattr(text, name) is None or getattr(text, name) < 1:
            problems.append(f"{prefix}{name} must be a positive integer, got {getattr(text, name)!r}")
    if problems:
        return problems
    if not getattr(text, "head_dim", None) and text.hidden_size % text.num_attention_heads:
        problems.append(f"{prefix}hidden_size {text.hidden_size} is not divisible by "
                        f"{prefix}num_attention_heads {text.num_attention_heads}")
    if text.num_attention_heads % text.num_key_value_heads:
        problems.append(f"{prefix}num_attention_heads {text.num_attention_heads} is not a multiple of "
                        f"{prefix}num_key_value_heads {text.num_key_value_heads}")
    problems += _check_mrope(config, f"{prefix}{rope_key}.mrope_section")
    for name in _TOKEN_FIELDS:
        value = getattr(config, name, None)
        if not isinstance(value, int) or not 0 <= value < text.vocab_size:
            problems.append(f"{name} {value!r} is not a token id below {prefix}vocab_size {text.vocab_size}")
    for name in ("depth", "num_heads", "patch_size", "spatial_merge_size", "temporal_patch_size"):
        value = getattr(vision, name, None)
        if not isinstance(value, int) or value < 1:
            problems.append(f"vision_config.{name} must be a positive integer, got {value!r}")
    out_field = "out_hidden_size" if hasattr(vision, "out_hidden_size") else "hidden_size"
    if getattr(vision, out_field) != text.hidden_size:
        problems.append(f"vision_config.{out_field} {getattr(vision, out_field)} must equal the language model's "
                        f"{prefix}hidden_size {text.hidden_size} (the merger's output feeds the language model)")
    for name in ("fullatt_block_indexes", "deepstack_visual_indexes"):
        indexes = getattr(vision, name, None)
        if indexes is not None and any(not 0 <= int(i) < vision.depth for i in indexes):
            problems.append(f"vision_config.{name} {list(indexes)} must be layer indexes below "
                            f"vision_config.depth {vision.depth}")
    deepstack = getattr(vision, "deepstack_visual_indexes", None)
    if deepstack is not None and len(deepstack) > text.num_hidden_layers:
        problems.append(f"vision_config.deepstack_visual_indexes has {len(deepstack)} layers but the language "
                        f"model has only {prefix}num_hidden_layers {text.num_hidden_layers}")
    positions = getattr(vision, "num_position_embeddings", None)
    if positions is not None and math.isqrt(positions) ** 2 != positions:
        problems.append(f"vision_config.num_position_embeddings {positions} must be a square (a 2-D grid)")
    return problems


def _check_mrope(config: Any, field: str) -> list[str]:
    rope = config.text_config.rope_parameters or {}
    section = rope.get("mrope_section")
    if not isinstance(section, list | tuple) or len(section) != 3 or not all(type(x) is int for x in section):
        return [f"{field} must be 3 integers (temporal, height, width), got {section!r}"]
    half = head_dim(config) // 2
    if sum(section) != half:
        return [f"{field} {list(section)} must add up to head_dim / 2 = {half}"]
    if rope.get("mrope_interleaved") and 3 * max(section[1], section[2]) > half:
        # Interleaved M-RoPE gives height / width every third frequency: 3 * section must fit in head_dim / 2.
        return [f"{field} {list(section)}: with mrope_interleaved, 3 x the height and width sections must not "
                f"exceed head_dim / 2 = {half}"]
    return []
