"""The transformers processor of a model directory (tokenizer + image processor + chat template), offline.

``transformers.AutoProcessor.from_pretrained`` always builds the video processor too, and every Qwen VL video
processor needs torchvision (``Qwen2VLVideoProcessor`` / ``Qwen3VLVideoProcessor`` have no PIL backend); even
``Qwen2VLProcessor(video_processor=None)`` fails its argument check without torchvision. So the processor is
assembled from its parts, each loaded by transformers' Auto classes from the directory:

- the image processor always with the PIL backend (``Qwen2VLImageProcessorPil``), so that preprocessing is the
  same with or without torchvision (training and serving machines may differ);
- the tokenizer (``Qwen2Tokenizer`` from ``tokenizer.json``) and the chat template of the directory;
- the video processor only when torchvision is importable; otherwise the family's processor class is used
  image-only (its argument check accepts ``video_processor=None``; everything else is transformers' code).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from qwenvl_core.errors import ModelLoadError
from qwenvl_core.models.hf_vl.files import read_chat_template
from qwenvl_core.models.hf_vl.spec import FamilySpec


class _ImageOnly:
    """Mixin for a transformers processor class: accept ``video_processor=None`` (no torchvision)."""

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


@functools.cache
def _image_only_class(processor_class: type) -> type:
    """``processor_class`` that works without a video processor (same name, same behaviour otherwise)."""
    return type(processor_class.__name__, (_ImageOnly, processor_class), {"__module__": __name__})


def load_processor(spec: FamilySpec, model_dir: str | Path) -> Any:
    """The family's transformers processor for ``model_dir``, loaded from local files only."""
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.utils import is_torchvision_available

    directory = Path(model_dir)
    if not directory.is_dir():
        raise ModelLoadError(f"{directory}: not a directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
        image_processor = AutoImageProcessor.from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=False, backend="pil"
        )
        video_processor = None
        processor_class = spec.transformers_class("processor_class")
        if is_torchvision_available():
            from transformers import AutoVideoProcessor

            video_processor = AutoVideoProcessor.from_pretrained(str(directory), local_files_only=True)
        else:
            processor_class = _image_only_class(processor_class)
    except (OSError, ValueError, KeyError) as err:
        message = " ".join(str(err).split())
        raise ModelLoadError(f"{directory}: cannot load the tokenizer / image processor: {message[:1000]}") from None
    chat_template = read_chat_template(directory) or tokenizer.chat_template
    return processor_class(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        chat_template=chat_template,
    )
