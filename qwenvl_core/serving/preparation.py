"""A chat request made ready for the serving engine: checked, templated, tokenized, its images decoded and reduced
to model input. Needs the processor, never the model, so it can run in a process other than the engine's.

This module owns
- ``EngineRequest`` (one chat request as the engine sees it) and ``RequestError`` (a request refused, naming the
  field);
- ``RequestPreparer.prepare``: the checks in order of cost. First the number of images, each image's encoded size
  and their total (data URLs from their length). Then the prompt's token count (image spans have a fixed length,
  so no pixel is decoded for it) against ``max_total_tokens``, and the ``logit_bias`` token ids against the
  vocabulary. Only then are the images decoded (pixel limits from their headers) one at a time and preprocessed,
  so at most one full-size image is held. The result, a ``PreparedRequest``, holds no image source (a data URL
  can be megabytes) and pickles, pixel tensors included;
- ``chunk_plan``: where a long prompt's prefill chunks end (never inside an image span), and the image checks the
  API shares (``check_image_count``, ``check_image_bytes``, ``image_fields``).

Why apart from the engine: preparing is Python that holds the GIL much of the time (the chat template, the tokenizer,
image decoding and resizing: tens of ms for a photo). In the engine's process it holds up the model thread, which
takes the GIL back after every torch call; a replica whose engine runs in a child process (``engine_process``)
prepares in its own process instead (docs/benchmarks.md, "Preparing requests beside the model thread").
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from qwenvl_core.conversation import ImagePart, Message
from qwenvl_core.errors import ImageError, QwenVLError
from qwenvl_core.generation import SamplingParams
from qwenvl_core.images import encoded_size, load_image
from qwenvl_core.models.processing import FamilyProcessor, VisionInputs
from qwenvl_core.vocabulary import vocabulary

if TYPE_CHECKING:
    from qwenvl_core.models.registry import ModelFamily
    from qwenvl_core.serving.engine import EngineConfig


class RequestError(QwenVLError):
    """A request the engine (or the API in front of it) refuses; ``param`` names the field, ``code`` the reason."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code

    def __reduce__(self) -> tuple[Any, ...]:  # keeps param and code across processes (Ray Serve replicas)
        return type(self), (str(self), self.param, self.code)


@dataclass
class EngineRequest:
    """One chat request as the engine sees it (already authorised and resolved by the caller)."""

    messages: list[Message]
    params: SamplingParams = SamplingParams(max_new_tokens=256)
    adapter_id: str | None = None
    adapter_locator: str | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # True when the client set no output limit (OpenAI: the output may run to the end of the context):
    # ``params.max_new_tokens`` is then the server's default, cut to what ``max_total_tokens`` leaves after the
    # prompt instead of refusing a long prompt for an output size the client never asked for.
    default_max_tokens: bool = False
    # False: the caller wants the whole answer only (a completion that is not streamed to its client), so what
    # carries the events to it may send them as one (a Serve replica does).
    streamed: bool = True


@dataclass
class PreparedRequest:
    """What the engine needs of a request once prepared: ``request`` without its messages (the prompt is in
    ``prompt_ids``, the images in ``images``), ``params`` with the output limit fitted and the family's stop and
    image ids added, each image's model input and ``(width, height)``, and the prompt's prefill chunks."""

    request: EngineRequest
    params: SamplingParams
    prompt_ids: list[int]
    images: list[VisionInputs]
    image_sizes: list[tuple[int, int]]
    chunks: list[tuple[int, int, int, int]]


class RequestPreparer:
    """Prepares requests for an engine serving ``processor``'s model under ``config`` (its limits, its prefill
    chunk size: the resolved config, whose device-dependent defaults are filled in). ``pixel_dtype``: the dtype the
    model's vision tower takes pixels in (``vision_input_dtype``), which every family's vision forward casts them to
    first; pixels made in it give the same features and take half the memory (and bytes to send) where it is bf16.
    None: the processor's float32."""

    def __init__(self, processor: FamilyProcessor, family: ModelFamily, config: EngineConfig,
                 pixel_dtype: torch.dtype | None = None) -> None:
        self.processor, self.config, self.pixel_dtype = processor, config, pixel_dtype
        self.stop_ids = tuple(family.stop_token_ids(processor))
        self.image_limits = dataclasses.replace(processor.image_limits, max_bytes=config.max_image_bytes)

    def prepare(self, request: EngineRequest) -> PreparedRequest:
        """Checks in order of cost (see the module docstring), then decoding; ``RequestError`` names what is
        refused."""
        images = image_fields(request.messages)
        self.check_images(images)
        encoded = self.processor.encode_conversation(request.messages, add_generation_prompt=True)  # no pixels
        params = request.params
        room = self.config.max_total_tokens - len(encoded.input_ids)
        if request.default_max_tokens and 0 < room < params.max_new_tokens:
            params = dataclasses.replace(params, max_new_tokens=room)
        self.check_tokens(len(encoded.input_ids), params.max_new_tokens, request.default_max_tokens)
        self.check_bias(params.logit_bias)
        parts, sizes = self.load_images(images)
        chunks = chunk_plan(encoded.input_ids, self.config.prefill_chunk_tokens, self.processor.image_token_ids)
        params = dataclasses.replace(params, stop_token_ids=tuple({*params.stop_token_ids, *self.stop_ids}),
                                     suppress_token_ids=tuple({*params.suppress_token_ids,
                                                               *self.processor.image_token_ids}))
        return PreparedRequest(dataclasses.replace(request, messages=[]), params, encoded.input_ids, parts, sizes,
                               chunks)

    def check_images(self, images: Sequence[tuple[str, ImagePart]]) -> None:
        """Image count, each image's encoded size and the request's total: all known without decoding."""
        config = self.config
        check_image_count([name for name, _ in images], config.max_images_per_request)
        check_image_bytes(((name, encoded_size(part.source)) for name, part in images), config.max_image_bytes,
                          config.max_image_bytes_total)

    def check_tokens(self, prompt_tokens: int, max_new_tokens: int, default: bool = False) -> None:
        limit = self.config.max_total_tokens
        if default and prompt_tokens >= limit:
            raise RequestError(f"the prompt ({prompt_tokens} tokens) leaves no room for output in the limit of {limit} "
                               "tokens", "messages", "context_length_exceeded")
        if prompt_tokens + max_new_tokens > limit:
            raise RequestError(f"prompt ({prompt_tokens} tokens) + max_tokens ({max_new_tokens}) exceeds the limit of "
                               f"{limit} tokens", "messages" if prompt_tokens >= limit else "max_tokens",
                               "context_length_exceeded")

    def check_bias(self, bias: Sequence[tuple[int, float]]) -> None:
        """Every ``logit_bias`` token id must be one of the tokenizer's (a bias on an id the model was never trained
        to emit, or beyond its logits, is a mistake, not a request)."""
        size = len(vocabulary(self.processor)) if bias else 0
        outside = sorted(token for token, _ in bias if token >= size)
        if outside:
            raise RequestError(f"logit_bias: token id {outside[0]} is not in the model's vocabulary (ids 0 to "
                               f"{size - 1})", "logit_bias", "invalid_value")

    def load_images(self, images: Sequence[tuple[str, ImagePart]]) -> tuple[list[VisionInputs], list[tuple[int, int]]]:
        """Decode the images one at a time (pixel limits from the header first) and reduce each to model input
        at once, so at most one full-size image is held; their sizes are kept for grounding."""
        inputs, sizes = [], []
        for param, part in images:
            try:
                image = load_image(part.source, limits=self.image_limits)
            except ImageError as exc:
                raise RequestError(f"{param}: {exc}", param, "invalid_image") from exc
            sizes.append(image.size)
            vision = self.processor.vision_inputs([ImagePart(image)])
            del image
            if self.pixel_dtype is not None:
                vision = VisionInputs({k: t.to(self.pixel_dtype) if t.is_floating_point() else t
                                       for k, t in vision.tensors.items()}, vision.n_images)
            inputs.append(vision)
        return inputs, sizes


def vision_input_dtype(model: torch.nn.Module, family: ModelFamily) -> torch.dtype | None:
    """The dtype ``model``'s vision tower takes pixels in: its parameters' one floating dtype (v1 casts the pixels to
    its ``conv1`` weight's, transformers' families to ``visual.dtype``, the first parameter's); None when they have
    several."""
    kinds = {p.dtype for p in family.vision_tower(model).parameters() if p.is_floating_point()}
    return kinds.pop() if len(kinds) == 1 else None


def chunk_plan(ids: Sequence[int], chunk_tokens: int, image_ids: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """``(start, end, first image, images)`` of each prefill chunk of a prompt: about ``chunk_tokens`` tokens each,
    never ending inside an image span (a run of ``image_ids``, whose first id opens a span), so each chunk carries
    whole images. One chunk when the prompt is short or ``chunk_tokens`` is 0."""
    if not chunk_tokens or len(ids) <= chunk_tokens:
        return [(0, len(ids), 0, sum(1 for t in ids if t == image_ids[0]))]
    image_set, opener = set(image_ids), image_ids[0]
    chunks, start, image = [], 0, 0
    while start < len(ids):
        end = min(start + chunk_tokens, len(ids))
        while end < len(ids) and ids[end] in image_set and ids[end - 1] in image_set:
            end += 1  # do not split an image span
        count = sum(1 for t in ids[start:end] if t == opener)
        chunks.append((start, end, image, count))
        start, image = end, image + count
    return chunks


def check_image_count(fields: Sequence[str], limit: int) -> None:
    """Refuse more than ``limit`` images; ``fields`` name each image's request field, in order."""
    if len(fields) > limit:
        raise RequestError(f"{len(fields)} images in one request; the limit is {limit}", fields[limit],
                           "too_many_images")


def check_image_bytes(sizes: Iterable[tuple[str, int]], max_bytes: int, max_total: int) -> int:
    """Refuse an image over ``max_bytes`` or images over ``max_total`` together; ``sizes`` are (field, encoded
    bytes), consumed lazily so a caller can look sizes up one by one and stop at the first refusal. The total."""
    total = 0
    for field_name, size in sizes:
        if size > max_bytes:
            raise RequestError(f"{field_name}: the image has {size} bytes; the limit is {max_bytes} bytes per image",
                               field_name, "image_too_large")
        total += size
        if total > max_total:
            raise RequestError(f"{field_name}: the images up to here hold {total} bytes; the limit is {max_total} "
                               "bytes per request", field_name, "images_too_large")
    return total


def image_fields(messages: Sequence[Message]) -> list[tuple[str, ImagePart]]:
    """Every image part with the request field it came from (``messages[i].content[j]``), in prompt order."""
    return [(f"messages[{m}].content[{p}]", part) for m, message in enumerate(messages)
            for p, part in enumerate(message.parts) if isinstance(part, ImagePart)]
