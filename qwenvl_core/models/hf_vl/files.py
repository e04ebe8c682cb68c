"""The processor-side files of a model directory, in the layout of the official repositories.

``chat_template.json`` (``{"chat_template": ...}``), ``preprocessor_config.json`` (the family's image processor:
patch / merge / temporal patch sizes, min and max pixels, normalisation) and, where the family has one,
``video_preprocessor_config.json``. ``read_chat_template`` reads the template back from any of the places
transformers looks for it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qwenvl_core.errors import TokenizerError
from qwenvl_core.models.hf_vl.spec import FamilySpec, Preset


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(dict(data), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_processor_files(spec: FamilySpec, preset: Preset, out_dir: str | Path) -> None:
    """Write the chat template, the image processor config and (if any) the video processor config."""
    out = Path(out_dir)
    _write_json(out / "chat_template.json", {"chat_template": spec.chat_template})
    _write_json(out / "preprocessor_config.json", {**spec.image_processor, **preset.image_processor})
    if spec.video_processor is not None:
        _write_json(out / "video_preprocessor_config.json", spec.video_processor)


def read_chat_template(model_dir: str | Path) -> str | None:
    """The chat template of a directory: ``chat_template.jinja``, ``chat_template.json``, else None."""
    directory = Path(model_dir)
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    path = directory / "chat_template.json"
    if not path.is_file():
        return None
    try:
        template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise TokenizerError(f"{path}: not a JSON object with a 'chat_template' string: {err}") from None
    if not isinstance(template, str):
        raise TokenizerError(f"{path}: 'chat_template' must be a string, got {type(template).__name__}")
    return template
