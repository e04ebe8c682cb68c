"""QwenVLProcessor: a conversation in, ``input_ids`` + ``pixel_values`` out; v1's ``FamilyProcessor``.

This module owns the glue between the tokenizer, the ChatML layout (``chat``) and image loading
(``qwenvl_core.images`` + v1 ``preprocess_image``) for one model directory: it reads the image size and number of
adapter queries from ``config.json``, checks that the config and ``qwen.tiktoken`` agree on the ``<img>`` id, and
loads images in order of appearance so that image *k* fills span *k* (the model forward contract in
``docs/architecture.md``). Every image span has the same length, so encoding never looks at an image.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from qwenvl_core.conversation import ImagePart, Message
from qwenvl_core.errors import ConfigError
from qwenvl_core.images import DEFAULT_IMAGE_LIMITS, ImageLimits, load_image
from qwenvl_core.models.pixel_budget import PixelOptionsError, ProcessorOptions
from qwenvl_core.models.processing import EncodedConversation, EncodedPrompt, VisionInputs
from qwenvl_core.models.qwen_vl.chat import DEFAULT_SYSTEM_PROMPT, encode_conversation
from qwenvl_core.models.qwen_vl.grounding import PixelObject, parse_boxes_pixels
from qwenvl_core.models.qwen_vl.images import preprocess_image
from qwenvl_core.models.qwen_vl.tokenizer import TIKTOKEN_FILENAME, QWenTokenizer

CONFIG_FILENAME = "config.json"
DEFAULT_N_QUERIES = 256


class QwenVLProcessor:
    """Turns conversations into model inputs for one Qwen-VL v1 model."""

    def __init__(
        self,
        tokenizer: QWenTokenizer,
        image_size: int,
        n_queries: int = DEFAULT_N_QUERIES,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        image_limits: ImageLimits = DEFAULT_IMAGE_LIMITS,
    ) -> None:
        if image_size < 1 or n_queries < 1:
            raise ConfigError(f"image_size and n_queries must be >= 1, got {image_size} and {n_queries}")
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.n_queries = n_queries
        self.system_prompt = system_prompt
        self.image_limits = image_limits

    @classmethod
    def from_dir(
        cls,
        model_dir: str | Path,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        image_limits: ImageLimits = DEFAULT_IMAGE_LIMITS,
        options: ProcessorOptions | None = None,
    ) -> QwenVLProcessor:
        """Build from ``model_dir/config.json`` (``visual`` block) and ``model_dir/qwen.tiktoken``; set ``options``
        (``min_pixels`` / ``max_pixels``) are refused: v1 resizes every image to its fixed size."""
        model_dir = Path(model_dir)
        config_path = model_dir / CONFIG_FILENAME
        config = _read_config(config_path)
        visual = _visual_config(config, config_path)
        image_size = _positive_int(visual, "image_size", None, config_path)
        for name in (options or ProcessorOptions()).set_fields():
            raise PixelOptionsError(
                f"{name}: Qwen-VL v1 resizes every image to its fixed {image_size}x{image_size} pixels "
                f"({config_path} visual.image_size); min_pixels / max_pixels apply to the Qwen2-VL, Qwen2.5-VL "
                "and Qwen3-VL families", name)
        tokenizer = QWenTokenizer.from_dir(model_dir)
        _check_against_tokenizer(visual, config, tokenizer, config_path, model_dir)
        return cls(
            tokenizer,
            image_size=image_size,
            n_queries=_positive_int(visual, "n_queries", DEFAULT_N_QUERIES, config_path),
            system_prompt=system_prompt,
            image_limits=image_limits,
        )

    def pixel_values(
        self, images: Sequence[ImagePart], base_dir: str | Path | None = None
    ) -> torch.Tensor | None:
        """Load and preprocess ``images`` in order: ``[N, 3, S, S]``, or None for no images."""
        if not images:
            return None
        tensors = [
            preprocess_image(
                load_image(part.source, base_dir=base_dir, limits=self.image_limits), self.image_size
            )
            for part in images
        ]
        return torch.stack(tensors)  # (N, 3, S, S)

    def vision_inputs(
        self, images: Sequence[ImagePart], base_dir: str | Path | None = None
    ) -> VisionInputs | None:
        """``{"pixel_values": [N, 3, S, S]}`` of ``images`` in order, or None for no images."""
        pixels = self.pixel_values(images, base_dir=base_dir)
        return None if pixels is None else VisionInputs({"pixel_values": pixels}, len(images))

    def encode_conversation(
        self, messages: Sequence[Message], add_generation_prompt: bool = False,
        base_dir: str | Path | None = None,
    ) -> EncodedConversation:
        """Token layout of ``messages`` (turn by turn, for label masking); no image is read (``base_dir`` is
        unused: every v1 image span has ``n_queries`` + 2 tokens)."""
        return encode_conversation(
            self.tokenizer, messages, self.n_queries, self.system_prompt, add_generation_prompt
        )

    def encode_chat(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        base_dir: str | Path | None = None,
    ) -> EncodedPrompt:
        """``input_ids`` and vision inputs for a conversation (by default prompting the assistant)."""
        encoded = self.encode_conversation(messages, add_generation_prompt)
        return EncodedPrompt(
            input_ids=encoded.input_ids,
            vision=self.vision_inputs(encoded.images, base_dir=base_dir),
            images=encoded.images,
        )

    @property
    def pad_token_id(self) -> int:
        """``<|endoftext|>`` pads batches, as in the official ``finetune.py``."""
        return self.tokenizer.eod_id

    @property
    def image_token_ids(self) -> tuple[int, ...]:
        """The image-span structure ``<img>``, ``</img>``, ``<imgpad>``: never trained, never generated (images
        come only from the prompt; a generated tag has no pixels)."""
        return self.tokenizer.image_token_ids

    def count_text_tokens(self, text: str) -> int:
        """Tokens of ``text`` encoded as message content (``QWenTokenizer.encode_content``)."""
        return len(self.tokenizer.encode_content(text))

    def decode(self, ids: Sequence[int]) -> str:
        """Generated ids as text with their grounding markup (other special and padded-vocabulary ids dropped):
        what serving returns and evaluation parses boxes from."""
        return self.tokenizer.decode_answer(ids)

    def parse_boxes(self, text: str, image: Image.Image | tuple[int, int]) -> list[PixelObject]:
        """Boxes in model output as pixel boxes of ``image`` (a PIL image or its ``(width, height)``)."""
        width, height = image.size if isinstance(image, Image.Image) else image
        return parse_boxes_pixels(text, width, height)


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"model config {path} not found")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"model config {path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"model config {path} must be a JSON object")
    return config


def _visual_config(config: dict[str, Any], path: Path) -> dict[str, Any]:
    visual = config.get("visual")
    if not isinstance(visual, dict):
        raise ConfigError(f"model config {path} has no 'visual' object")
    return visual


def _positive_int(visual: dict[str, Any], key: str, default: int | None, path: Path) -> int:
    value = visual.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"model config {path}: visual.{key} must be a positive integer, got {value!r}")
    return value


def _check_against_tokenizer(
    visual: dict[str, Any], config: dict[str, Any], tokenizer: QWenTokenizer, path: Path, model_dir: Path
) -> None:
    tiktoken_path = model_dir / TIKTOKEN_FILENAME
    start_id = visual.get("image_start_id")
    if start_id != tokenizer.img_start_id:
        raise ConfigError(
            f"model config {path}: visual.image_start_id is {start_id!r} but the <img> id of {tiktoken_path} "
            f"({tokenizer.n_ranks} ranks) is {tokenizer.img_start_id}"
        )
    vocab_size = config.get("vocab_size")
    if vocab_size is not None and (not isinstance(vocab_size, int) or vocab_size < tokenizer.vocab_size):
        raise ConfigError(
            f"model config {path}: vocab_size {vocab_size!r} is smaller than the {tokenizer.vocab_size} "
            f"tokens of {tiktoken_path}"
        )
