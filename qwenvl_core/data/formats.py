"""The two input formats, detected per file and mapped onto ``qwenvl_core.conversation`` messages.

- ``DataFormat.QWEN``: the official Qwen-VL fine-tuning format, a JSON list (or JSONL) of
  ``{"id", "conversations": [{"from": "user"|"assistant", "value": str}]}`` with images inline as
  ``Picture k: <img>path</img>\\n`` (split by ``chat.split_image_markup``) and boxes as ``<ref>/<box>`` markup.
- ``DataFormat.OPENAI``: OpenAI chat fine-tuning JSONL, ``{"messages": [{"role", "content": str | [parts],
  "weight"?}]}`` with ``{"type": "text", "text"}`` and ``{"type": "image_url", "image_url": {"url"}}`` parts.

This module owns the schema of one record: it turns a decoded JSON value into a ``Sample`` plus the JSON field
path of every message and part (so later checks can point at ``messages[2].content[1].image_url.url``), and
reports schema problems as ``Issue``s. Image sources are resolved here (local paths against the data file's
folder; data URLs kept as strings) but never opened. ``to_qwen_record`` / ``to_openai_record`` write samples
back, which the synthetic generator and the round-trip tests use.
"""

from __future__ import annotations

import base64
import mimetypes
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Any, cast

from qwenvl_core.conversation import ROLES, ImagePart, Message, Part, Role, TextPart
from qwenvl_core.data.issues import DataError, Issue, Location, Severity
from qwenvl_core.errors import PromptError
from qwenvl_core.models.qwen_vl.chat import split_image_markup


class DataFormat(StrEnum):
    QWEN = "qwen"
    OPENAI = "openai"
    PREFERENCE = "preference"  # OpenAI's DPO format: input / preferred_output / non_preferred_output (preference.py)


@dataclass
class Sample:
    """One training conversation. ``location`` (where it was read) does not take part in equality."""

    id: str
    messages: list[Message]
    location: Location = field(default_factory=lambda: Location("<memory>"), compare=False)


@dataclass
class ParsedRecord:
    """A parsed record: the sample (None when the schema is too broken) and where each piece came from."""

    sample: Sample | None
    issues: list[Issue]
    message_fields: list[str] = field(default_factory=list)
    part_fields: list[list[str]] = field(default_factory=list)


_QWEN_ROLES = ("user", "assistant")
_QWEN_KEYS = {"id", "conversations"}
_OPENAI_KEYS = {"id", "messages"}  # "id" is ours (OpenAI has none); "tools" etc. are not supported
_ROLE_HINTS = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


def detect_format(value: Any) -> DataFormat | None:
    """The format of one decoded record: ``conversations`` means QWEN, ``messages`` means OPENAI, ``input`` /
    ``preferred_output`` / ``non_preferred_output`` mean PREFERENCE (parsed by ``preference``, not here)."""
    if isinstance(value, dict):
        if "conversations" in value:
            return DataFormat.QWEN
        if "messages" in value:
            return DataFormat.OPENAI
        if any(key in value for key in ("input", "preferred_output", "non_preferred_output")):
            return DataFormat.PREFERENCE
    return None


def parse_record(value: Any, fmt: DataFormat, location: Location, base_dir: Path) -> ParsedRecord:
    """Parse one decoded record of format ``fmt`` (schema checks only; semantics live in ``checks``)."""
    parser = _QwenParser if fmt is DataFormat.QWEN else _OpenAIParser
    return parser(location, base_dir).parse(value)


class _Parser(ABC):
    """Shared state of one record parse: location, base folder and the issues found so far."""

    top_key = ""
    known_keys: set[str] = set()

    def __init__(self, location: Location, base_dir: Path) -> None:
        self.location, self.base_dir = location, base_dir
        self.issues: list[Issue] = []
        self.message_fields: list[str] = []
        self.part_fields: list[list[str]] = []

    def error(self, code: str, path: str, message: str) -> None:
        self.issues.append(Issue(code, message, self.location, path))

    def warn(self, code: str, path: str, message: str) -> None:
        self.issues.append(Issue(code, message, self.location, path, Severity.WARNING))

    def parse(self, value: Any) -> ParsedRecord:
        items = self._top(value)
        if items is None:
            return ParsedRecord(None, self.issues)
        messages: list[Message] = []
        for i, item in enumerate(items):
            path = f"{self.top_key}[{i}]"
            if not isinstance(item, dict):
                self.error("schema", path, f"expected an object, got {_kind(item)}")
                continue
            parsed = self.message(item, path)
            if parsed is not None:
                messages.append(parsed[0])
                self.message_fields.append(path)
                self.part_fields.append(parsed[1])
        sample = Sample(self.sample_id(value), messages, self.location)
        return ParsedRecord(sample, self.issues, self.message_fields, self.part_fields)

    def _top(self, value: Any) -> list[Any] | None:
        if not isinstance(value, dict):
            self.error("schema", "", f"expected a JSON object with {self.top_key!r}, got {_kind(value)}")
            return None
        for key in sorted(set(value) - self.known_keys):
            self.warn("unknown_key", key, "unknown key, ignored")
        items = value.get(self.top_key)
        if not isinstance(items, list) or not items:
            got = "missing" if items is None else f"{_kind(items)}" if not isinstance(items, list) else "empty"
            self.error("schema", self.top_key, f"expected a non-empty list of turns, got {got}")
            return None
        return items

    def sample_id(self, value: dict[str, Any]) -> str:
        raw = value.get("id")
        if raw is None:
            return f"#{self.location.index if self.location.index is not None else 0}"
        if not isinstance(raw, str | int) or isinstance(raw, bool):
            self.error("schema", "id", f"expected a string id, got {_kind(raw)}")
            return f"#{self.location.index}"
        return str(raw)

    def role(self, raw: Any, path: str, allowed: tuple[str, ...]) -> str | None:
        if isinstance(raw, str) and raw in allowed:
            return raw
        hint = _ROLE_HINTS.get(raw) if isinstance(raw, str) else None
        extra = f" (use {hint!r})" if hint in allowed else ""
        self.error("unknown_role", path, f"unknown role {raw!r}; expected one of {', '.join(allowed)}{extra}")
        return None

    def image(self, url: str, path: str) -> ImagePart | None:
        try:
            return ImagePart(resolve_image_source(url, self.base_dir))
        except DataError as e:
            self.error("image", path, str(e))
            return None

    @abstractmethod
    def message(self, item: dict[str, Any], path: str) -> tuple[Message, list[str]] | None:
        """One turn object found at ``path`` and the field path of each of its parts; None when unusable."""


class _QwenParser(_Parser):
    top_key = "conversations"
    known_keys = _QWEN_KEYS

    def message(self, item: dict[str, Any], path: str) -> tuple[Message, list[str]] | None:
        for key in sorted(set(item) - {"from", "value"}):
            self.warn("unknown_key", f"{path}.{key}", "unknown key, ignored")
        role = self.role(item.get("from"), f"{path}.from", _QWEN_ROLES)
        value = item.get("value")
        if not isinstance(value, str):
            self.error("schema", f"{path}.value", f"expected a string, got {_kind(value)}")
            return None
        parts = self._parts(value, f"{path}.value")
        if role is None or parts is None:
            return None
        return Message(cast(Role, role), parts), [f"{path}.value"] * len(parts)

    def _parts(self, value: str, path: str) -> list[Part] | None:
        try:
            raw_parts = split_image_markup(value)
        except PromptError as e:
            self.error("image_markup", path, str(e))
            return None
        parts: list[Part] = []
        for part in raw_parts:
            if isinstance(part, ImagePart):
                image = self.image(str(part.source), path)
                if image is None:
                    return None
                part = image
            parts.append(part)
        return parts


class _OpenAIParser(_Parser):
    top_key = "messages"
    known_keys = _OPENAI_KEYS

    def message(self, item: dict[str, Any], path: str) -> tuple[Message, list[str]] | None:
        for key in sorted(set(item) - {"role", "content", "weight", "name"}):
            self.warn("unknown_key", f"{path}.{key}", "unknown key, ignored")
        role = self.role(item.get("role"), f"{path}.role", ROLES)
        trainable = self._weight(item, role, path)
        content = self._content(item.get("content"), f"{path}.content")
        if role is None or content is None or trainable is None:
            return None
        return Message(cast(Role, role), content[0], trainable=trainable), content[1]

    def _weight(self, item: dict[str, Any], role: str | None, path: str) -> bool | None:
        if "weight" not in item:
            return True
        weight = item["weight"]
        if role != "assistant":
            self.error("schema", f"{path}.weight", "weight is only allowed on assistant messages")
            return None
        if weight not in (0, 1) or isinstance(weight, bool):
            self.error("schema", f"{path}.weight", f"weight must be 0 or 1, got {weight!r}")
            return None
        return weight == 1

    def _content(self, content: Any, path: str) -> tuple[list[Part], list[str]] | None:
        if isinstance(content, str):
            return [TextPart(content)], [path]
        if not isinstance(content, list):
            self.error("schema", path, f"expected a string or a list of parts, got {_kind(content)}")
            return None
        parts: list[Part] = []
        fields: list[str] = []
        for j, raw in enumerate(content):
            part = self._part(raw, f"{path}[{j}]")
            if part is None:
                return None
            parts.append(part[0])
            fields.append(part[1])
        return parts, fields

    def _part(self, raw: Any, path: str) -> tuple[Part, str] | None:
        kind = raw.get("type") if isinstance(raw, dict) else None
        if kind == "text":
            text = raw.get("text")
            if isinstance(text, str):
                return TextPart(text), path
            self.error("schema", f"{path}.text", f"expected a string, got {_kind(text)}")
            return None
        if kind == "image_url":
            url_field = raw.get("image_url")
            url = url_field.get("url") if isinstance(url_field, dict) else None
            if not isinstance(url, str):
                self.error("schema", f"{path}.image_url.url", f"expected a string URL, got {_kind(url)}")
                return None
            image = self.image(url, f"{path}.image_url.url")
            return (image, f"{path}.image_url.url") if image is not None else None
        found = _kind(raw) if not isinstance(raw, dict) else f"type {kind!r}"
        self.error("schema", path, f"expected a part of type 'text' or 'image_url', got {found}")
        return None


def resolve_image_source(url: str, base_dir: Path) -> str | Path:
    """A data URL stays a string; a relative path becomes ``base_dir / path``; anything else is an error.

    ``DataError`` (without location: the caller knows the field) for remote URLs, which are refused because
    training never downloads, and for absolute paths and ``..``, refused so that a bundle cannot read files
    outside its own folder.
    """
    if url.startswith("data:"):
        return url
    if url.startswith(("http://", "https://", "ftp://", "file:")):
        raise DataError("remote image URLs are not supported; put the image in the bundle and use a relative path")
    if not url.strip():
        raise DataError("empty image path")
    pure = PurePosixPath(url.replace("\\", "/"))
    if pure.is_absolute() or ":" in pure.parts[0] or ".." in pure.parts:
        raise DataError(f"image path must be relative and inside the bundle: {url}")
    return base_dir / pure


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# -- writers --------------------------------------------------------------------------------------------------


def to_qwen_record(sample: Sample, base_dir: Path) -> dict[str, Any]:
    """``sample`` in the official format; images as ``Picture k: <img>path</img>\\n`` relative to ``base_dir``.

    The official format has no system messages and no per-turn weights: such samples are a ``DataError``.
    """
    turns = []
    counter = 0
    for message in sample.messages:
        if message.role == "system" or not message.trainable:
            raise DataError(f"sample {sample.id!r}: system messages and weight-0 turns have no official-format "
                            "equivalent; write it in the OpenAI format")
        value = ""
        for part in message.parts:
            if isinstance(part, ImagePart):
                counter += 1
                value += f"Picture {counter}: <img>{_image_ref(part, base_dir, embed=False)}</img>\n"
            else:
                value += part.text
        turns.append({"from": message.role, "value": value})
    return {"id": sample.id, "conversations": turns}


def to_openai_record(sample: Sample, base_dir: Path, embed_images: bool = False) -> dict[str, Any]:
    """``sample`` in OpenAI chat format (plus our ``id``); images as relative paths or, embedded, data URLs."""
    messages = []
    for message in sample.messages:
        entry: dict[str, Any] = {"role": message.role}
        if len(message.parts) == 1 and isinstance(message.parts[0], TextPart):
            entry["content"] = message.parts[0].text
        else:
            entry["content"] = [_openai_part(p, base_dir, embed_images) for p in message.parts]
        if message.role == "assistant" and not message.trainable:
            entry["weight"] = 0
        messages.append(entry)
    return {"id": sample.id, "messages": messages}


def _openai_part(part: Part, base_dir: Path, embed: bool) -> dict[str, Any]:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    return {"type": "image_url", "image_url": {"url": _image_ref(part, base_dir, embed)}}


def _image_ref(part: ImagePart, base_dir: Path, embed: bool) -> str:
    source = part.source
    if isinstance(source, str) and source.startswith("data:"):
        return source
    if not isinstance(source, str | Path):
        raise DataError("only file and data-URL images can be written to a data file")
    path = Path(source)
    if embed:
        mime = mimetypes.guess_type(path.name)[0] or "image/png"
        return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"
    if not path.is_relative_to(base_dir):
        raise DataError(f"image {path} is outside {base_dir}; a data file can only reference images below it")
    return path.relative_to(base_dir).as_posix()
