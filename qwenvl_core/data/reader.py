"""Streaming record readers for JSONL files and JSON-list files, with line numbers.

``iter_records`` yields one ``Record`` per sample without loading the file: JSONL is read line by line; a JSON
list is decoded element by element with ``json.JSONDecoder.raw_decode`` over a buffer that is refilled in
growing chunks and trimmed as elements are consumed, so memory is bounded by the largest element (capped by
``max_record_bytes``), not by the file; a JSONL line longer than ``max_record_bytes`` is an issue at its line and
is skipped unread (a line's size is otherwise only bounded by the file's). A syntax error becomes a ``Record``
carrying an ``Issue`` at the right line; in a JSONL file reading continues with the next line, in a JSON list it
stops (the rest cannot be re-synchronised reliably). Values Python's ``json`` accepts but the rest of the platform cannot hold are syntax
errors too (``_decode``): nesting deeper than the recursion limit, integers longer than
``sys.get_int_max_str_digits()``, and strings or keys with an unpaired surrogate (``"\\ud800"``), which cannot be
encoded as UTF-8 and so could be neither stored, hashed nor reported. So every yielded value is UTF-8 clean.
"""

from __future__ import annotations

import codecs
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO

from qwenvl_core.data.issues import Issue, Location

_CHUNK = 1 << 16
_DEFAULT_MAX_RECORD = 64 << 20
_DECODER = json.JSONDecoder()
_WS = " \t\r\n"
_CUT_SLACK = 8  # a literal or escape cut by the buffer end fails within this many characters of it
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # needed (not sufficient) for a surrogate in the value


class Container(StrEnum):
    JSONL = "jsonl"
    JSON_LIST = "json"


@dataclass(frozen=True)
class Record:
    """One decoded JSON value (``issue`` is None) or one syntax problem (``value`` is None)."""

    location: Location
    value: Any = None
    issue: Issue | None = None


def detect_container(path: Path) -> Container:
    """JSON list if the first non-blank character is ``[``, JSONL otherwise (extension is only a hint)."""
    with path.open("rb") as f:
        head = f.read(_CHUNK)
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff" + _WS)
    return Container.JSON_LIST if text.startswith("[") else Container.JSONL


def iter_records(path: Path, display_name: str | None = None, max_record_bytes: int = _DEFAULT_MAX_RECORD
                 ) -> Iterator[Record]:
    """Yield the records of ``path`` (JSONL or JSON list), in order, with their locations."""
    name = display_name or path.name
    with path.open("rb") as f:
        if detect_container(path) is Container.JSON_LIST:
            yield from _JsonListReader(f, name, max_record_bytes).records()
        else:
            yield from _iter_jsonl(f, name, max_record_bytes)


def _syntax(name: str, line: int, message: str, index: int | None = None) -> Record:
    loc = Location(name, line, index)
    return Record(loc, issue=Issue("json_syntax", message, loc))


class _Refused(Exception):
    """A value that is valid JSON syntax but cannot be accepted; the message says why."""


def _decode(text: str, pos: int = 0, *, whole: bool = False) -> tuple[Any, int]:
    """Decode the JSON value at ``text[pos:]`` (all of ``text`` when ``whole``); the value and where it ends.

    Syntax errors raise ``json.JSONDecodeError``; a value that decodes but cannot be accepted raises ``_Refused``.
    The surrogate check walks the value only when the text holds a ``\\uD800``-``\\uDFFF`` escape.
    """
    try:
        value, end = (json.loads(text), len(text)) if whole else _DECODER.raw_decode(text, pos)
        if _SURROGATE_ESCAPE.search(text, pos, end):
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except json.JSONDecodeError:
        raise
    except UnicodeEncodeError as e:
        raise _Refused(f"\\u escape of an unpaired surrogate (U+{ord(e.object[e.start]):04X}), which is not "
                       "a character") from None
    except RecursionError:
        raise _Refused(f"nesting too deep (lists and objects nested about {sys.getrecursionlimit()} levels or "
                       "more)") from None
    except ValueError:  # int() of a number longer than the interpreter's limit
        raise _Refused(f"a number is too long (more than {sys.get_int_max_str_digits()} digits)") from None
    return value, end


def _lines(f: BinaryIO, max_bytes: int) -> Iterator[bytes | None]:
    """Each line of ``f``, or None for a line longer than ``max_bytes`` (read past in chunks, never held)."""
    while raw := f.readline(max_bytes + 1):
        if len(raw) > max_bytes and not raw.endswith(b"\n"):
            while (rest := f.readline(_CHUNK)) and not rest.endswith(b"\n"):
                pass
            yield None
        else:
            yield raw


def _iter_jsonl(f: BinaryIO, name: str, max_record_bytes: int) -> Iterator[Record]:
    index = 0
    for lineno, raw in enumerate(_lines(f, max_record_bytes), 1):
        if raw is None:
            yield _syntax(name, lineno, f"the line is longer than {max_record_bytes} bytes, the limit of one sample",
                          index)
            index += 1
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield _syntax(name, lineno, f"not valid UTF-8 (byte {e.start + 1} of the line)", index)
            index += 1
            continue
        if lineno == 1:
            text = text.lstrip("\ufeff")
        if not text.strip():
            continue
        try:
            value = _decode(text, whole=True)[0]
        except json.JSONDecodeError as e:
            yield _syntax(name, lineno, f"invalid JSON: {e.msg} (column {e.colno})", index)
        except _Refused as e:
            yield _syntax(name, lineno, f"invalid JSON: {e}", index)
        else:
            yield Record(Location(name, lineno, index), value)
        index += 1


class _JsonListReader:
    """Incremental decoder of ``[v0, v1, ...]``: tracks the buffer, the cursor and the cursor's line."""

    def __init__(self, f: BinaryIO, name: str, max_record_bytes: int) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._f, self._name, self._max = f, name, max_record_bytes
        self._buf, self._pos, self._line, self._eof = "", 0, 1, False

    def records(self) -> Iterator[Record]:
        try:
            yield from self._records()
        except UnicodeDecodeError:
            yield _syntax(self._name, self._line, "not valid UTF-8")

    def _records(self) -> Iterator[Record]:
        self._fill()
        self._buf = self._buf.lstrip("\ufeff")
        if self._peek() != "[":
            yield _syntax(self._name, self._line, "expected a JSON list of samples")
            return
        self._pos += 1
        index = 0
        if self._peek() == "]":
            return
        while True:
            record = self._element(index)
            yield record
            if record.issue is not None:
                return
            index += 1
            sep = self._peek()
            self._pos += 1
            if sep == "]":
                return
            if sep != ",":
                found = repr(sep) if sep else "end of file"
                yield _syntax(self._name, self._line, f"expected ',' or ']' after element {index - 1}, "
                              f"found {found}", index)
                return

    def _element(self, index: int) -> Record:
        if not self._peek():
            return _syntax(self._name, self._line, "unexpected end of file inside the list", index)
        start_line = self._line
        while True:
            try:
                value, end = _decode(self._buf, self._pos)
            except json.JSONDecodeError as e:
                if self._eof or len(self._buf) - self._pos > self._max or not self._maybe_cut(e):
                    line = start_line + self._buf.count("\n", self._pos, e.pos)
                    return _syntax(self._name, line, f"invalid JSON in element {index}: {e.msg}", index)
                self._read(max(_CHUNK, len(self._buf)))
                continue
            except _Refused as e:  # final: more text cannot make a value shallower, shorter or paired
                return _syntax(self._name, start_line, f"invalid JSON in element {index}: {e}", index)
            if end == len(self._buf) and not self._eof:
                self._read(_CHUNK)  # a number may continue in the next chunk: decode again with more text
                continue
            self._advance(end)
            return Record(Location(self._name, start_line, index), value)

    def _maybe_cut(self, e: json.JSONDecodeError) -> bool:
        """Whether the error may only mean "the element continues past the buffer" (else it is final)."""
        return e.msg.startswith("Unterminated string") or e.pos >= len(self._buf) - _CUT_SLACK

    def _peek(self) -> str:
        """Skip whitespace (refilling as needed) and return the next character, or '' at end of file."""
        while True:
            while self._pos < len(self._buf) and self._buf[self._pos] in _WS:
                if self._buf[self._pos] == "\n":
                    self._line += 1
                self._pos += 1
            if self._pos < len(self._buf):
                return self._buf[self._pos]
            if self._eof:
                return ""
            self._read(_CHUNK)

    def _advance(self, end: int) -> None:
        self._line += self._buf.count("\n", self._pos, end)
        self._pos = end

    def _read(self, size: int) -> None:
        if self._pos > len(self._buf) // 2:
            self._buf, self._pos = self._buf[self._pos:], 0
        data = self._f.read(size)
        self._eof = not data
        self._buf += self._decoder.decode(data, final=self._eof)

    def _fill(self) -> None:
        self._read(_CHUNK)
