"""``ObjectResponse`` closes the stored object it streams however the response ends: sent whole, or cut by a
client that went away (ASGI 2.4 servers report that as a failed ``send``; older ones as ``http.disconnect``, which
cancels the sending task), with no garbage collection in between (it was off in these tests)."""

from __future__ import annotations

import asyncio
import gc
import io

import pytest
from starlette.requests import ClientDisconnect

from qwenvl_core.storage import CHUNK_BYTES
from service.downloads import ObjectResponse

BODY = b"x" * (3 * CHUNK_BYTES + 5)


@pytest.fixture(autouse=True)
def no_gc():
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _scope(spec_version: str) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}}


def _call(response: ObjectResponse, spec_version: str, send, receive=None) -> None:
    async def never_disconnects() -> dict:
        await asyncio.Event().wait()
        return {}

    asyncio.run(response(_scope(spec_version), receive or never_disconnects, send))


def test_a_whole_download_sends_every_byte_and_closes_the_object():
    stream, sent = io.BytesIO(BODY), []

    async def send(message: dict) -> None:
        sent.append(message)

    _call(ObjectResponse(stream, "application/octet-stream", {"Content-Length": str(len(BODY))}), "2.4", send)
    assert b"".join(m.get("body", b"") for m in sent) == BODY
    assert stream.closed


def test_a_client_gone_mid_download_closes_the_object_at_once_asgi_2_4():
    stream, bodies = io.BytesIO(BODY), []

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body":
            bodies.append(message["body"])
            if len(bodies) == 2:
                raise OSError("the client closed the connection")

    with pytest.raises(ClientDisconnect):
        _call(ObjectResponse(stream, "application/octet-stream", {}), "2.4", send)
    assert len(bodies) == 2 and stream.closed


def test_a_client_gone_mid_download_closes_the_object_at_once_asgi_2_0():
    stream, bodies = io.BytesIO(BODY), []
    gone = asyncio.Event()

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body":
            bodies.append(message["body"])
            gone.set()
            await asyncio.Event().wait()  # the client reads no further: the send blocks until it is cancelled

    async def receive() -> dict:
        await gone.wait()
        return {"type": "http.disconnect"}

    _call(ObjectResponse(stream, "application/octet-stream", {}), "2.0", send, receive)
    assert len(bodies) == 1 and stream.closed
