"""Image loading with size limits, for every model family.

This module owns turning an ``ImageSource`` (filesystem path, ``data:image/...;base64,`` URL, raw bytes or a
PIL image) into a fully decoded RGB PIL image, refusing oversized, corrupt, truncated or non-image input with
an ``ImageError`` that names the source and the reason, and the sizes of encoded sources known without decoding
them (for budgets checked first) and an image's width and height read from its header (``image_size``, for
token counts that depend on it). Nothing is downloaded: URLs other than data URLs are not image sources. Turning
a decoded image into model input is the family processor's job (v1: ``qwenvl_core.models.qwen_vl.images``).
Pillow and numpy only (no torch).
"""

from __future__ import annotations

import binascii
import io
import re
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from qwenvl_core.conversation import ImageSource
from qwenvl_core.errors import ImageError

# The header of a data URL (everything before the first comma); the payload is never run through a regex: on a
# 20 MB image ``re.sub`` alone held the GIL for ~130 ms, stalling every other request of the process.
_DATA_URL_HEADER = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[^;,]*)*?);base64$")
_MAX_DATA_URL_HEADER = 512
_BASE64_WHITESPACE = b" \t\n\r\f\v"
# Data URL payloads are copied and decoded in slices of this many characters (a multiple of 4): each C call holds
# the GIL ~1 ms, and other threads (the API's event loop) run between slices; one call over a 20 MB payload held
# it ~50 ms.
_SLICE = 1 << 20
# Errors Pillow raises for broken files while decoding.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)


@dataclass(frozen=True)
class ImageLimits:
    """Limits checked before an image is decoded."""

    max_bytes: int = 20 * 1024 * 1024
    """Largest encoded image (file, data URL payload or bytes) accepted, in bytes."""
    max_pixels: int = 50_000_000
    """Largest width x height accepted (read from the header, before decoding)."""


DEFAULT_IMAGE_LIMITS = ImageLimits()
T = TypeVar("T")


def load_image(
    source: ImageSource, *, base_dir: str | Path | None = None, limits: ImageLimits = DEFAULT_IMAGE_LIMITS
) -> Image.Image:
    """Load ``source`` as a fully decoded RGB image, enforcing ``limits``.

    Relative paths are resolved against ``base_dir`` (default: the working directory).
    """
    if isinstance(source, Image.Image):
        return _from_pil(source, limits)
    return _by_source(source, base_dir, lambda data, label: _decode(data, label, limits),
                      lambda path: _decode(_read_file(path, limits), str(path), limits), limits)


def image_size(
    source: ImageSource, *, base_dir: str | Path | None = None, limits: ImageLimits = DEFAULT_IMAGE_LIMITS
) -> tuple[int, int]:
    """``(width, height)`` of ``source`` read from its header, without decoding the pixels, under ``limits``
    (bytes and pixels; the same errors as ``load_image``). A file is opened, not read whole; a data URL's payload is
    base64-decoded. What the full decode finds (a truncated file) is left to ``load_image``. For token counts of
    families whose image spans depend on the size."""
    if isinstance(source, Image.Image):
        label = f"PIL image ({source.mode} {source.width}x{source.height})"
        _check_pixels(source.width, source.height, label, limits)
        return source.size
    return _by_source(source, base_dir, lambda data, label: _header_size(data, label, limits),
                      lambda path: _header_size_of_file(path, limits), limits)


def _by_source(source: ImageSource, base_dir: str | Path | None, on_data: Callable[[bytes, str], T],
               on_path: Callable[[Path], T], limits: ImageLimits) -> T:
    """``on_data(bytes, label)`` for raw bytes and data URLs, ``on_path(path)`` for files; remote URLs and other
    types are refused (one dispatch for ``load_image`` and ``image_size``)."""
    if isinstance(source, bytes | bytearray):
        return on_data(bytes(source), f"bytes ({len(source)} bytes)")
    if isinstance(source, str) and source.startswith("data:"):
        return on_data(*_read_data_url(source, limits))
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        raise ImageError(f"image {source[:80]}: remote URLs are not fetched; pass a file, bytes or data URL")
    if isinstance(source, str | Path):
        return on_path(_resolve(source, base_dir))
    raise ImageError(f"unsupported image source of type {type(source).__name__}")


def _header_size_of_file(path: Path, limits: ImageLimits) -> tuple[int, int]:
    _check_file(path, limits)
    try:
        with path.open("rb") as fh:
            return _header_size(fh, str(path), limits)
    except OSError as exc:
        raise ImageError(f"image {path}: cannot be read ({exc.strerror or exc})") from exc


def _header_size(data: bytes | BinaryIO, label: str, limits: ImageLimits) -> tuple[int, int]:
    if isinstance(data, bytes):
        _check_bytes(data, label, limits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = _open(data, label)
    _check_pixels(image.width, image.height, label, limits)
    return image.size


def encoded_size(source: ImageSource, *, base_dir: str | Path | None = None) -> int:
    """Bytes ``source`` holds before decoding, known without reading or decoding it: a data URL's payload from
    its length (exact for unwrapped base64), raw bytes, a file's size (0 when missing: loading reports it), 0 for
    an already decoded PIL image. For budgets checked before any image is decoded."""
    if isinstance(source, bytes | bytearray):
        return len(source)
    if isinstance(source, str) and source.startswith("data:"):
        return data_url_size(source)
    if isinstance(source, str | Path) and not str(source).startswith(("http://", "https://")):
        path = _resolve(source, base_dir)
        return path.stat().st_size if path.is_file() else 0
    return 0


def data_url_size(url: str) -> int:
    """Decoded bytes of a ``data:...;base64,`` URL's payload, from its length (nothing is copied or decoded); an
    upper bound when the payload is wrapped with whitespace."""
    return base64_size(len(url) - url.find(",") - 1, url[-2:])


def base64_size(n_chars: int, tail: str | bytes) -> int:
    """Decoded bytes of ``n_chars`` base64 characters ending in ``tail`` (their last two characters)."""
    padding = tail[-2:].count("=" if isinstance(tail, str) else b"=")
    return max(n_chars * 3 // 4 - padding, 0)


def _resolve(source: str | Path, base_dir: str | Path | None) -> Path:
    path = Path(source).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return path


def _check_file(path: Path, limits: ImageLimits) -> None:
    if not path.exists():
        raise ImageError(f"image {path}: not found")
    if not path.is_file():
        raise ImageError(f"image {path}: not a regular file")
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise ImageError(f"image {path}: too many bytes ({size} > limit {limits.max_bytes})")


def _read_file(path: Path, limits: ImageLimits) -> bytes:
    _check_file(path, limits)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageError(f"image {path}: cannot be read ({exc.strerror or exc})") from exc


def _read_data_url(url: str, limits: ImageLimits) -> tuple[bytes, str]:
    """Decode a ``data:image/...;base64,`` URL; returns (payload, label)."""
    comma = url.find(",", 0, _MAX_DATA_URL_HEADER)
    if comma < 0:
        raise ImageError(f"image data URL ({url[:40]!r}...): not a base64 data URL (data:image/...;base64,...)")
    return decode_data_url(url[:comma], url, comma + 1, limits.max_bytes)


def decode_data_url(header: str, source: str | memoryview, start: int, max_bytes: int) -> tuple[bytes, str]:
    """Decode a data URL given as its header (everything before the first comma) and its base64 payload
    ``source[start:]`` (text, or the bytes of a request body: see ``qwenvl_core.serving.inline_images``), in
    slices; returns (the decoded bytes, a label naming the URL for errors)."""
    match = _DATA_URL_HEADER.match(header)
    if match is None:
        raise ImageError(
            f"image data URL ({header[:40]!r}...): not a base64 data URL (data:image/...;base64,...)"
        )
    mime = (match["mime"] or "").lower()
    label = f"data URL ({mime or 'no media type'}, {len(header) + 1 + len(source) - start} chars)"
    if mime and not mime.startswith("image/"):
        raise ImageError(f"image {label}: not an image (media type {mime})")
    try:
        payload = _base64_text(source, start)
    except UnicodeEncodeError:
        raise ImageError(f"image {label}: invalid base64 payload (non-ASCII characters)") from None
    if len(payload) * 3 // 4 > max_bytes:
        raise ImageError(f"image {label}: too many bytes (about {len(payload) * 3 // 4} > limit {max_bytes})")
    try:
        return _b64decode_in_slices(payload), label
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"image {label}: invalid base64 payload") from exc


def _base64_text(source: str | memoryview, start: int) -> bytearray:
    """``source[start:]`` as ASCII bytes without line-wrapping whitespace, one ``_SLICE`` per C call."""
    text = bytearray()
    for i in range(start, len(source), _SLICE):
        piece = source[i:i + _SLICE]
        text += (piece.encode("ascii") if isinstance(piece, str) else piece.tobytes()).translate(
            None, _BASE64_WHITESPACE)
    return text


def _b64decode_in_slices(text: bytearray) -> bytes:
    """Strict base64 decoding (alphabet, padding only at the end) of ``text``, one ``_SLICE`` per C call."""
    if len(text) % 4:
        raise binascii.Error("incorrect padding")
    view, out = memoryview(text), bytearray()
    for i in range(0, len(text), _SLICE):
        if i + _SLICE < len(text) and text.find(b"=", i, i + _SLICE) >= 0:
            raise binascii.Error("padding inside the data")
        out += binascii.a2b_base64(view[i:i + _SLICE], strict_mode=True)
    return bytes(out)


def _decode(data: bytes, label: str, limits: ImageLimits) -> Image.Image:
    """Check size from the header, then decode fully and convert to RGB."""
    _check_bytes(data, label, limits)
    with warnings.catch_warnings():
        # Our own max_pixels check replaces Pillow's warning; its hard limit still raises.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = _open(data, label)
        _check_pixels(image.width, image.height, label, limits)
        _load(image, label)
    return to_rgb(image, label)


def _check_bytes(data: bytes, label: str, limits: ImageLimits) -> None:
    if len(data) > limits.max_bytes:
        raise ImageError(f"image {label}: too many bytes ({len(data)} > limit {limits.max_bytes})")
    if not data:
        raise ImageError(f"image {label}: empty, not an image")


def _open(data: bytes | BinaryIO, label: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image {label}: too many pixels ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"image {label}: not an image or unsupported format") from exc
    except _DECODE_ERRORS as exc:
        raise ImageError(f"image {label}: truncated or corrupt header ({exc})") from exc


def _check_pixels(width: int, height: int, label: str, limits: ImageLimits) -> None:
    if width < 1 or height < 1:
        raise ImageError(f"image {label}: empty image ({width}x{height})")
    if width * height > limits.max_pixels:
        raise ImageError(
            f"image {label}: too many pixels ({width}x{height} = {width * height} > limit {limits.max_pixels})"
        )


def _load(image: Image.Image, label: str) -> None:
    """Decode all pixel data; truncated files fail (``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False)."""
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image {label}: too many pixels ({exc})") from exc
    except _DECODE_ERRORS as exc:
        raise ImageError(f"image {label}: truncated or corrupt ({exc})") from exc


def _from_pil(image: Image.Image, limits: ImageLimits) -> Image.Image:
    label = f"PIL image ({image.mode} {image.width}x{image.height})"
    _check_pixels(image.width, image.height, label, limits)
    _load(image, label)
    return to_rgb(image, label)


def to_rgb(image: Image.Image, label: str = "image") -> Image.Image:
    """A new RGB image from any Pillow mode (alpha dropped as in the official ``convert("RGB")``).

    16-bit and 32-bit integer grey images are scaled to 8 bits instead of being clipped; float images are
    clipped to [0, 255].
    """
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8bit_grey(image)
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(f"image {label}: unsupported colour mode {image.mode}") from exc


def _to_8bit_grey(image: Image.Image) -> Image.Image:
    """Scale integer grey images to 8 bits (16-bit range, or the image's own range above it)."""
    arr = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        top = 255.0
    elif image.mode.startswith("I;16"):
        top = 65535.0
    else:  # "I": 32-bit ints holding 8-bit, 16-bit or wider data
        peak = float(arr.max(initial=0.0))
        top = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
    scaled = np.clip(arr, 0.0, top) * (255.0 / top)
    return Image.fromarray(np.rint(scaled).astype(np.uint8))  # uint8 2-D -> mode "L"

