"""Large data-URL images taken out of a chat body before it is parsed (``qwenvl_core.serving.inline_images``).

The property that matters: the request the endpoint sees is the same as if the whole body had been parsed, for
any body, and the decoded images are byte-identical; anything doubtful stays in the JSON.
"""

from __future__ import annotations

import base64
import json
import os

import pytest

from qwenvl_core.errors import ImageError
from qwenvl_core.serving.chat import ChatCompletionRequest, ChatLimits, ChatRequestError, to_messages
from qwenvl_core.serving.inline_images import split_inline_images
from qwenvl_core.serving.preparation import RequestError

MIN = 64  # a small threshold, so the tests stay small


def _url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def _restore(value: object, inline) -> object:
    """The parsed reduced body with every placeholder put back as the data URL it replaced."""
    if isinstance(value, dict):
        return {k: _restore(v, inline) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore(v, inline) for v in value]
    if isinstance(value, str) and value in inline:
        header, payload = inline.payloads[value]
        return header + "," + payload.tobytes().decode("ascii")
    return value


def _body(*parts: dict, **extra: object) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": list(parts)}], **extra}


def _image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


RAW = [os.urandom(n) for n in (200, 301, 1000)]

BODIES = {
    "two large images": _body(_image(_url(RAW[0])), _image(_url(RAW[1], "image/jpeg")), {"type": "text", "text": "x"}),
    "small image stays": _body(_image(_url(b"tiny"))),
    "text that looks like a data URL": _body({"type": "text", "text": _url(RAW[2])}),
    "key that is not url": _body({"type": "text", "text": "a", "note": _url(RAW[2])}),
    "escaped slashes (JSON \\/)": _body(_image(_url(RAW[2]))),  # encoded below with every / written \/
    "pretty-printed": None,  # filled below: whitespace between key, colon and value
    "string content": {"model": "m", "messages": [{"role": "user", "content": _url(RAW[2])}]},
    "unicode around": _body({"type": "text", "text": "é \"url\": ü"}, _image(_url(RAW[2]))),
}


def _encoded(name: str, body: dict | None) -> bytes:
    if name == "pretty-printed":
        return json.dumps(_body(_image(_url(RAW[2]))), indent=4).encode()
    if name.startswith("escaped slashes"):
        return json.dumps(body).replace("/", "\\/").encode()
    return json.dumps(body, ensure_ascii=False).encode()


@pytest.mark.parametrize("name", list(BODIES))
def test_parsing_the_reduced_body_gives_the_same_request(name):
    raw = _encoded(name, BODIES[name])
    reduced, inline = split_inline_images(raw, min_payload=MIN)
    assert _restore(json.loads(reduced), inline) == json.loads(raw)
    taken = {"two large images": 2, "pretty-printed": 1, "unicode around": 1}.get(name, 0)
    assert len(inline.payloads) == taken
    if taken:
        assert len(reduced) < len(raw) - 200 * taken
    else:
        assert reduced is raw


def test_images_decode_to_the_same_bytes_and_sizes_are_exact():
    raw = _encoded("two large images", BODIES["two large images"])
    reduced, inline = split_inline_images(raw, min_payload=MIN)
    request = ChatCompletionRequest.model_validate_json(reduced)
    messages = to_messages(request, None, inline=inline)
    images = [part.source for part in messages[0].parts[:2]]
    assert images == RAW[:2]
    assert [inline.size(p) for p in inline.payloads] == [len(RAW[0]), len(RAW[1])]


def test_a_placeholder_needs_the_request_nonce():
    raw = _encoded("two large images", BODIES["two large images"])
    _, inline = split_inline_images(raw, min_payload=MIN)
    _, other = split_inline_images(raw, min_payload=MIN)
    assert not set(inline.payloads) & set(other.payloads)  # a client cannot guess another request's names
    forged = json.dumps(_body(_image(next(iter(inline.payloads))))).encode()
    reduced, fresh = split_inline_images(forged, min_payload=MIN)
    request = ChatCompletionRequest.model_validate_json(reduced)
    with pytest.raises(ChatRequestError, match="only data: image URLs"):
        to_messages(request, None, inline=fresh)


def test_bad_payloads_are_refused_naming_the_part():
    bad = json.dumps(_body({"type": "text", "text": "x"},
                           _image("data:image/png;base64," + "A" * 101 + "!" * 3))).encode()
    reduced, inline = split_inline_images(bad, min_payload=MIN)
    assert len(inline.payloads) == 1
    with pytest.raises(ChatRequestError, match=r"messages\[0\]\.content\[1\].*invalid base64") as info:
        to_messages(ChatCompletionRequest.model_validate_json(reduced), None, inline=inline)
    assert info.value.param == "messages[0].content[1]" and info.value.code == "invalid_image"
    not_image = json.dumps(_body(_image(_url(RAW[2], "text/plain")))).encode()
    reduced, inline = split_inline_images(not_image, min_payload=MIN)
    with pytest.raises(ImageError, match="not an image"):
        inline.decode(next(iter(inline.payloads)), 10_000)


def test_inline_images_count_against_the_size_limits():
    raw = _encoded("two large images", BODIES["two large images"])
    reduced, inline = split_inline_images(raw, min_payload=MIN)
    request = ChatCompletionRequest.model_validate_json(reduced)
    with pytest.raises(RequestError, match="the limit is 250 bytes per image"):
        to_messages(request, None, ChatLimits(max_image_bytes=250), inline=inline)
    with pytest.raises(RequestError, match="the limit is 400"):
        to_messages(request, None, ChatLimits(max_image_bytes_total=400), inline=inline)
