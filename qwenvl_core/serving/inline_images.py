"""Large inline images kept out of the JSON parse of a chat request.

A chat request may carry images as ``data:image/...;base64,`` URLs of up to ~27 MB of text each. Parsing such a
body with ``json.loads`` (or pydantic) holds the GIL for the whole string (~20 ms for 19 MB), and the API's event
loop, which serves every tenant, stalls meanwhile. ``split_inline_images`` finds the large ``"url": "data:..."``
values in the raw body with byte searches only (``bytes.find``: memchr speed, no per-character Python work),
replaces each by a short placeholder, and keeps the payload as a zero-copy view of the body. The remaining JSON is
small and parsed as usual; ``InlineImages.decode`` turns a placeholder back into the image's bytes, decoding the
base64 in slices off the event loop (``images.decode_data_url``).

Only values that are plain base64 are taken out: a value whose payload holds a backslash (a JSON escape such as
``\\/``) or any other doubt stays in the JSON and is parsed the ordinary way, so the parsed request is the same
either way. Placeholders carry a random per-request nonce, so a client cannot name another payload.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field

from qwenvl_core.images import base64_size, decode_data_url

MIN_INLINE_PAYLOAD = 64 * 1024
"""Payloads shorter than this (characters) stay in the JSON: parsing them costs little."""

_VALUE_START = b'"data:'
_MAX_HEADER = 512
# What must precede the value: the ``url`` key of an ``image_url`` object and its colon (JSON whitespace allowed).
_URL_KEY = re.compile(rb'"url"[ \t\r\n]*:[ \t\r\n]*\Z')
_KEY_WINDOW = 32


@dataclass
class InlineImages:
    """The payloads taken out of one request body, by placeholder."""

    nonce: str = field(default_factory=lambda: secrets.token_hex(8))
    payloads: dict[str, tuple[str, memoryview]] = field(default_factory=dict)

    def add(self, header: str, payload: memoryview) -> str:
        placeholder = f"inline-image:{self.nonce}:{len(self.payloads)}"
        self.payloads[placeholder] = (header, payload)
        return placeholder

    def __contains__(self, url: object) -> bool:
        return url in self.payloads

    def size(self, placeholder: str) -> int:
        """Decoded bytes of the payload, from its length (nothing is decoded)."""
        _, payload = self.payloads[placeholder]
        return base64_size(len(payload), payload[-2:].tobytes())

    def decode(self, placeholder: str, max_bytes: int) -> bytes:
        """The image's bytes (base64-decoded in slices); ``ImageError`` for a bad header or payload."""
        header, payload = self.payloads[placeholder]
        return decode_data_url(header, payload, 0, max_bytes)[0]


def split_inline_images(body: bytes, min_payload: int = MIN_INLINE_PAYLOAD) -> tuple[bytes, InlineImages]:
    """``body`` with every large ``"url": "data:...;base64,..."`` value replaced by a placeholder string, and the
    payloads by placeholder. A body without such values is returned unchanged (the same object)."""
    inline = InlineImages()
    pieces: list[bytes | memoryview] = []
    view, done = memoryview(body), 0
    start = body.find(_VALUE_START)
    while start >= 0:
        taken = _inline_value(body, start, min_payload)
        if taken is None:
            start = body.find(_VALUE_START, start + 1)
            continue
        comma, end = taken
        header = body[start + 1:comma].decode("ascii")
        pieces += [view[done:start], b'"', inline.add(header, view[comma + 1:end]).encode(), b'"']
        done = end + 1
        start = body.find(_VALUE_START, done)
    if not inline.payloads:
        return body, inline
    pieces.append(view[done:])
    return b"".join(pieces), inline


def _inline_value(body: bytes, start: int, min_payload: int) -> tuple[int, int] | None:
    """(comma, closing quote) of the string value opening at ``start`` when it can be taken out, else None."""
    if not _URL_KEY.search(body, max(start - _KEY_WINDOW, 0), start):
        return None
    comma = body.find(b",", start, start + _MAX_HEADER)
    if comma < 0 or body.find(b'"', start + 1, comma) >= 0 or body.find(b"\\", start, comma) >= 0:
        return None
    end = body.find(b'"', comma)
    if end < 0 or end - comma - 1 < min_payload or body.find(b"\\", comma, end) >= 0:
        return None
    try:
        body[start + 1:comma].decode("ascii")
    except UnicodeDecodeError:
        return None
    return comma, end
