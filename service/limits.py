"""Per-tenant request limits of one API process: a token bucket (requests per second + burst; a request with a
large body counts as several, ``request_cost``), a count of requests in flight, and the estimate slots (one per
tenant, a few in all).

Everything here is in-process state: with several API replicas each enforces its own limits, so a tenant may
get up to ``replicas x`` the configured rate in all. The state is plain dicts under a ``threading.Lock`` (no
asyncio primitive), so it works from any event loop and any thread. ``service.admission`` uses ``TenantLimiter``;
the estimate route (``service.routes.jobs``) uses ``EstimateSlots``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio

from service.settings import Settings

# Settings a tenant's ``limits`` document may override (the admin API accepts them next to the job caps).
ADMISSION_LIMITS = ("tenant_requests_per_second", "tenant_request_burst", "tenant_max_concurrent_requests")


@dataclass(frozen=True)
class AdmissionLimits:
    """One tenant's admission limits; ``0`` rate or concurrency means unlimited."""

    requests_per_second: float
    burst: int
    max_concurrent_requests: int

    @classmethod
    def of(cls, settings: Settings, overrides: Mapping[str, Any] | None = None) -> AdmissionLimits:
        """The settings' defaults, overridden by the tenant's ``limits`` document where it names a setting
        (``tenant_requests_per_second``, ``tenant_request_burst``, ``tenant_max_concurrent_requests``)."""
        values = {name: getattr(settings, name) for name in ADMISSION_LIMITS}
        for name, value in (overrides or {}).items():
            if name in values and isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
                values[name] = value
        return cls(requests_per_second=float(values["tenant_requests_per_second"]),
                   burst=max(1, int(values["tenant_request_burst"])),
                   max_concurrent_requests=int(values["tenant_max_concurrent_requests"]))


_MULTIPART_OVERHEAD = 64 * 1024


def body_limit(settings: Settings, path: str) -> int:
    """The largest request body on ``path``: uploads ``max_upload_bytes`` + multipart overhead; chat completions
    ``max_chat_request_bytes`` (inline base64 images; their count and sizes are then checked by the chat route);
    everything else ``max_request_bytes``. the ``Admission`` middleware answers 413 above it."""
    if path.rstrip("/") == "/v1/files":
        return settings.max_upload_bytes + _MULTIPART_OVERHEAD
    if path.rstrip("/") == "/v1/chat/completions":
        return settings.max_chat_request_bytes
    return settings.max_request_bytes


def request_cost(body_bytes: int, unit_bytes: int) -> int:
    """How many requests of the rate limit a request with a body of ``body_bytes`` counts: 1, plus 1 per
    ``unit_bytes`` (0: always 1)."""
    return 1 + (body_bytes // unit_bytes if unit_bytes > 0 else 0)


@dataclass(frozen=True)
class Rejection:
    """Why a request was refused: 429 with ``code``, ``message`` and ``Retry-After: retry_after_s``."""

    code: str
    message: str
    retry_after_s: int


class _Bucket:
    def __init__(self, burst: int, now: float) -> None:
        self.tokens, self.updated = float(burst), now
        self.rate, self.burst = 0.0, burst  # as last used

    def refill(self, rate: float, burst: int, now: float) -> None:
        self.tokens = min(float(burst), self.tokens + (now - self.updated) * rate)
        self.updated, self.rate, self.burst = now, rate, burst

    def full(self, now: float) -> bool:
        """Refilled by ``now``: the same as a new bucket."""
        return self.tokens + (now - self.updated) * self.rate >= self.burst

    def take(self, rate: float, burst: int, now: float, cost: float) -> float:
        """Take ``cost`` tokens (at most ``burst``); 0 when there were enough, else the seconds until there will be."""
        self.refill(rate, burst, now)
        cost = min(cost, float(burst))
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / rate


class TenantLimiter:
    """Admits a tenant's request (``acquire``) or says why not; ``release`` when the request has finished. Every
    ``prune_every`` rate-limited requests, the buckets that have refilled are dropped (a new one is the same), so the
    process keeps buckets for the tenants active lately, not for every tenant it ever served."""

    prune_every = 1024

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, _Bucket] = {}
        self._in_flight: dict[str, int] = {}
        self._takes = 0

    def acquire(self, tenant_id: str, limits: AdmissionLimits, cost: int = 1, slots: int = 1,
                worth: str = "") -> Rejection | None:
        """Admit a request worth ``cost`` requests of the rate limit (see ``request_cost``) and ``slots`` of the
        tenant's concurrent requests, or say why not (``worth``: why it counts more than one, for the message)."""
        with self._lock:
            busy = self._in_flight.get(tenant_id, 0)
            cap = limits.max_concurrent_requests
            if cap and busy + slots > cap:
                return Rejection("too_many_concurrent_requests",
                                 f"too many concurrent requests: this tenant may have {cap} requests in flight on "
                                 f"this server{worth}; wait for one to finish", 1)
            if limits.requests_per_second > 0:
                now = self._clock()
                self._takes += 1
                if self._takes % self.prune_every == 0:
                    self._buckets = {t: b for t, b in self._buckets.items() if not b.full(now)}
                bucket = self._buckets.setdefault(tenant_id, _Bucket(limits.burst, now))
                wait = bucket.take(limits.requests_per_second, limits.burst, now, cost)
                if wait > 0:
                    worth = worth or (f"; this request counts {cost} (its body's size)" if cost > 1 else "")
                    return Rejection("rate_limit_exceeded",
                                     f"rate limit exceeded: {limits.requests_per_second:g} requests per second "
                                     f"(burst {limits.burst}) for this tenant{worth}; retry after {wait:.2f} s",
                                     max(1, math.ceil(wait)))
            self._in_flight[tenant_id] = busy + slots
            return None

    def charge(self, tenant_id: str, limits: AdmissionLimits, cost: int) -> None:
        """Take ``cost`` more tokens after the fact (a body longer than announced); the bucket may go below 0,
        which delays the tenant's next requests."""
        if cost <= 0 or limits.requests_per_second <= 0:
            return
        with self._lock:
            now = self._clock()
            bucket = self._buckets.setdefault(tenant_id, _Bucket(limits.burst, now))
            bucket.refill(limits.requests_per_second, limits.burst, now)
            bucket.tokens -= cost

    def release(self, tenant_id: str, slots: int = 1) -> None:
        with self._lock:
            left = self._in_flight.get(tenant_id, 0) - slots
            if left > 0:
                self._in_flight[tenant_id] = left
            else:
                self._in_flight.pop(tenant_id, None)

    def in_flight(self, tenant_id: str) -> int:
        with self._lock:
            return self._in_flight.get(tenant_id, 0)


class EstimateBusy(Exception):
    """The tenant already has an estimate in flight."""


class EstimateSlots:
    """At most one estimate in flight per tenant and ``capacity`` estimate workers running at once."""

    POLL_S = 0.05

    def __init__(self, capacity: int) -> None:
        self._lock = threading.Lock()
        self._tenants: set[str] = set()
        self._running = threading.BoundedSemaphore(capacity)

    @asynccontextmanager
    async def hold(self, tenant_id: str, deadline: float) -> AsyncIterator[None]:
        """The tenant's slot and a running slot for the body of the ``async with``. ``EstimateBusy`` when the
        tenant has one already; ``TimeoutError`` when no running slot came free before ``deadline``
        (``time.monotonic`` seconds)."""
        with self._lock:
            if tenant_id in self._tenants:
                raise EstimateBusy(tenant_id)
            self._tenants.add(tenant_id)
        try:
            while not self._running.acquire(blocking=False):
                if time.monotonic() >= deadline:
                    raise TimeoutError("no estimate slot came free")
                await anyio.sleep(self.POLL_S)
            try:
                yield
            finally:
                self._running.release()
        finally:
            with self._lock:
                self._tenants.discard(tenant_id)
