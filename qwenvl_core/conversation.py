"""The internal representation of a conversation, shared by the processor, the data pipeline and serving.

A conversation is a list of ``Message``s; a message has a role and an ordered list of parts: text or image.
Grounding boxes stay inside text as ``<ref>..</ref><box>(x1,y1),(x2,y2)</box>`` markup, exactly as the model
reads and writes them (``qwenvl_core.models.qwen_vl.grounding`` parses and formats them).

Every input format (official Qwen-VL fine-tuning JSON, OpenAI chat JSONL, API requests) is converted into this
form once, at the edge; everything downstream sees only these types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image

Role = Literal["system", "user", "assistant"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant")

# What an image part may hold: a filesystem path, a ``data:image/...;base64,`` URL (as ``str``), raw encoded
# bytes, or an already decoded PIL image.
ImageSource = str | Path | bytes | Image.Image


@dataclass(frozen=True)
class TextPart:
    """A run of text (may contain ``<ref>``/``<box>`` grounding markup)."""

    text: str


@dataclass(frozen=True)
class ImagePart:
    """One image. ``source`` is resolved (and size-checked) only when pixels are needed."""

    source: ImageSource


Part = TextPart | ImagePart


@dataclass
class Message:
    """One turn. ``trainable`` is False for assistant turns that must carry no loss (OpenAI ``weight: 0``)."""

    role: Role
    parts: list[Part] = field(default_factory=list)
    trainable: bool = True

    @property
    def images(self) -> list[ImagePart]:
        return [p for p in self.parts if isinstance(p, ImagePart)]

    @property
    def text(self) -> str:
        """The concatenated text parts (images omitted)."""
        return "".join(p.text for p in self.parts if isinstance(p, TextPart))


def text_message(role: Role, text: str) -> Message:
    """A message made of a single text part."""
    return Message(role=role, parts=[TextPart(text)])
