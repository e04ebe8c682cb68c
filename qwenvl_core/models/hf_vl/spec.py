"""The data a transformers-native Qwen VL family supplies: ``FamilySpec``, its ``Preset``s and special tokens.

A family sub-package (``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``) builds one ``FamilySpec``; everything that acts
on it lives in the other modules of ``hf_vl``. Class names are strings resolved in the ``transformers`` namespace
on use, so building a spec imports nothing heavy.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qwenvl_core.autotune import TrainingDefaults
from qwenvl_core.models.registry import FamilyName

# Offsets of the vision tokens after <|endoftext|> (the first special token) in every Qwen2/2.5/3-VL tokenizer.
VISION_START_OFFSET = 9


@dataclass(frozen=True)
class SpecialToken:
    """One added token of the official tokenizer: its text and whether it is ``special`` (skipped on decode)."""

    content: str
    special: bool = True


@dataclass(frozen=True)
class Preset:
    """A named config: the official ``config.json`` fields, the published parameter count and their source.

    ``config`` uses the field names of the official ``config.json`` (flat for Qwen2/2.5-VL, with ``text_config``
    for Qwen3-VL). ``image_processor`` overrides fields of the family's ``preprocessor_config.json``.
    """

    description: str
    config: Mapping[str, Any]
    published_params: float | None = None
    source: str = ""
    image_processor: Mapping[str, Any] = field(default_factory=dict)
    # Training defaults written next to the weights (training_defaults.json, read by `auto` hyperparameters:
    # qwenvl_core.autotune); None: the family's defaults apply (official checkpoints).
    training: TrainingDefaults | None = None
    # Shipped pretrained weights (``qwenvl_core.models.shipped``): ``materialize`` copies them, nothing is drawn.
    weights: str | None = None


def tiny_pretraining_presets(family: str, tiny: Preset, lm_config: str | None = None,
                             shipped: bool = True) -> dict[str, Preset]:
    """The tiny pretraining recipe's presets of ``family`` (``qwenvl_core.pretrain.families``).

    ``<family>-tiny-v2``: ``tiny``'s shapes with init std 0.1 in the LM (its sub-config ``lm_config``, None: the
    top level) and the ViT -- the recipe's starting point (as qwen-vl-tiny-v2 is v1's: at 0.02 the tiny tower learns
    no shape or place). With ``shipped``, ``<family>-tiny-seeing``: that model after the recipe, its weights shipped
    in ``qwenvl_core/assets/`` (built by ``python -m qwenvl_core.pretrain.ship --family <family>``; its
    training_defaults.json is ``autotune.PRETRAINED_TINY_FAMILIES[family]``), the local stack's base of the family;
    ``materialize`` copies its files.
    """
    config = {**tiny.config, "vision_config": {**tiny.config["vision_config"], "initializer_range": 0.1}}
    if lm_config is None:
        config["initializer_range"] = 0.1
    else:
        config[lm_config] = {**config[lm_config], "initializer_range": 0.1}
    presets = {f"{family}-tiny-v2": Preset(
        f"{family}-tiny's shapes with init std 0.1, the starting point of the tiny pretraining recipe", config,
        image_processor=tiny.image_processor)}
    if shipped:
        presets[f"{family}-tiny-seeing"] = Preset(
            f"{family}-tiny-v2 pretrained on rendered image-text data (shapes, colours, places, counts, glyphs, "
            f"boxes): shipped weights, the local stack's {family} base", config, image_processor=tiny.image_processor,
            weights=f"{family}-tiny-seeing")
    return presets


@dataclass(frozen=True)
class FamilySpec:
    """Everything that differs between the transformers-native Qwen VL families."""

    name: FamilyName
    model_type: str
    model_class: str
    config_class: str
    processor_class: str
    presets: Mapping[str, Preset]
    special_tokens: tuple[SpecialToken, ...]
    chat_template: str
    image_processor: Mapping[str, Any]
    video_processor: Mapping[str, Any] | None
    model_max_length: int
    lora_targets: tuple[str, ...]
    # Parameter-name prefixes of the vision-language merger ("aligner" / projector), inside the vision prefix.
    adapter_prefixes: tuple[str, ...]
    vision_prefix: str = "model.visual."
    # The chat template as data (``hf_vl.chat``): the system turn it gives a conversation without one (None: none),
    # and the roles whose image parts it renders (it drops the others' silently: ``hf_vl.chat`` refuses them).
    default_system_prompt: str | None = None
    image_roles: tuple[str, ...] = ("user",)
    # Special tokens of the family's grounding convention: message text writes them as markup, encoded as their ids
    # (every other special token's surface form in a message stays plain text).
    markup_tokens: tuple[str, ...] = ()

    def transformers_class(self, attribute: str) -> Any:
        """The transformers class named by ``model_class`` / ``config_class`` / ``processor_class``."""
        return getattr(importlib.import_module("transformers"), getattr(self, attribute))

    def special_token_ids(self, n_ordinary: int) -> dict[str, int]:
        """Every special token's id in a tokenizer with ``n_ordinary`` ordinary (BPE) tokens."""
        return {token.content: n_ordinary + i for i, token in enumerate(self.special_tokens)}


def config_token_ids(n_ordinary: int) -> dict[str, int]:
    """The ``config.json`` token-id fields for a tokenizer with ``n_ordinary`` ordinary tokens (151,643 officially).

    The first 14 special tokens are the same, in the same order, in Qwen2-VL, Qwen2.5-VL and Qwen3-VL:
    ``<|endoftext|>`` ``<|im_start|>`` ``<|im_end|>`` ... ``<|vision_start|>`` (+9) ``<|vision_end|>``
    ``<|vision_pad|>`` ``<|image_pad|>`` ``<|video_pad|>``.
    """
    start = n_ordinary + VISION_START_OFFSET
    return {
        "bos_token_id": n_ordinary,
        "eos_token_id": n_ordinary + 2,
        "vision_start_token_id": start,
        "vision_end_token_id": start + 1,
        "vision_token_id": start + 2,
        "image_token_id": start + 3,
        "video_token_id": start + 4,
    }


# The special tokens of Qwen2-VL; Qwen2.5-VL and Qwen3-VL append to them (see their family modules).
QWEN2_VL_SPECIAL_TOKENS: tuple[SpecialToken, ...] = tuple(
    SpecialToken(text)
    for text in (
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|object_ref_start|>",
        "<|object_ref_end|>",
        "<|box_start|>",
        "<|box_end|>",
        "<|quad_start|>",
        "<|quad_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|vision_pad|>",
        "<|image_pad|>",
        "<|video_pad|>",
    )
)
