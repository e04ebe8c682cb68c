"""``HFVLProcessor``: the ``FamilyProcessor`` of the transformers-native Qwen VL families, on transformers' own
processor of a model directory (tokenizer + image processor + chat template), loaded offline.

What it adds to transformers' processor is what the platform's protocol needs: the chat layout turn by turn
(``hf_vl.chat``: label masking; ids equal to ``apply_chat_template``'s), image spans counted from each image's header
(no decoding while encoding), message text that cannot forge turns, per-job ``min_pixels`` / ``max_pixels``
(``ProcessorOptions``), the dataset's v1 grounding markup rewritten in the family's convention and model output
parsed back to pixels (``qwenvl_core.grounding``), decoding that keeps the grounding markup.

Loading (``load_hf_processor``): ``transformers.AutoProcessor.from_pretrained`` always builds the video processor
too, and every Qwen VL video processor needs torchvision (``Qwen2VLVideoProcessor`` / ``Qwen3VLVideoProcessor``
have no PIL backend); even ``Qwen2VLProcessor(video_processor=None)`` fails its argument check without
torchvision. So the processor is assembled from its parts, each loaded by transformers' Auto classes:

- the image processor always with the PIL backend (``Qwen2VLImageProcessorPil``), so that preprocessing is the
  same with or without torchvision (training and serving machines may differ), with the job's pixel budget;
- the tokenizer (``Qwen2Tokenizer`` from ``tokenizer.json``) and the chat template of the directory;
- the video processor only when torchvision is importable; otherwise the family's processor class is used
  image-only (its argument check accepts ``video_processor=None``; everything else is transformers' code).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qwenvl_core.conversation import ImagePart, Message, TextPart
from qwenvl_core.errors import ConfigError, ImageError, ModelLoadError, QwenVLError
from qwenvl_core.grounding import GroundingCodec, PixelObject, ResizeRule, codec_for
from qwenvl_core.images import DEFAULT_IMAGE_LIMITS, ImageLimits, image_size, load_image
from qwenvl_core.models.hf_vl.chat import ChatEncoder
from qwenvl_core.models.hf_vl.files import read_chat_template
from qwenvl_core.models.hf_vl.spec import FamilySpec
from qwenvl_core.models.pixel_budget import ProcessorOptions, check_pixel_options
from qwenvl_core.models.processing import EncodedConversation, EncodedPrompt, VisionInputs

# The image-span structure: never labelled, never generated (v1's <img>, </img>, <imgpad>).
IMAGE_STRUCTURE_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>")
_V1_MARKUP = ("<ref>", "<box>")


class HFVLProcessor:
    """Conversations in, ``input_ids`` + ``VisionInputs`` (``pixel_values`` [P, D], ``image_grid_thw`` [N, 3]) out,
    for one model directory of a transformers-native family (see the module docstring)."""

    def __init__(self, spec: FamilySpec, hf_processor: Any, image_limits: ImageLimits = DEFAULT_IMAGE_LIMITS) -> None:
        self.spec, self.hf = spec, hf_processor
        self.tokenizer, self.image_processor = hf_processor.tokenizer, hf_processor.image_processor
        self.image_limits = image_limits
        self.resize_rule = ResizeRule.from_image_processor(self.image_processor)
        self.codec: GroundingCodec = codec_for(spec.name.value, self.resize_rule)
        backend = self.tokenizer.backend_tokenizer
        self._chat = ChatEncoder(spec, backend)
        self._backend = backend
        self._vocab = backend.get_vocab_size(with_added_tokens=True)
        ids = {token.content: backend.token_to_id(token.content) for token in spec.special_tokens}
        self._image_token_ids = tuple(ids[t] for t in IMAGE_STRUCTURE_TOKENS)
        # Decoding drops the special tokens (turn and image structure), except the grounding markup.
        self._dropped = frozenset(ids[t.content] for t in spec.special_tokens
                                  if t.special and t.content not in spec.markup_tokens)
        self._merge = int(self.image_processor.merge_size)

    # ----- encoding ---------------------------------------------------------------------------------------------
    def encode_conversation(
        self, messages: Sequence[Message], add_generation_prompt: bool = False,
        base_dir: str | Path | None = None,
    ) -> EncodedConversation:
        """Ids turn by turn; each image's span length from its header (``base_dir``: relative paths); the dataset's
        v1 grounding markup in the family's convention."""
        images = [part for message in messages for part in message.images]
        sizes = [image_size(part.source, base_dir=base_dir, limits=self.image_limits) for part in images]
        messages = self._grounding_in_convention(messages, sizes)
        return self._chat.encode(messages, [self.image_tokens(size) for size in sizes], add_generation_prompt)

    def encode_chat(
        self, messages: Sequence[Message], add_generation_prompt: bool = True,
        base_dir: str | Path | None = None,
    ) -> EncodedPrompt:
        """``encode_conversation``'s ids and the images' vision inputs (by default prompting the assistant)."""
        encoded = self.encode_conversation(messages, add_generation_prompt, base_dir)
        return EncodedPrompt(encoded.input_ids, self.vision_inputs(encoded.images, base_dir), encoded.images)

    def image_tokens(self, size: tuple[int, int]) -> int:
        """The ``<|image_pad|>`` tokens of an image of ``(width, height)``: its merged patches after the resize."""
        width, height = self.resize_rule.resized(size)
        factor = self.resize_rule.factor
        return (width // factor) * (height // factor)

    def vision_inputs(self, images: Sequence[ImagePart], base_dir: str | Path | None = None
                      ) -> VisionInputs | None:
        """The images loaded under ``image_limits`` and preprocessed by transformers' image processor, in order;
        their grids are checked against the span lengths ``encode_conversation`` counted."""
        if not images:
            return None
        loaded = [load_image(part.source, base_dir=base_dir, limits=self.image_limits) for part in images]
        expected = [self.image_tokens(image.size) for image in loaded]
        try:
            out = self.image_processor(images=loaded, return_tensors="pt")
        except ValueError as exc:
            raise ImageError(f"the {self.spec.name.value} image processor refused an image: {exc}") from None
        grid = out["image_grid_thw"]
        merged = (grid.prod(dim=-1) // self._merge ** 2).tolist()
        if merged != expected:
            raise QwenVLError(f"the image processor's grids {grid.tolist()} make {merged} image tokens, but the "
                              f"encoding counted {expected} for images of {[i.size for i in loaded]}")
        return VisionInputs({"pixel_values": out["pixel_values"], "image_grid_thw": grid}, len(images))

    def _grounding_in_convention(self, messages: Sequence[Message], sizes: Sequence[tuple[int, int]]
                                 ) -> Sequence[Message]:
        """Text parts with v1 markup rewritten for the image they refer to: the last image before them in the
        conversation, else the first image (no image: left as they are, for validation to report)."""
        if not sizes or not any(m in p.text for msg in messages for p in msg.parts if isinstance(p, TextPart)
                                for m in _V1_MARKUP):
            return messages
        out, seen = [], 0
        for message in messages:
            parts = []
            for part in message.parts:
                if isinstance(part, ImagePart):
                    seen += 1
                elif any(m in part.text for m in _V1_MARKUP):
                    part = TextPart(self.codec.from_v1_markup(part.text, sizes[max(seen - 1, 0)]))
                parts.append(part)
            out.append(Message(message.role, parts, message.trainable))
        return out

    # ----- the rest of the protocol -----------------------------------------------------------------------------
    @property
    def pad_token_id(self) -> int:
        """``<|endoftext|>``, the tokenizer's pad token."""
        return int(self.tokenizer.pad_token_id)

    @property
    def image_token_ids(self) -> tuple[int, ...]:
        """``<|vision_start|>``, ``<|vision_end|>``, ``<|image_pad|>``, ``<|video_pad|>``, ``<|vision_pad|>``."""
        return self._image_token_ids

    def count_text_tokens(self, text: str) -> int:
        return len(self._chat.text.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` without turn / image structure and ids beyond the tokenizer (the model's padded vocabulary
        rows), the family's grounding markup kept (Qwen2-VL's box tokens are special tokens)."""
        kept = [int(i) for i in ids if int(i) not in self._dropped and 0 <= int(i) < self._vocab]
        return self._backend.decode(kept, skip_special_tokens=False)

    def parse_boxes(self, text: str, image_size: tuple[int, int]) -> list[PixelObject]:
        """Boxes of model output ``text`` in pixels of the original image of ``(width, height)``."""
        return self.codec.parse(text, image_size)


@functools.cache
def _image_only_class(processor_class: type) -> type:
    """``processor_class`` that works without a video processor (same name, same behaviour otherwise)."""
    return type(processor_class.__name__, (_ImageOnly, processor_class), {"__module__": __name__})


class _ImageOnly:
    """Mixin for a transformers processor class: accept ``video_processor=None`` (no torchvision)."""

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)  # type: ignore[misc]


def load_processor(spec: FamilySpec, model_dir: str | Path, options: ProcessorOptions | None = None,
                   image_limits: ImageLimits = DEFAULT_IMAGE_LIMITS) -> HFVLProcessor:
    """The ``FamilyProcessor`` of ``model_dir`` with the job's ``options`` (``PixelOptionsError`` naming the option
    the model cannot take)."""
    return HFVLProcessor(spec, load_hf_processor(spec, model_dir, options), image_limits)


def load_hf_processor(spec: FamilySpec, model_dir: str | Path, options: ProcessorOptions | None = None) -> Any:
    """The family's transformers processor for ``model_dir``, from local files only, its image processor with
    ``options``' pixel budget."""
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.utils import is_torchvision_available

    directory = Path(model_dir)
    if not directory.is_dir():
        raise ModelLoadError(f"{directory}: not a directory")
    options = options or ProcessorOptions()
    budget = check_pixel_options(directory, options, f"model {directory}")
    if budget is None:
        raise ModelLoadError(f"{directory}: no preprocessor_config.json (the image processor's settings)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
        image_processor = AutoImageProcessor.from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=False, backend="pil",
            **options.set_fields(),
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
    if ResizeRule.from_image_processor(image_processor) != budget:  # one rule for the API's check and the job
        raise ConfigError(f"{directory}: transformers reads the pixel budget of preprocessor_config.json as "
                          f"{ResizeRule.from_image_processor(image_processor)}, not {budget}")
    chat_template = read_chat_template(directory) or tokenizer.chat_template
    return processor_class(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        chat_template=chat_template,
    )
