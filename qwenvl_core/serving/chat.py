"""OpenAI chat-completions API for the serving engine: schemas, conversion, SSE chunks, the backend protocol.

This module owns
- the request / response schemas (pydantic) of ``POST /v1/chat/completions``: messages with ``text`` and
  ``image_url`` parts (several images per message), sampling fields (``temperature``, ``top_p``, ``top_k``,
  ``seed``, ``max_tokens`` / ``max_completion_tokens``, ``stop``, ``presence_penalty`` / ``frequency_penalty``,
  ``logit_bias``),
  ``n`` choices, ``logprobs`` / ``top_logprobs``, ``response_format`` (``text``, ``json_object``, ``json_schema``
  through ``qwenvl_core.grammar``), ``stream`` + ``stream_options``, ``usage``, ``system_fingerprint``, and the
  extension field ``grounding`` on each choice: the boxes of the answer in pixels of each input image;
- refusing what is not supported: any other field with a value (``tools``, ``audio``, ``prediction``...), also
  inside a message, is a ``ChatRequestError`` naming it (null-valued ones ask for nothing and are let through);
- converting a request into engine messages within ``ChatLimits``, cheapest checks first: the number of
  images on the parsed request, then each image's size and their total (``data:`` URLs from their length;
  any other reference, an uploaded file id or a storage path, through an ``ImageResolver`` the service passes
  in, which checks that the tenant owns it and returns its stored size without reading it), and only then are
  references read, never more than the per-image limit + 1 bytes. ``data:`` URLs are decoded by the engine,
  except large ones that the HTTP route took out of the body before parsing it (``inline_images``): their
  payloads are base64-decoded here, in slices;
- the sampling fields' limits (at most 4 stop strings of at most ``MAX_STOP_CHARS`` characters each; at most
  ``MAX_LOGIT_BIAS_TOKENS`` ``logit_bias`` entries, keys token ids in decimal; the engine refuses an id beyond the
  model's vocabulary; ``seed`` a 64-bit signed integer, as on OpenAI); a content part of another type than
  ``text`` / ``image_url`` is a 400 naming its ``type``;
- the ``ChatBackend`` protocol the HTTP route depends on, ``AdapterLocator`` / ``AdapterResolver`` (model id +
  tenant -> the adapter to load, or None), and ``InProcessBackend`` (engines in this process: local use, tests).
  The Ray Serve backend lives in ``workflows/serve_app.py``;
- formatting results as a ``chat.completion`` object or as ``chat.completion.chunk`` server-sent events; with
  ``n`` > 1 each choice is its own engine request (``choice_params``: choice ``i`` uses ``seed + i``) and their
  events are merged (``collect_completion``, ``sse_stream``); usage counts the prompt once and sums the choices'
  completion tokens, as OpenAI does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from qwenvl_core.conversation import ImagePart, Message, Part, TextPart
from qwenvl_core.errors import ImageError, QwenVLError
from qwenvl_core.generation import (
    MAX_LOGIT_BIAS,
    MAX_TOP_LOGPROBS,
    MIN_SAMPLING_TEMPERATURE,
    MIN_SEED,
    SamplingParams,
)
from qwenvl_core.grammar import GrammarError, json_grammar
from qwenvl_core.images import data_url_size
from qwenvl_core.serving.engine import (
    EngineEvent,
    EngineFault,
    EngineRequest,
    EngineStopped,
    ImageBoxes,
    ServingEngine,
    join_events,
)
from qwenvl_core.serving.inline_images import InlineImages
from qwenvl_core.serving.metrics import merge_expositions
from qwenvl_core.serving.preparation import RequestError, check_image_bytes, check_image_count
from qwenvl_core.vocabulary import TokenLogprob

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
MAX_LOGIT_BIAS_TOKENS = 300  # entries of one request's logit_bias
# OpenAI's seed is a 64-bit signed integer; choice i's seed + i then stays within what a torch generator takes
MAX_REQUEST_SEED = 2**63 - 1
MIB = 1 << 20
# OpenAI fields this server does not implement, with what they are: a request that sets one gets a 400 naming it.
UNSUPPORTED_FIELDS = {
    "tools": "tool calling", "tool_choice": "tool calling", "parallel_tool_calls": "tool calling",
    "functions": "function calling", "function_call": "function calling",
    "audio": "audio output", "modalities": "output modalities other than text", "prediction": "predicted outputs",
    "web_search_options": "web search", "reasoning_effort": "reasoning models", "store": "stored completions",
    "metadata": "stored completions", "service_tier": "service tiers", "verbosity": "reasoning models",
}
T = TypeVar("T")


class ChatRequestError(RequestError):
    """A request the API refuses; ``param`` names the offending field, ``code`` the reason."""


@dataclass(frozen=True)
class ChatLimits:
    """What one chat request may hold (OpenAI's per-image and per-request sizes by default)."""

    max_images: int = 16
    max_image_bytes: int = 20 * MIB  # one encoded image: a stored file, or a data URL's decoded payload
    max_image_bytes_total: int = 50 * MIB  # all images of the request together
    max_choices: int = 8  # ``n``: each choice is its own engine request (a batch row)
    # The output limit of a request that sets neither max_tokens nor max_completion_tokens; the engine cuts it to
    # what the context leaves after the prompt (``EngineRequest.default_max_tokens``).
    default_max_tokens: int = 256


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
CONTENT_PART_TYPES = ("text", "image_url")
_CONTENT_PARTS = TypeAdapter(list[ContentPart])


class ChatMessage(BaseModel):
    """A message; other fields (``tool_calls``, ``refusal``...) are kept to be refused when they hold a value."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content_parts(cls, value: Any) -> Any:
        """A list is validated as content parts only, so that its errors are the parts' (the union would report
        first that it is not a string), and a part of a type this server does not read is named by its ``type``
        (``messages.<i>.content.<j>.type``). A ``ValidationError`` raised here adds its errors under ``content``."""
        if not isinstance(value, list):
            return value
        for index, part in enumerate(value):
            if isinstance(part, dict) and part.get("type") not in CONTENT_PART_TYPES:
                kind = part.get("type")
                supported = ", ".join(map(repr, CONTENT_PART_TYPES))
                message = ("content part type {type} is not supported; supported types: {supported}" if "type" in part
                           else "content part has no type; supported types: {supported}")
                error = PydanticCustomError("unsupported_content_part", message,
                                            {"type": repr(kind)[:64], "supported": supported})
                raise ValidationError.from_exception_data(
                    "ChatMessage", [{"type": error, "loc": (index, "type"), "input": kind}])
        return _CONTENT_PARTS.validate_python(value)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """``{"type": "text"}``, ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {...}}``
    (one model rather than a tagged union, so that errors name ``response_format.json_schema.<field>``)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class ChatCompletionRequest(BaseModel):
    """The OpenAI request body; ``top_k`` is an extension. Other fields are kept (``model_extra``) so that
    ``sampling_params`` refuses each one that holds a value, naming it, instead of ignoring it."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = Field(default=None, ge=MIN_SEED, le=MAX_REQUEST_SEED)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=1, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, float] | None = None
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


class TopLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(TopLogprobOut):
    top_logprobs: list[TopLogprobOut]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None
    refusal: list[TokenLogprobOut] | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str
    grounding: list[ImageGrounding] = Field(default_factory=list)


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
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
        """Generate for ``request`` on ``base_model`` (with ``request.adapter_*`` applied); the events ready when
        the next is asked for come as one (``ServingEngine.stream``'s ``coalesce``; a backend may also space them)."""
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
        return self.engines[base_model].stream(request, coalesce=0)

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


def sampling_params(request: ChatCompletionRequest, default_max_tokens: int = DEFAULT_CHAT_LIMITS.default_max_tokens
                    ) -> SamplingParams:
    """OpenAI fields to ``SamplingParams`` (OpenAI defaults: temperature 1, top_p 1; temperature 0 = greedy), after
    refusing every field this server does not implement and every inconsistent combination, naming the field.
    ``default_max_tokens``: the output limit when the request sets none (``gives_max_tokens``)."""
    check_supported(request)
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise ChatRequestError(f"stop: at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_CHARS} "
                               "characters each", "stop", "invalid_value")
    if request.max_tokens and request.max_completion_tokens and request.max_tokens != request.max_completion_tokens:
        raise ChatRequestError(f"max_completion_tokens ({request.max_completion_tokens}) and its deprecated alias "
                               f"max_tokens ({request.max_tokens}) differ; send one of them",
                               "max_completion_tokens", "invalid_value")
    if request.stream_options is not None and not request.stream:
        raise ChatRequestError("stream_options is only allowed when stream is true", "stream_options",
                               "invalid_value")
    if request.top_logprobs is not None and not request.logprobs:
        raise ChatRequestError("top_logprobs needs logprobs set to true", "top_logprobs", "invalid_value")
    temperature = 1.0 if request.temperature is None else request.temperature
    return SamplingParams(
        max_new_tokens=request.max_completion_tokens or request.max_tokens or default_max_tokens,
        do_sample=temperature >= MIN_SAMPLING_TEMPERATURE,
        temperature=temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=request.top_k or 0,
        seed=request.seed,
        stop_strings=tuple(stops),
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        logprobs=(request.top_logprobs or 0) if request.logprobs else None,
        grammar=response_grammar(request),
        logit_bias=logit_bias(request.logit_bias or {}),
    )


def gives_max_tokens(request: ChatCompletionRequest) -> bool:
    """Whether the client set an output limit (``max_completion_tokens`` or its alias ``max_tokens``)."""
    return bool(request.max_completion_tokens or request.max_tokens)


def logit_bias(values: dict[str, float]) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias`` (token id in decimal -> a value in [-100, 100]) as ``SamplingParams.logit_bias``;
    a ``ChatRequestError`` naming ``logit_bias`` for too many entries, a key that is no token id or a value out of
    range. (Whether each id is in the model's vocabulary, the engine checks.)"""
    if len(values) > MAX_LOGIT_BIAS_TOKENS:
        raise ChatRequestError(f"logit_bias: {len(values)} entries; at most {MAX_LOGIT_BIAS_TOKENS}", "logit_bias",
                               "invalid_value")
    entries = []
    for key, value in values.items():
        if not (key.isascii() and key.isdigit()):
            raise ChatRequestError(f"logit_bias: key {key[:32]!r} is not a token id (a non-negative integer in "
                                   "decimal)", "logit_bias", "invalid_value")
        if len(key) > 9:
            raise ChatRequestError(f"logit_bias: token id {key[:12]}... is beyond any model's vocabulary", "logit_bias",
                                   "invalid_value")
        if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise ChatRequestError(f"logit_bias: the value of token {key} is {value}; values are in "
                                   f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]", "logit_bias", "invalid_value")
        entries.append((int(key), float(value)))
    return tuple(entries)


def check_supported(request: ChatCompletionRequest) -> None:
    """Refuse any field that is not in the schema and holds a value (top level, then in each message)."""
    for name, value in (request.model_extra or {}).items():
        if value is not None:
            what = UNSUPPORTED_FIELDS.get(name)
            reason = f"{what} is not supported by this server" if what else "this field is not supported"
            raise ChatRequestError(f"{name}: {reason}", name, "unsupported_parameter")
    for m_index, message in enumerate(request.messages):
        for name, value in (message.model_extra or {}).items():
            if value is not None:
                field = f"messages[{m_index}].{name}"
                raise ChatRequestError(f"{field}: this message field is not supported", field, "unsupported_parameter")


def response_grammar(request: ChatCompletionRequest) -> str | None:
    """The grammar of ``response_format`` (None for plain text). JSON mode needs the word "json" in the messages,
    as on OpenAI (without the instruction a model may emit whitespace until the token limit)."""
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        if not any("json" in text.lower() for text in _texts(request)):
            raise ChatRequestError("'messages' must contain the word 'json' in some form, to use 'response_format' "
                                   "of type 'json_object'", "response_format", "invalid_value")
        return json_grammar(None)
    if fmt.json_schema is None:
        raise ChatRequestError("response_format.json_schema: required when type is 'json_schema'",
                               "response_format.json_schema", "invalid_value")
    try:
        return json_grammar(fmt.json_schema.schema_ or {})
    except GrammarError as exc:
        raise ChatRequestError(f"response_format.json_schema.schema: this schema cannot be enforced ({exc}); "
                               "supported: JSON Schema as OpenAI's structured outputs use it",
                               "response_format.json_schema.schema", "invalid_value") from None


def _texts(request: ChatCompletionRequest) -> Iterator[str]:
    for message in request.messages:
        if isinstance(message.content, str):
            yield message.content
        for part in message.content if isinstance(message.content, list) else ():
            if isinstance(part, TextContent):
                yield part.text


def choice_params(request: ChatCompletionRequest, params: SamplingParams,
                  limits: ChatLimits = DEFAULT_CHAT_LIMITS) -> list[SamplingParams]:
    """The ``SamplingParams`` of each of the ``n`` choices: choice ``i`` samples with ``seed + i`` (with a seed)."""
    n = request.n or 1
    if n > limits.max_choices:
        raise ChatRequestError(f"n: at most {limits.max_choices} choices per request, got {n}", "n", "invalid_value")
    if params.seed is None:
        return [params] * n
    return [dataclasses.replace(params, seed=params.seed + i) for i in range(n)]


def system_fingerprint(base_model: str, adapter_id: str | None) -> str:
    """A stable id of what answers (base model + adapter): ``fp_`` and 10 hex digits."""
    digest = hashlib.sha256(f"{base_model}\0{adapter_id or ''}".encode()).hexdigest()
    return f"fp_{digest[:10]}"


def grounding_payload(boxes: list[ImageBoxes]) -> list[ImageGrounding]:
    return [
        ImageGrounding(image_index=b.image_index, width=b.width, height=b.height,
                       objects=[GroundedBox(ref=o.ref, box=o.box) for o in b.objects])
        for b in boxes
    ]


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _logprobs_payload(entries: Sequence[TokenLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=[
        TokenLogprobOut(token=e.token, logprob=e.logprob, bytes=list(e.bytes),
                        top_logprobs=[TopLogprobOut(token=t.token, logprob=t.logprob, bytes=list(t.bytes))
                                      for t in e.top_logprobs])
        for e in entries])


def _usage(finals: Sequence[EngineEvent]) -> Usage:
    """The prompt once, every choice's completion tokens."""
    prompt, completion = finals[0].prompt_tokens, sum(e.completion_tokens for e in finals)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def all_of(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """Await all concurrently; on the first error the others are cancelled and that error is raised as it is."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _run_choice(index: int, events: AsyncIterator[EngineEvent], logprobs: bool
                      ) -> tuple[Choice, EngineEvent]:
    received = [event async for event in events]
    if not received or received[-1].finish_reason is None:
        raise EngineFault("generation ended without a final event")
    whole = join_events(received)
    choice = Choice(index=index, message=AssistantMessage(content=whole.text), finish_reason=whole.finish_reason,
                    logprobs=_logprobs_payload(whole.logprobs) if logprobs else None,
                    grounding=grounding_payload(whole.grounding))
    return choice, whole


async def collect_completion(model: str, streams: Sequence[AsyncIterator[EngineEvent]], *,
                             fingerprint: str | None = None, logprobs: bool = False) -> ChatCompletion:
    """Run each choice's stream to the end (concurrently) and build the ``chat.completion`` object."""
    results = await all_of(_run_choice(i, events, logprobs) for i, events in enumerate(streams))
    return ChatCompletion(id=new_completion_id(), created=int(time.time()), model=model,
                          system_fingerprint=fingerprint, choices=[choice for choice, _ in results],
                          usage=_usage([last for _, last in results]))


# ----- server-sent events ----------------------------------------------------------------------------------------
def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event (``data: ...`` and a blank line)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


@dataclass(frozen=True)
class _ChunkHead:
    id: str
    created: int
    model: str
    fingerprint: str | None
    include_usage: bool

    def chunk(self, choices: list[dict[str, Any]], usage: Usage | None = None) -> str:
        body: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                "model": self.model, "system_fingerprint": self.fingerprint, "choices": choices}
        if self.include_usage:  # OpenAI: every chunk has the field; only the last one a value
            body["usage"] = None if usage is None else usage.model_dump()
        return sse(body)


async def first_events(streams: Sequence[AsyncIterator[EngineEvent]]) -> list[EngineEvent]:
    """The first event of every stream (errors in preparing any request raise here, before a response starts)."""
    return await all_of(anext(events) for events in streams)


async def sse_stream(
    model: str, streams: Sequence[AsyncIterator[EngineEvent]], include_usage: bool,
    firsts: Sequence[EngineEvent | None] | None = None, *, fingerprint: str | None = None, logprobs: bool = False,
) -> AsyncIterator[str]:
    """OpenAI ``chat.completion.chunk`` events for the choices' streams (merged as their events come);
    ``firsts`` are events already taken from them.

    Errors after the response started are sent as an ``{"error": ...}`` event (the status is already 200).
    """
    head = _ChunkHead(new_completion_id(), int(time.time()), model, fingerprint, include_usage)
    for index in range(len(streams)):
        yield head.chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                           "finish_reason": None}])
    finals: dict[int, EngineEvent] = {}
    try:
        async for index, event in _merge(streams, firsts or [None] * len(streams)):
            if event.text or event.logprobs:
                yield head.chunk([{"index": index, "delta": {"content": event.text},
                                   "logprobs": _logprobs_payload(event.logprobs).model_dump() if logprobs else None,
                                   "finish_reason": None}])
            if event.finish_reason is None:
                continue
            finals[index] = event
            grounding = [g.model_dump() for g in grounding_payload(event.grounding)]
            yield head.chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": event.finish_reason,
                               "grounding": grounding}])
        if include_usage:
            yield head.chunk([], _usage([finals[i] for i in sorted(finals)]))
    except Exception as exc:  # reported to the client inside the stream
        known = isinstance(exc, QwenVLError | EngineFault | EngineStopped)
        yield sse({"error": {"message": str(exc) if known else "internal server error",
                             "type": "server_error", "param": None, "code": None}})
    yield sse("[DONE]")


async def _merge(streams: Sequence[AsyncIterator[EngineEvent]], firsts: Sequence[EngineEvent | None]
                 ) -> AsyncIterator[tuple[int, EngineEvent]]:
    """(choice index, event) of all streams as they come; the first error raises (the other streams are closed)."""
    if len(streams) == 1:
        async for event in _prepend(firsts[0], streams[0]):
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, EngineEvent | BaseException | None]] = asyncio.Queue()

    async def pump(index: int) -> None:
        try:
            async for event in _prepend(firsts[index], streams[index]):
                await queue.put((index, event))
        except Exception as exc:
            await queue.put((index, exc))
        await queue.put((index, None))

    tasks = [asyncio.ensure_future(pump(i)) for i in range(len(streams))]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _prepend(first: EngineEvent | None, events: AsyncIterator[EngineEvent]) -> AsyncIterator[EngineEvent]:
    if first is not None:
        yield first
        if first.finish_reason is not None:
            return
    async for event in events:
        yield event
