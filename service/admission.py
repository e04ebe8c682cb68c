"""Request admission: who may occupy a request slot of this API process, and for how long.

``Admission`` is a pure ASGI middleware (outermost of the app's own). For every ``/v1/*`` request except the
public ones it checks the bearer key from the headers, before a single body byte is read:

- no key, a malformed, unknown or revoked key: 401 at once, and the connection is closed when a body was
  announced, so clients without a valid key cannot hold body-reading slots; ``/v1/admin/*`` needs the admin key;
- a tenant key: the tenant's token bucket and in-flight count (``service.limits.TenantLimiter``) admit it or
  answer 429 ``rate_limit_exceeded`` / ``too_many_concurrent_requests`` with ``Retry-After``; the in-flight slot
  is held until the response has been sent (streams and uploads included). A body counts one more request per
  ``tenant_request_cost_bytes`` (its announced length up front, the rest once received; a body worth more than
  the burst takes a full bucket): receiving, parsing and decoding bodies is what a flood costs this process, so
  its size is what it costs. A route whose request turns out to be worth several (a chat completion with ``n``
  choices: ``n`` engine requests) takes more slots and tokens through ``hold_more`` (``RequestSlots``), held until
  the response has been sent like the first; After a 429 the server reads and discards the rest of a small body, so the client
  gets to read the answer; a body over ``DRAIN_LIMIT_BYTES`` is not received (``Connection: close``);
- the admin key is exempt from the tenant limits.

Verified keys are remembered for ``auth_cache_ttl_s`` (by their sha256, never in plain text), so admission costs
no database query for most requests; the routes' own dependencies still check the key on every request, so a
revocation takes effect at once for everything past admission.

Every request body (not only ``/v1``) must keep arriving: a wait longer than ``body_read_timeout_s`` for its next
chunk ends the request with 408 ``request_timeout`` and frees its slot. ``cancel_on_disconnect`` runs a route's
long work and cancels it when the client goes away (the estimate route uses it).

All limits are per process: each API replica (uvicorn process or Serve ingress replica) counts on its own.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from fastapi import Request

from service import auth
from service.context import ServiceContext
from service.errors import ApiError, QuotaExceeded, Unauthorized, envelope
from service.limits import AdmissionLimits, Rejection, TenantLimiter, body_limit, request_cost

ASGIApp = Callable[..., Any]
PUBLIC_PATHS = frozenset({"/v1/chat/ready"})  # readiness probes carry no key
ADMIN_PREFIX = "/v1/admin"
_CACHE_MAX = 10_000
T = TypeVar("T")


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a tenant with its limits, or (``tenant_id`` None) the admin."""

    tenant_id: str | None
    limits: AdmissionLimits | None = None


class RequestSlots:
    """What admission holds for one tenant request, in ``request.state.admission``: ``hold_more`` takes more of the
    tenant's concurrent requests and rate for a request found (once parsed) to be worth several; all of them are
    released with the request's own slot."""

    def __init__(self, limiter: TenantLimiter, caller: Caller) -> None:
        self._limiter, self._caller, self.extra = limiter, caller, 0

    def hold_more(self, count: int, why: str) -> None:
        """``count`` more slots (and requests of the rate limit), or ``QuotaExceeded`` (429) saying ``why``."""
        assert self._caller.tenant_id is not None and self._caller.limits is not None
        if count <= 0:
            return
        rejection = self._limiter.acquire(self._caller.tenant_id, self._caller.limits, cost=count, slots=count,
                                          worth=f"; this request counts {count + 1} ({why})")
        if rejection is not None:
            raise QuotaExceeded(rejection.message, code=rejection.code, retry_after_s=rejection.retry_after_s)
        self.extra += count

    def release(self) -> None:
        if self.extra and self._caller.tenant_id is not None:
            self._limiter.release(self._caller.tenant_id, self.extra)
        self.extra = 0


class _BodyRefused(Exception):
    """Raised into the app when its body timed out or grew over the limit."""


class ClientDisconnected(ApiError):
    """Nobody is listening any more; the status only reaches the log."""

    status, type, default_code = 499, "invalid_request_error", "client_disconnected"


class KeyCache:
    """Tenant keys verified recently: sha256 of the key -> (caller, expiry); LRU-bounded."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self._clock = ttl_s, clock
        self._entries: OrderedDict[str, tuple[Caller, float]] = OrderedDict()

    def get(self, digest: str) -> Caller | None:
        entry = self._entries.get(digest)
        if entry is None or entry[1] < self._clock():
            self._entries.pop(digest, None)
            return None
        return entry[0]

    def put(self, digest: str, caller: Caller) -> None:
        if self.ttl_s <= 0:
            return
        self._entries[digest] = (caller, self._clock() + self.ttl_s)
        self._entries.move_to_end(digest)
        while len(self._entries) > _CACHE_MAX:
            self._entries.popitem(last=False)


class _Body:
    """The request's ``receive`` with an idle timeout per body chunk (none once the body is complete) and a cap on
    the body's size, counted as it streams (so a lying or absent Content-Length cannot pass)."""

    def __init__(self, receive: Callable[[], Awaitable[dict[str, Any]]], timeout_s: float, limit: int) -> None:
        self.receive, self.timeout_s, self.limit = receive, timeout_s, limit
        self.complete = self.timed_out = self.too_large = False
        self.received = 0  # body bytes so far

    @property
    def refused(self) -> bool:
        """The app's own answer is dropped (408 or 413 instead)."""
        return self.timed_out or self.too_large

    async def __call__(self) -> dict[str, Any]:
        if self.complete:
            return await self.receive()
        try:
            with anyio.fail_after(self.timeout_s):
                message = await self.receive()
        except TimeoutError:
            self.timed_out = True
            raise _BodyRefused from None
        self.received += len(message.get("body", b""))
        if self.received > self.limit:
            self.too_large = True
            raise _BodyRefused
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.complete = True
        return message


def _declared_length(scope: dict[str, Any]) -> int:
    length = dict(scope.get("headers", [])).get(b"content-length", b"0").strip()
    return int(length) if length.isdigit() else 0


def _body_announced(scope: dict[str, Any]) -> bool:
    headers = dict(scope.get("headers", []))
    length = headers.get(b"content-length", b"0").strip()
    return b"transfer-encoding" in headers or not length.isdigit() or int(length) > 0


# A refused request's body up to this size is received and dropped (so the client reads the 429); a larger one is
# not received at all: the connection closes (receiving 429'd multi-MB bodies was what a flood cost the server).
DRAIN_LIMIT_BYTES = 1 << 20


class Admission:
    """Authenticate from the headers, apply the tenant limits, time out slow bodies (see the module doc)."""

    def __init__(self, app: ASGIApp, ctx: ServiceContext) -> None:
        self.app, self.ctx = app, ctx
        self.limiter = TenantLimiter()
        self.keys = KeyCache(ctx.settings.auth_cache_ttl_s)

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if not path.startswith("/v1/") or path in PUBLIC_PATHS:
            await self._run(scope, receive, send)
            return
        try:
            caller = await self._caller(scope)
        except ApiError as exc:  # no body byte is read for a caller without a valid key
            response = envelope(exc.status, exc.message, exc.type, exc.param, exc.code)
            if _body_announced(scope):
                response.headers["Connection"] = "close"
            await response(scope, receive, send)
            return
        if caller.tenant_id is None or caller.limits is None:
            await self._run(scope, receive, send)
            return
        declared = _declared_length(scope)
        if declared > body_limit(self.ctx.settings, path):  # 413 from the body limit, without using the tenant's budget
            await self._run(scope, receive, send)
            return
        unit = self.ctx.settings.tenant_request_cost_bytes
        cost = request_cost(declared, unit)
        rejection = self.limiter.acquire(caller.tenant_id, caller.limits, cost)
        if rejection is not None:
            response = _too_many(rejection)
            if _declared_length(scope) > DRAIN_LIMIT_BYTES:  # not worth receiving: close instead of draining it
                response.headers["Connection"] = "close"
            await response(scope, receive, send)  # a small body is drained: the client gets to read the 429
            return
        body = _Body(receive, self.ctx.settings.body_read_timeout_s, body_limit(self.ctx.settings, path))
        slots = RequestSlots(self.limiter, caller)
        scope.setdefault("state", {})["admission"] = slots
        try:
            await self._run(scope, body, send)
        finally:
            slots.release()
            self.limiter.release(caller.tenant_id)
            self.limiter.charge(caller.tenant_id, caller.limits, request_cost(body.received, unit) - cost)

    async def _caller(self, scope: dict[str, Any]) -> Caller:
        authorization = dict(scope.get("headers", [])).get(b"authorization")
        token = auth.bearer_token(authorization.decode("latin-1") if authorization else None)
        admin = self.ctx.settings.admin_key.get_secret_value() if self.ctx.settings.admin_key else None
        if auth.is_admin_key(token, admin):
            return Caller(None)
        path = scope["path"]
        if path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/"):
            raise Unauthorized("this endpoint needs the admin key", code="invalid_admin_key")
        digest = auth.hash_key(token)
        caller = self.keys.get(digest)
        if caller is None:
            caller = await anyio.to_thread.run_sync(self._verify, token)
            self.keys.put(digest, caller)
        return caller

    def _verify(self, token: str) -> Caller:
        with self.ctx.sessions() as session:
            tenant = auth.tenant_of_key(session, token)
            overrides = getattr(tenant, "limits", None)
            return Caller(tenant.id, AdmissionLimits.of(self.ctx.settings, overrides if isinstance(overrides, dict)
                                                     else None))

    async def _run(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        """The app, with the body's size limit and timeout: after either, the app's own answer is dropped and
        413 / 408 sent instead (a declared length over the limit is refused before any byte is read)."""
        limit = body_limit(self.ctx.settings, scope["path"])
        if _declared_length(scope) > limit:
            await _refusal(413, scope, limit)(scope, receive, send)
            return
        body = receive if isinstance(receive, _Body) else _Body(receive, self.ctx.settings.body_read_timeout_s, limit)
        started = False

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started
            if body.refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, body, tracked)
        except _BodyRefused:
            pass
        if body.refused and not started:
            status = 408 if body.timed_out else 413
            await _refusal(status, scope, limit, self.ctx.settings.body_read_timeout_s)(scope, body.receive, send)


def _refusal(status: int, scope: dict[str, Any], limit: int, timeout_s: float = 0) -> Any:
    """408 (no body data for ``timeout_s``) or 413 (body over ``limit``), closing the connection: the rest of the
    body is not received."""
    if status == 408:
        response = envelope(408, f"request body not received in time: no data for {timeout_s:g} s "
                                 "(QWENVL_BODY_READ_TIMEOUT_S)", "invalid_request_error", None, "request_timeout")
    else:
        what = "upload" if scope["path"].rstrip("/") == "/v1/files" else "request body"
        response = envelope(413, f"{what} exceeds the limit of {limit} bytes", "invalid_request_error", None,
                            "payload_too_large")
    response.headers["Connection"] = "close"
    return response


def _too_many(rejection: Rejection) -> Any:
    response = envelope(429, rejection.message, "rate_limit_error", None, rejection.code)
    response.headers["Retry-After"] = str(rejection.retry_after_s)
    return response


async def cancel_on_disconnect(request: Request, work: Callable[[], Awaitable[T]]) -> T:
    """``await work()``, cancelled when the client disconnects first (then ``ClientDisconnected``).

    Call it only after the request body has been read: it then waits on the request's ``receive``, which
    answers ``http.disconnect`` once the client is gone.
    """
    outcome: list[tuple[bool, Any]] = []  # (True, result) or (False, the exception work raised)
    async with anyio.create_task_group() as group:
        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            group.cancel_scope.cancel()

        group.start_soon(watch)
        try:
            outcome.append((True, await work()))
        except Exception as exc:  # raised here, not from the group (which would wrap it in an ExceptionGroup)
            outcome.append((False, exc))
        group.cancel_scope.cancel()
    if not outcome:
        raise ClientDisconnected("the client disconnected before the answer was ready")
    ok, value = outcome[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]
