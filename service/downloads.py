"""Download responses: an open stored object streamed as the HTTP body, and closed however the response ends.

Starlette's ``StreamingResponse`` iterates a sync iterator in its thread pool and, when the client goes away,
drops the iterator where it stands: the stream behind it (a local file, or an S3 body that holds one of the
store's pooled HTTP connections) was closed only when the garbage collector finalised the abandoned generators.
Enough abandoned downloads would hold every pooled connection, so that other tenants' reads wait.
``ObjectResponse`` closes the stream when the response ends: sent, failed, or cut by a disconnect (anyio waits for
the thread reading a chunk before a cancellation goes on, so nothing is reading when it is closed).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import IO

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from qwenvl_core.storage import iter_chunks


class ObjectResponse(StreamingResponse):
    """``stream`` as the response body, in ``CHUNK_BYTES`` chunks; the response owns and closes it."""

    def __init__(self, stream: IO[bytes], media_type: str, headers: Mapping[str, str]) -> None:
        super().__init__(iter_chunks(stream), media_type=media_type, headers=headers)
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.stream.close()
