"""OpenAI chat-completions API for the serving engine: schemas, conversion, SSE chunks, the backend protocol.

This module owns
- the request / response schemas (pydantic) of ``POST /v1/chat/completions``: messages with ``text`` and
  ``image_url`` parts (several images per message), sampling fields (``temperature``, ``top_p``, ``top_k``,
  ``seed``, ``max_tokens`` / ``max_completion_tokens``, ``stop``), ``stream`` + ``stream_options``, ``usage``,
  and the extension field ``grounding`` on each choice: the boxes of the answer in pixels of each input image;
- converting a request into engine messages within ``ChatLimits``, cheapest checks first: the number of
  images on the parsed request, then each image's size and their total (``data:`` URLs from their length;
  any other reference, an uploaded file id or a storage path, through an ``ImageResolver`` the service passes
  in, which checks that the tenant owns it and returns its stored size without reading it), and only then are
  references read, never more than the per-image limit + 1 bytes. ``data:`` URLs are decoded by the engine,
  except large ones that the HTTP route took out of the body before parsing it (``inline_images``): their
  payloads are base64-decoded here, in slices;
- the sampling fields' limits (at most 4 stop strings of at most ``MAX_STOP_CHARS`` characters each);
- the ``ChatBackend`` protocol the HTTP route depends on, ``AdapterLocator`` / ``AdapterResolver`` (model id +
  tenant -> the adapter to load, or None), and ``InProcessBackend`` (engines in this process: local use, tests).
  The Ray Serve backend lives in ``workflows/serve_app.py``;
- formatting results as a ``chat.completion`` object or as ``chat.completion.chunk`` server-sent events.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from qwenvl_core.conversation import ImagePart, Message, Part, TextPart
from qwenvl_core.errors import ImageError, QwenVLError
from qwenvl_core.generation import SamplingParams
from qwenvl_core.images import data_url_size
from qwenvl_core.serving.engine import (
    EngineEvent,
    EngineFault,
    EngineRequest,
    EngineStopped,
    ImageBoxes,
    RequestError,
    ServingEngine,
    check_image_bytes,
    check_image_count,
)
from qwenvl_core.serving.inline_images import InlineImages
from qwenvl_core.serving.metrics import merge_expositions

DEFAULT_MAX_TOKENS = 256
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
# Below this a temperature is greedy decoding (as vLLM does): dividing logits by it would overflow to inf / NaN.
MIN_SAMPLING_TEMPERATURE = 1e-5
MIB = 1 << 20


class ChatRequestError(RequestError):
    """A request the API refuses; ``param`` names the offending field, ``code`` the reason."""


@dataclass(frozen=True)
class ChatLimits:
    """What one chat request may hold (OpenAI's per-image and per-request sizes by default)."""

    max_images: int = 16
    max_image_bytes: int = 20 * MIB  # one encoded image: a stored file, or a data URL's decoded payload
    max_image_bytes_total: int = 50 * MIB  # all images of the request together


DEFAULT_CHAT_LIMITS = ChatLimits()


@dataclass(frozen=True)
class StoredImage:
    """An image reference the tenant owns, resolved to its stored size; ``read(n)`` returns at most ``n`` bytes."""

    size: int
    read: Callable[[int], bytes]


# ----- request schemas ------------------------------------------------------------------------------------------
class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class TextContent(BaseModel):
    type: Literal["text"]
    text: str


class ImageContent(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextContent | ImageContent, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The OpenAI request body; ``top_k`` is an extension. Unknown fields are ignored, as OpenAI clients send some."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = None


# ----- response schemas -----------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GroundedBox(BaseModel):
    ref: str | None
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels


class ImageGrounding(BaseModel):
    image_index: int
    width: int
    height: int
    objects: list[GroundedBox]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    grounding: list[ImageGrounding] = Field(default_factory=list)


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


# ----- backend protocol -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterLocator:
    """Where an adapter model id's weights are, and which base model it was trained on."""

    adapter_id: str
    base_model: str
    uri: str  # local directory or s3://bucket/prefix of a PEFT adapter directory


# (model id, tenant id) -> the adapter, or None when it does not exist or belongs to another tenant.
AdapterResolver = Callable[[str, str], AdapterLocator | None]
# (image reference that is not a data URL, tenant id) -> the stored image (not read yet); raises if not allowed.
ImageResolver = Callable[[str, str], StoredImage]


class ChatBackend(Protocol):
    """What the chat route needs from whatever runs the engines (in process, or Ray Serve)."""

    def base_models(self) -> list[str]:
        """The base model ids served (each is also a valid ``model`` for every tenant)."""
        ...

    def stream(self, base_model: str, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        """Generate for ``request`` on ``base_model`` (with ``request.adapter_*`` applied)."""
        ...

    async def evict(self, base_model: str, adapter_id: str) -> None:
        """Drop a deleted adapter from the replicas' caches."""
        ...

    async def ready(self) -> bool:
        """Whether every base model can take requests."""
        ...

    async def metrics(self) -> bytes:
        """The serving metrics of every engine / replica, Prometheus text format (``GET /metrics``)."""
        ...


class InProcessBackend:
    """``ChatBackend`` over engines running in this process (one per base model)."""

    def __init__(self, engines: dict[str, ServingEngine]) -> None:
        self.engines = engines

    def base_models(self) -> list[str]:
        return list(self.engines)

    def stream(self, base_model: str, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        return self.engines[base_model].stream(request)

    async def evict(self, base_model: str, adapter_id: str) -> None:
        self.engines[base_model].evict_adapter(adapter_id)

    async def ready(self) -> bool:
        for engine in self.engines.values():
            engine.start()
        return all(engine.alive for engine in self.engines.values())

    async def metrics(self) -> bytes:
        return merge_expositions(({"base_model": base}, engine.metrics.exposition())
                                 for base, engine in self.engines.items() if engine.metrics is not None)


# ----- conversion -------------------------------------------------------------------------------------------------
def to_messages(request: ChatCompletionRequest, resolve_image: Callable[[str], StoredImage] | None,
                limits: ChatLimits = DEFAULT_CHAT_LIMITS, inline: InlineImages | None = None) -> list[Message]:
    """Engine messages within ``limits``, checked in the order of the module docstring: nothing is read before
    the count and every size passed. Blocking (references are looked up and read, ``inline`` payloads taken out
    of the body by ``split_inline_images`` are decoded): call it off the event loop.
    """
    images = _image_urls(request)
    check_image_count([name for name, _ in images], limits.max_images)
    stored: dict[str, StoredImage] = {}
    inline = inline or InlineImages()

    def sizes(read: dict[str, bytes] | None = None) -> Iterator[tuple[str, int]]:
        for name, url in images:
            if url in inline:
                yield name, inline.size(url)
            elif url.startswith("data:"):
                yield name, data_url_size(url)
            elif read is not None:
                yield name, len(read[name])
            else:
                stored[name] = _locate(url, resolve_image, name)
                yield name, stored[name].size

    check_image_bytes(sizes(), limits.max_image_bytes, limits.max_image_bytes_total)
    read = {name: _read(image, name, limits.max_image_bytes) for name, image in stored.items()}
    check_image_bytes(sizes(read), limits.max_image_bytes, limits.max_image_bytes_total)  # objects may have grown
    read.update((name, _decode_inline(inline, url, name, limits.max_image_bytes)) for name, url in images
                if url in inline)
    return [_message(m_index, message, read) for m_index, message in enumerate(request.messages)]


def _field(m_index: int, p_index: int) -> str:
    return f"messages[{m_index}].content[{p_index}]"


def _image_urls(request: ChatCompletionRequest) -> list[tuple[str, str]]:
    """(field, url) of every image part, in order; images are accepted in user messages only."""
    urls = []
    for m_index, message in enumerate(request.messages):
        if not isinstance(message.content, list):
            continue
        for p_index, part in enumerate(message.content):
            if isinstance(part, ImageContent):
                if message.role != "user":
                    raise ChatRequestError("images are only accepted in user messages", f"messages[{m_index}].content")
                urls.append((_field(m_index, p_index), part.image_url.url))
    return urls


def _locate(url: str, resolve: Callable[[str], StoredImage] | None, name: str) -> StoredImage:
    if url.startswith(("http://", "https://")):
        raise ChatRequestError("remote image URLs are not fetched; send a data URL or an uploaded file id", name)
    if resolve is None:
        raise ChatRequestError("only data: image URLs are accepted here", name)
    return resolve(url)


def _read(image: StoredImage, name: str, limit: int) -> bytes:
    data = image.read(limit + 1)
    if len(data) > limit:
        raise ChatRequestError(f"{name}: the image has more than {limit} bytes; the limit is {limit} bytes per image",
                               name, "image_too_large")
    return data


def _decode_inline(inline: InlineImages, url: str, name: str, limit: int) -> bytes:
    try:
        return inline.decode(url, limit)
    except ImageError as exc:
        raise ChatRequestError(f"{name}: {exc}", name, "invalid_image") from exc


def _message(m_index: int, message: ChatMessage, read: dict[str, bytes]) -> Message:
    content = message.content
    if content is None or isinstance(content, str):
        return Message(role=message.role, parts=[TextPart(content or "")])
    parts: list[Part] = []
    for p_index, part in enumerate(content):
        if isinstance(part, TextContent):
            parts.append(TextPart(part.text))
        else:
            name = _field(m_index, p_index)
            parts.append(ImagePart(read[name] if name in read else part.image_url.url))
    return Message(role=message.role, parts=parts)


def sampling_params(request: ChatCompletionRequest, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> SamplingParams:
    """OpenAI fields to ``SamplingParams`` (OpenAI defaults: temperature 1, top_p 1; temperature 0 = greedy)."""
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise ChatRequestError(f"stop: at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_CHARS} "
                               "characters each", "stop", "invalid_value")
    temperature = 1.0 if request.temperature is None else request.temperature
    return SamplingParams(
        max_new_tokens=request.max_completion_tokens or request.max_tokens or default_max_tokens,
        do_sample=temperature >= MIN_SAMPLING_TEMPERATURE,
        temperature=temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=request.top_k or 0,
        seed=request.seed,
        stop_strings=tuple(stops),
    )


def grounding_payload(boxes: list[ImageBoxes]) -> list[ImageGrounding]:
    return [
        ImageGrounding(image_index=b.image_index, width=b.width, height=b.height,
                       objects=[GroundedBox(ref=o.ref, box=o.box) for o in b.objects])
        for b in boxes
    ]


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


async def collect_completion(model: str, events: AsyncIterator[EngineEvent]) -> ChatCompletion:
    """Run a stream to the end and build the ``chat.completion`` object."""
    text, last = [], None
    async for event in events:
        text.append(event.text)
        last = event
    if last is None or last.finish_reason is None:
        raise EngineFault("generation ended without a final event")
    usage = Usage(prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens,
                  total_tokens=last.prompt_tokens + last.completion_tokens)
    choice = Choice(message=AssistantMessage(content="".join(text)), finish_reason=last.finish_reason,
                    grounding=grounding_payload(last.grounding))
    return ChatCompletion(id=new_completion_id(), created=int(time.time()), model=model, choices=[choice], usage=usage)


# ----- server-sent events ----------------------------------------------------------------------------------------
def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event (``data: ...`` and a blank line)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def _chunk(completion_id: str, created: int, model: str, choices: list[dict[str, Any]],
           usage: Usage | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                            "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage.model_dump()
    return body


async def sse_stream(
    model: str, events: AsyncIterator[EngineEvent], include_usage: bool, first: EngineEvent | None = None
) -> AsyncIterator[str]:
    """OpenAI ``chat.completion.chunk`` events for a stream; ``first`` is an event already taken from it.

    Errors after the response started are sent as an ``{"error": ...}`` event (the status is already 200).
    """
    completion_id, created = new_completion_id(), int(time.time())
    yield sse(_chunk(completion_id, created, model,
                     [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]))
    try:
        async for event in _prepend(first, events):
            if event.text:
                yield sse(_chunk(completion_id, created, model,
                                 [{"index": 0, "delta": {"content": event.text}, "finish_reason": None}]))
            if event.finish_reason is None:
                continue
            grounding = [g.model_dump() for g in grounding_payload(event.grounding)]
            yield sse(_chunk(completion_id, created, model, [
                {"index": 0, "delta": {}, "finish_reason": event.finish_reason, "grounding": grounding}]))
            if include_usage:
                usage = Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
                              total_tokens=event.prompt_tokens + event.completion_tokens)
                yield sse(_chunk(completion_id, created, model, [], usage))
    except Exception as exc:  # reported to the client inside the stream
        known = isinstance(exc, QwenVLError | EngineFault | EngineStopped)
        yield sse({"error": {"message": str(exc) if known else "internal server error",
                             "type": "server_error", "param": None, "code": None}})
    yield sse("[DONE]")


async def _prepend(first: EngineEvent | None, events: AsyncIterator[EngineEvent]) -> AsyncIterator[EngineEvent]:
    if first is not None:
        yield first
        if first.finish_reason is not None:
            return
    async for event in events:
        yield event
