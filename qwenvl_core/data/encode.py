"""SFT encoding of samples: token ids turn by turn (the family processor's ``encode_conversation``), labels, the
length policy and the images' vision inputs. Only the ``FamilyProcessor`` protocol is used.

Token layout (the processor's; for Qwen-VL v1 identical to the official ``finetune.py`` ``preprocess``): a system
turn first (the sample's own system message, else the processor's system prompt, "You are a helpful assistant." by
default), then every turn as ``[<|im_start|>] + enc(role) + enc("\\n") | content | [<|im_end|>] + enc("\\n")``; v1
writes an image in the content as ``Picture k: `` + ``<img>`` + n_queries x ``<imgpad>`` + ``</img>`` + ``\\n``. v1
encodes content text as in serving (``chat.encode_turn``, the official ``make_context`` rule): ``<ref>`` / ``<box>``
/ ``<quad>`` tags become their ids, but ``<|im_start|>``, ``<|im_end|>`` and other special surface forms in a
sample's text stay plain text (the official ``finetune.py`` would parse them, letting a sample's text forge turns
and their labels).

Labels are aligned with ``input_ids`` (the model shifts them: position t is trained to predict label t+1);
-100 means "no loss". Two masks:

``LabelMask.OFFICIAL`` (default), exactly the official script:
  - system and user turns: loss only on ``<|im_start|>``, ``<|im_end|>`` and the ``\\n`` after it; the role
    name, its ``\\n`` and the whole content (text, ``Picture k:``, image spans) are -100;
  - assistant turns: loss on ``<|im_start|>``, the content, ``<|im_end|>`` and the ``\\n`` after it; the role
    name ``assistant`` and its ``\\n`` are -100.
``LabelMask.ASSISTANT_ONLY``: loss only on the content and ``<|im_end|>`` of assistant turns (not on
  ``<|im_start|>``, role names, the ``\\n`` after ``<|im_end|>``, nor anything in system/user turns).

With either mask: an assistant turn with ``weight: 0`` (``Message.trainable`` False) has every label -100, and
image tokens (``processor.image_token_ids``; v1 ``<img>``, ``<imgpad>``, ``</img>``) never carry loss.

Length policy (``max_length``): ``REJECT`` refuses a longer sample; ``TRUNCATE`` keeps the longest prefix of
whole turns that ends with an assistant turn, contains a trainable assistant turn and fits, so a cut never
falls inside a turn, let alone inside an image span (the official script cuts at ``max_len`` tokens anywhere).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from qwenvl_core.conversation import ImagePart
from qwenvl_core.data.formats import Sample
from qwenvl_core.data.issues import DataError
from qwenvl_core.errors import QwenVLError
from qwenvl_core.models.processing import FamilyProcessor, TurnTokens, VisionInputs
from qwenvl_core.specs import LengthPolicy, LossMask

IGNORE_INDEX = -100


# The job spec owns these choices; the data layer uses the same enums (one constant per concept).
LabelMask = LossMask

class LengthError(DataError):
    """A sample does not fit ``max_length`` under the length policy."""


@dataclass(frozen=True)
class EncodeOptions:
    """How samples become training rows."""

    mask: LabelMask = LabelMask.OFFICIAL
    max_length: int | None = None
    length_policy: LengthPolicy = LengthPolicy.REJECT


@dataclass
class TokenizedSample:
    """Ids and labels of one sample (no pixels yet), after the length policy; ``image_tokens``: how many of the
    ids are image-span tokens (``processor.image_token_ids``)."""

    input_ids: list[int]
    labels: list[int]
    images: list[ImagePart]
    image_tokens: int
    turns_kept: int
    turns_total: int

    @property
    def truncated(self) -> bool:
        return self.turns_kept < self.turns_total

    @property
    def supervised_tokens(self) -> int:
        """Positions whose label is trained (the first label is never a target after the shift)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


@dataclass
class EncodedSample:
    """One training row: ids, labels and the vision inputs of its images in span order."""

    input_ids: list[int]
    labels: list[int]
    vision: VisionInputs | None  # None without images
    sample_id: str = ""
    image_sources: list[ImagePart] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def pixel_values(self) -> torch.Tensor | None:
        """``vision``'s ``pixel_values`` (None without images); models take all of ``vision``."""
        return None if self.vision is None else self.vision.pixel_values


def turn_labels(turn: TurnTokens, mask: LabelMask, image_token_ids: Collection[int]) -> list[int]:
    """The labels of one turn under ``mask`` (see the module docstring)."""
    trained = turn.role == "assistant" and turn.trainable
    header, footer = turn.header_ids, turn.footer_ids
    content = _content_labels(turn.content_ids, image_token_ids) if trained else [IGNORE_INDEX] * len(turn.content_ids)
    if mask is LabelMask.ASSISTANT_ONLY or (turn.role == "assistant" and not turn.trainable):
        if not trained:
            return [IGNORE_INDEX] * len(turn.ids)
        return [IGNORE_INDEX] * len(header) + content + [footer[0]] + [IGNORE_INDEX] * (len(footer) - 1)
    return [header[0]] + [IGNORE_INDEX] * (len(header) - 1) + content + list(footer)


def _content_labels(ids: list[int], image_token_ids: Collection[int]) -> list[int]:
    return [IGNORE_INDEX if i in image_token_ids else i for i in ids]


def kept_turns(turns: Sequence[TurnTokens], max_length: int | None, policy: LengthPolicy) -> int:
    """How many leading turns to keep under the length policy; ``LengthError`` if none can be kept."""
    lengths = [len(t.ids) for t in turns]
    total = sum(lengths)
    if max_length is None or total <= max_length:
        return len(turns)
    if policy is LengthPolicy.REJECT:
        raise LengthError(f"{total} tokens, more than the maximum length {max_length} (length policy: reject)")
    used, best, trainable = 0, 0, False
    for k, (turn, n) in enumerate(zip(turns, lengths, strict=True), 1):
        used += n
        if used > max_length:
            break
        trainable = trainable or (turn.role == "assistant" and turn.trainable)
        if turn.role == "assistant" and trainable:
            best = k
    if best == 0:
        raise LengthError(f"{total} tokens, more than the maximum length {max_length}, and no prefix of whole "
                          "turns ending with a trained assistant reply fits (length policy: truncate)")
    return best


def tokenize_sample(sample: Sample, processor: FamilyProcessor, options: EncodeOptions = EncodeOptions(),
                    base_dir: str | Path | None = None) -> TokenizedSample:
    """Ids and labels of ``sample`` under ``options``; ``LengthError`` / ``PromptError`` on bad samples.
    ``base_dir``: what relative image paths resolve against (families whose image spans depend on the size)."""
    conv = processor.encode_conversation(sample.messages, base_dir=base_dir)
    keep = kept_turns(conv.turns, options.max_length, options.length_policy)
    turns = conv.turns[:keep]
    ids = [i for t in turns for i in t.ids]
    image_ids = frozenset(processor.image_token_ids)
    labels = [label for t in turns for label in turn_labels(t, options.mask, image_ids)]
    images = [image for t in turns for image in t.images]
    image_tokens = sum(1 for i in ids if i in image_ids)
    return TokenizedSample(ids, labels, images, image_tokens, keep, len(conv.turns))


def encode_sample(sample: Sample, processor: FamilyProcessor, options: EncodeOptions = EncodeOptions(),
                  base_dir: str | Path | None = None) -> EncodedSample:
    """A training row for ``sample``: ids, labels and vision inputs. Errors name the sample's file and line."""
    try:
        tok = tokenize_sample(sample, processor, options, base_dir)
        vision = processor.vision_inputs(tok.images, base_dir=base_dir)
    except QwenVLError as e:
        raise DataError(f"{sample.location}: sample {sample.id!r}: {e}") from e
    return EncodedSample(tok.input_ids, tok.labels, vision, sample.id, tok.images)


class SFTDataset(Dataset[EncodedSample]):
    """A map-style dataset encoding samples on access (pixels are loaded lazily, per item)."""

    def __init__(self, samples: Sequence[Sample], processor: FamilyProcessor,
                 options: EncodeOptions = EncodeOptions()) -> None:
        self.samples, self.processor, self.options = list(samples), processor, options

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> EncodedSample:
        return encode_sample(self.samples[index], self.processor, self.options)

    def lengths(self) -> list[int]:
        """Token count of every sample (no pixels loaded), for length-grouped batching and packing."""
        return [len(tokenize_sample(s, self.processor, self.options).input_ids) for s in self.samples]
