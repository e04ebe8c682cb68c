"""The family processor interface: what data, training, evaluation and serving need from a model family's
processor, and the types it returns.

Every model family's processor (``ModelFamily.load_processor(model_dir)``) implements ``FamilyProcessor``; the
callers (``qwenvl_core.data``, ``.training``, ``.generation``, ``.serving``, the CLI and the validation worker)
use only this protocol and these types, so a new family is one implementation of it and no caller branches on
the family. What differs between families stays behind it:

- the chat layout in token ids, turn by turn (``TurnTokens``: label masking needs the turn's pieces);
- how many tokens an image costs (v1: a fixed ``<img>`` + ``n_queries`` x ``<imgpad>`` + ``</img>``; the
  transformers families: ``<|vision_start|>`` + n x ``<|image_pad|>`` + ``<|vision_end|>``, n from the image's
  size, which is why encoding takes the ``base_dir`` that image paths are relative to);
- the vision tensors the model takes (``VisionInputs``: named tensors passed to the forward as keyword
  arguments; v1 ``pixel_values`` ``[N, 3, S, S]``, the transformers families ``pixel_values`` ``[P, D]`` +
  ``image_grid_thw`` ``[N, 3]``);
- the ids of the image-span structure (never trained, never generated), the pad id, decoding and grounding.

Image *loading* (sources, data URLs, limits) is family-independent: ``qwenvl_core.images``. A job's processor
settings (``ProcessorOptions``: ``min_pixels`` / ``max_pixels``) are passed to ``load_processor``; they live in the
torch-free ``qwenvl_core.models.pixel_budget`` (the API process checks job requests with it) and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from qwenvl_core.conversation import ImagePart, Message, Role
from qwenvl_core.errors import QwenVLError
from qwenvl_core.models.pixel_budget import ProcessorOptions

__all__ = ["EncodedConversation", "EncodedPrompt", "FamilyProcessor", "ProcessorOptions", "TurnTokens",
           "VisionInputs"]

if TYPE_CHECKING:
    from qwenvl_core.grounding import PixelObject
    from qwenvl_core.images import ImageLimits


@dataclass(frozen=True)
class VisionInputs:
    """The vision tensors of one or more images, named as the model's forward takes them.

    Every tensor's dim 0 runs over the images in order of appearance: one row per image (v1 ``pixel_values``
    ``[N, 3, S, S]``; ``image_grid_thw`` ``[N, 3]``) or each image's rows after the previous image's (the
    transformers families' ``pixel_values`` ``[P, D]``, P the patches of all images). So the inputs of several
    images, rows or samples concatenate key by key along dim 0 (``concat``), in the order the model's image spans
    appear (batch row by row, left to right): the forward contract of ``docs/architecture.md``.
    """

    tensors: Mapping[str, torch.Tensor]
    n_images: int
    """How many images the tensors hold (not always ``len(pixel_values)``: patches are rows too)."""

    def __post_init__(self) -> None:
        if self.n_images < 1 or not self.tensors:
            raise QwenVLError(f"VisionInputs needs at least one image and one tensor, got {self.n_images} images "
                              f"and tensors {sorted(self.tensors)}")

    @property
    def pixel_values(self) -> torch.Tensor:
        """The ``pixel_values`` tensor (every family has one; v1's feature cache keys on its rows)."""
        return self.tensors["pixel_values"]

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        """The tensors as keyword arguments of the model's forward: ``model(input_ids, **vision.as_kwargs())``."""
        return dict(self.tensors)

    def to(self, device: torch.device | str) -> VisionInputs:
        """The same inputs on ``device``."""
        return VisionInputs({k: t.to(device) for k, t in self.tensors.items()}, self.n_images)

    @staticmethod
    def concat(parts: Iterable[VisionInputs | None]) -> VisionInputs | None:
        """The inputs of ``parts`` one after the other (key by key along dim 0; ``None`` parts are rows without
        images); ``None`` when no part has an image. Always new tensors, never views of a part's."""
        items = [p for p in parts if p is not None]
        if not items:
            return None
        keys = list(items[0].tensors)
        for item in items[1:]:
            if list(item.tensors) != keys:
                raise QwenVLError(f"cannot concatenate vision inputs with tensors {keys} and {list(item.tensors)}")
        return VisionInputs({k: torch.cat([i.tensors[k] for i in items]) for k in keys},
                            sum(i.n_images for i in items))


@dataclass(frozen=True)
class TurnTokens:
    """The ids of one turn, split so that the data pipeline can mask labels piece by piece."""

    role: Role
    header_ids: list[int]  # <|im_start|> + role + "\n"
    content_ids: list[int]  # the content, image spans included
    footer_ids: list[int]  # <|im_end|> + "\n"
    images: list[ImagePart]  # this turn's images, in order
    trainable: bool = True  # Message.trainable (False: an assistant turn without loss)

    @property
    def ids(self) -> list[int]:
        return self.header_ids + self.content_ids + self.footer_ids


@dataclass(frozen=True)
class EncodedConversation:
    """A whole conversation: ``input_ids`` = the turns' ids in order + ``generation_ids``."""

    input_ids: list[int]
    turns: list[TurnTokens]
    images: list[ImagePart]  # all images in order of appearance (= order of image spans)
    generation_ids: list[int] = field(default_factory=list)  # <|im_start|>assistant\n, when asked for


@dataclass(frozen=True)
class EncodedPrompt:
    """Model inputs for one conversation: ids with image spans, and the images' vision inputs in span order."""

    input_ids: list[int]
    vision: VisionInputs | None  # None without images
    images: list[ImagePart] = field(default_factory=list)

    @property
    def pixel_values(self) -> torch.Tensor | None:
        """``vision``'s ``pixel_values`` (None without images); pass ``vision`` to a model, not this alone."""
        return None if self.vision is None else self.vision.pixel_values


@runtime_checkable
class FamilyProcessor(Protocol):
    """What callers need from a family's processor (tokenizer + images + chat layout of one model directory)."""

    image_limits: ImageLimits
    """Limits checked before an image is decoded; serving derives its per-request limits from them."""

    @property
    def pad_token_id(self) -> int:
        """The id that pads batches (collation, left-padded generation); never attended to, never trained."""
        ...

    @property
    def image_token_ids(self) -> tuple[int, ...]:
        """The ids of image-span structure (v1 ``<img>``, ``</img>``, ``<imgpad>``). They never carry a label,
        generation never emits them (``SamplingParams.suppress_token_ids``: a generated span has no pixels), and
        ``input_ids.count`` of them is the tokens a sample's images cost."""
        ...

    def encode_conversation(
        self, messages: Sequence[Message], add_generation_prompt: bool = False,
        base_dir: str | Path | None = None,
    ) -> EncodedConversation:
        """Token ids of ``messages`` turn by turn, image spans included, without loading pixels (families whose
        spans depend on the image's size read its header; relative paths resolve against ``base_dir``).
        ``PromptError`` for a malformed conversation."""
        ...

    def encode_chat(
        self, messages: Sequence[Message], add_generation_prompt: bool = True,
        base_dir: str | Path | None = None,
    ) -> EncodedPrompt:
        """``encode_conversation``'s ids plus the images' ``VisionInputs`` (by default prompting the assistant)."""
        ...

    def vision_inputs(self, images: Sequence[ImagePart], base_dir: str | Path | None = None
                      ) -> VisionInputs | None:
        """Load (under ``image_limits``) and preprocess ``images`` in order; None for no images. Image *k*'s
        inputs fill the *k*-th image span of ``encode_conversation`` for the same images."""
        ...

    def count_text_tokens(self, text: str) -> int:
        """Tokens of ``text`` as message content (evaluation's bound on a reference answer's length)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Generated ids as text with the family's grounding markup kept (other special ids dropped): what
        serving returns and evaluation parses boxes from."""
        ...

    def parse_boxes(self, text: str, image_size: tuple[int, int]) -> list[PixelObject]:
        """The boxes of model output ``text`` in pixels of an image of ``(width, height)``."""
        ...
