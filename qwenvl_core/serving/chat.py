"""OpenAI chat-completions API for the serving engine: schemas, conversion, SSE chunks, the backend protocol.

This module owns
- the request / response schemas (pydantic) of ``POST /v1/chat/completions``: messages with ``text`` and
  ``image_url`` parts (several images per message), sampling fields (``temperature``, ``top_p``, ``top_k``,
  ``seed``, ``max_tokens`` / ``max_completion_tokens``, ``stop``), ``stream`` + ``stream_options``, ``usage``,
  and the extension field ``grounding`` on each choice: the boxes of the answer in pixels of each input image;
- converting a request into engine messages: ``data:`` URLs are decoded by the engine; any other image
  reference (an uploaded file id, a storage path) goes through an ``ImageResolver`` the service passes in,
  which also checks that the tenant owns it;
- the ``ChatBackend`` protocol the HTTP route depends on, ``AdapterLocator`` / ``AdapterResolver`` (model id +
  tenant -> the adapter to load, or None), and ``InProcessBackend`` (engines in this process: local use, tests).
  The Ray Serve backend lives in ``workflows/serve_app.py``;
- formatting results as a ``chat.completion`` object or as ``chat.completion.chunk`` server-sent events.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from qwenvl_core.conversation import ImagePart, ImageSource, Message, Part, TextPart
from qwenvl_core.errors import QwenVLError
from qwenvl_core.generation import SamplingParams
from qwenvl_core.serving.engine import EngineEvent, EngineRequest, ImageBoxes, ServingEngine
from qwenvl_core.serving.metrics import merge_expositions

DEFAULT_MAX_TOKENS = 256


class ChatRequestError(QwenVLError):
    """A request the API refuses; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


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
# (image reference that is not a data URL, tenant id) -> image bytes or a local path; raises if not allowed.
ImageResolver = Callable[[str, str], ImageSource]


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
def to_messages(request: ChatCompletionRequest, resolve_image: Callable[[str], ImageSource] | None) -> list[Message]:
    """Engine messages; non-data image URLs are resolved (blocking: call it off the event loop)."""
    messages = []
    for m_index, message in enumerate(request.messages):
        content = message.content
        if content is None or isinstance(content, str):
            parts: list[Part] = [TextPart(content or "")]
        else:
            parts = [_part(p, resolve_image, f"messages[{m_index}].content[{p_index}]")
                     for p_index, p in enumerate(content)]
        if message.role != "user" and any(isinstance(p, ImagePart) for p in parts):
            raise ChatRequestError("images are only accepted in user messages", f"messages[{m_index}].content")
        messages.append(Message(role=message.role, parts=parts))
    return messages


def _part(part: TextContent | ImageContent, resolve: Callable[[str], ImageSource] | None, param: str) -> Part:
    if isinstance(part, TextContent):
        return TextPart(part.text)
    url = part.image_url.url
    if url.startswith("data:"):
        return ImagePart(url)
    if url.startswith(("http://", "https://")):
        raise ChatRequestError("remote image URLs are not fetched; send a data URL or an uploaded file id", param)
    if resolve is None:
        raise ChatRequestError("only data: image URLs are accepted here", param)
    return ImagePart(resolve(url))


def sampling_params(request: ChatCompletionRequest, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> SamplingParams:
    """OpenAI fields to ``SamplingParams`` (OpenAI defaults: temperature 1, top_p 1; temperature 0 = greedy)."""
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise ChatRequestError("stop: at most 4 non-empty strings", "stop")
    temperature = 1.0 if request.temperature is None else request.temperature
    return SamplingParams(
        max_new_tokens=request.max_completion_tokens or request.max_tokens or default_max_tokens,
        do_sample=temperature > 0,
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
        raise QwenVLError("generation ended without a final event")
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
        yield sse({"error": {"message": str(exc) if isinstance(exc, QwenVLError) else "internal server error",
                             "type": "server_error", "param": None, "code": None}})
    yield sse("[DONE]")


async def _prepend(first: EngineEvent | None, events: AsyncIterator[EngineEvent]) -> AsyncIterator[EngineEvent]:
    if first is not None:
        yield first
        if first.finish_reason is not None:
            return
    async for event in events:
        yield event
