"""``POST /v1/chat/completions`` (OpenAI-compatible, images, streaming) over a ``ChatBackend``.

This module owns the HTTP edge of serving: authorisation of the ``model`` (a base model, or an adapter of the
caller's own tenant; anything else is 404 ``model_not_found``, so other tenants' adapters are not even
confirmed to exist), resolving image references the tenant owns (uploaded file ids, storage URIs) to their
stored size, so that ``ChatLimits`` (from the ``max_chat_*`` settings) are checked before anything is read,
and reading them bounded; mapping engine errors to the service's error envelope (a refused request: 400 naming
the field; a fault in the model server: 500 ``server_error``, never the user's 400; a stopped engine or an
adapter that cannot be loaded: 503), and streaming SSE chunks. Generation itself is behind the
``ChatBackend`` protocol (``qwenvl_core.serving.chat``): ``InProcessBackend`` locally, ``ServeBackend``
(``workflows/serve_app.py``) on Ray Serve.

``GET /metrics`` returns the backend's per-adapter Prometheus metrics (every engine, or every Serve replica);
``GET /v1/chat/ready`` is readiness of the model servers (liveness is the app's ``GET /health``).

Mounting on the control plane: ``mount_chat(app, backend)`` (uses the service's tenant auth and database;
``/metrics`` needs the admin key there, since adapter ids name tenants);
``create_chat_router`` takes every dependency explicitly (used by tests and other hosts).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from qwenvl_core.errors import QwenVLError
from qwenvl_core.serving.chat import (
    DEFAULT_CHAT_LIMITS,
    AdapterLocator,
    AdapterResolver,
    ChatBackend,
    ChatCompletion,
    ChatCompletionRequest,
    ChatLimits,
    ImageResolver,
    StoredImage,
    choice_params,
    collect_completion,
    first_events,
    gives_max_tokens,
    sampling_params,
    sse_stream,
    system_fingerprint,
    to_messages,
)
from qwenvl_core.serving.engine import (
    EngineFault,
    EngineOverloaded,
    EngineRequest,
    EngineStopped,
    EngineTimeout,
)
from qwenvl_core.serving.inline_images import InlineImages, split_inline_images
from qwenvl_core.serving.lora_batch import AdapterError
from qwenvl_core.serving.preparation import RequestError
from qwenvl_core.serving.servable import Refusal, adapter_refusal
from qwenvl_core.storage import CHUNK_BYTES
from service.context import AdapterDeleted
from service.errors import (
    ApiError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    TimedOut,
    Unavailable,
)

FILE_ID_PREFIX = "file-"

# An adapter's servability (``qwenvl_core.serving.servable``: None when it can be served), checked before it is
# sent to the model servers; ``GET /v1/models`` shows the same decision (``service.routes.models.serving_refusal``).
AdapterCheck = Callable[[AdapterLocator], Refusal | None]


class GenerationFailed(ApiError):
    """The model server failed on this request (other requests are unaffected): 500, retrying may succeed."""

    status, type, default_code = 500, "server_error", "generation_failed"


def _tenant_id(tenant: Any) -> str:
    return tenant if isinstance(tenant, str) else str(tenant.id)


def _api_error(exc: Exception) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, AdapterError):
        return Unavailable(f"the adapter could not be loaded: {exc}", param="model", code="adapter_unavailable")
    if isinstance(exc, RequestError):
        return InvalidRequest(str(exc), param=exc.param, code=exc.code or "invalid_value")
    if isinstance(exc, EngineOverloaded):
        return QuotaExceeded(str(exc), code="engine_overloaded", retry_after_s=exc.retry_after_s)
    if isinstance(exc, EngineTimeout):
        return TimedOut(str(exc), code="generation_timeout")
    if isinstance(exc, EngineStopped):
        return Unavailable(f"{exc}; retry shortly", code="engine_stopped")
    if isinstance(exc, EngineFault):
        return GenerationFailed(str(exc))
    if isinstance(exc, QwenVLError):  # refused while preparing the request (e.g. its text cannot be encoded)
        return InvalidRequest(str(exc), param="messages", code="invalid_value")
    raise exc


class _InlineImageRequest(Request):
    """A request whose ``body()`` (what FastAPI parses) is the body without its large data-URL images
    (``split_inline_images``); the payloads are in ``state.inline_images``."""

    async def body(self) -> bytes:
        if not hasattr(self, "_reduced_body"):
            self._reduced_body, self.state.inline_images = split_inline_images(await super().body())
        return self._reduced_body


class InlineImageRoute(APIRoute):
    """A route whose JSON body is parsed without its large data-URL images: parsing a 19 MB body on the event loop
    would hold the GIL ~20 ms and stall every other tenant's requests. The payloads reach the endpoint as
    ``request.state.inline_images`` (FastAPI's documented custom-request-class pattern)."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            request = _InlineImageRequest(request.scope, request.receive)
            await request.body()
            return await handler(request)

        return handle


def create_chat_router(
    backend: ChatBackend,
    *,
    adapter_resolver: AdapterResolver,
    tenant_dependency: Callable[..., Any],
    image_resolver: ImageResolver | None = None,
    metrics_dependency: Callable[..., Any] | None = None,
    limits: ChatLimits = DEFAULT_CHAT_LIMITS,
    adapter_check: AdapterCheck | None = None,
) -> APIRouter:
    """The chat routes; ``tenant_dependency`` is a FastAPI dependency giving the caller's tenant (id or row).

    ``adapter_check``: why an adapter cannot be served (400 with that reason and code); by default
    ``servable.adapter_refusal`` on the backend's base models (their families unknown here).

    ``metrics_dependency`` guards ``GET /metrics`` (e.g. the admin key); ``None`` leaves it open, as Prometheus
    scrapers usually expect on a private network.
    """
    router = APIRouter(tags=["chat"], route_class=InlineImageRoute)
    check = adapter_check or (lambda locator: adapter_refusal(locator.base_model, locator.uri,
                                                              dict.fromkeys(backend.base_models())))

    async def target(model: str, tenant_id: str) -> tuple[str, AdapterLocator | None]:
        if model in backend.base_models():
            return model, None
        locator = await run_in_threadpool(adapter_resolver, model, tenant_id)
        if locator is None:
            raise NotFound(f"the model {model!r} does not exist", param="model", code="model_not_found")
        refusal = await run_in_threadpool(check, locator)
        if refusal is not None:
            raise InvalidRequest(f"the model {model!r} cannot be served: {refusal.reason}", param="model",
                                 code=refusal.code)
        return locator.base_model, locator

    @router.post("/v1/chat/completions", operation_id="chat-completions", response_model=ChatCompletion)
    async def chat_completions(body: ChatCompletionRequest, request: Request,
                               tenant: Any = Depends(tenant_dependency)) -> Any:  # noqa: B008
        tenant_id = _tenant_id(tenant)
        base, locator = await target(body.model, tenant_id)
        resolve = (lambda ref: image_resolver(ref, tenant_id)) if image_resolver else None
        inline: InlineImages = request.state.inline_images
        try:
            params = choice_params(body, sampling_params(body, limits.default_max_tokens), limits)  # one per choice
            admission = getattr(request.state, "admission", None)  # the tenant limits (the control plane's app)
            if admission is not None and len(params) > 1:  # each choice is an engine request: n count n
                admission.hold_more(len(params) - 1, f"its {len(params)} choices")
            messages = await run_in_threadpool(to_messages, body, resolve, limits, inline)
            adapter = {"adapter_id": locator.adapter_id, "adapter_locator": locator.uri} if locator else {}
            default = not gives_max_tokens(body)
            streams = [backend.stream(base, EngineRequest(messages, p, **adapter, default_max_tokens=default,
                                                          streamed=bool(body.stream)))
                       for p in params]
            fingerprint = system_fingerprint(base, locator.adapter_id if locator else None)
            if not body.stream:
                return await collect_completion(body.model, streams, fingerprint=fingerprint,
                                                logprobs=bool(body.logprobs))
            firsts = await first_events(streams)  # errors in preparing the requests still get a proper status
        except Exception as exc:
            raise _api_error(exc) from exc
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(sse_stream(body.model, streams, include_usage, firsts, fingerprint=fingerprint,
                                            logprobs=bool(body.logprobs)),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @router.get("/v1/chat/ready", operation_id="chat-ready")
    async def chat_ready() -> dict[str, Any]:
        if not await backend.ready():
            raise Unavailable("the model servers are not ready", code="not_ready")
        return {"status": "ok", "base_models": backend.base_models()}

    guards = [Depends(metrics_dependency)] if metrics_dependency else []

    @router.get("/metrics", operation_id="serving-metrics", dependencies=guards, response_class=Response,
                responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def serving_metrics() -> Response:
        """Per-adapter serving metrics of every engine / replica, Prometheus text format."""
        return Response(await backend.metrics(), media_type=CONTENT_TYPE_LATEST)

    return router


# ----- the control plane's implementations ----------------------------------------------------------------------
def service_adapter_resolver(ctx: Any) -> AdapterResolver:
    """Adapter ids from the service database: only the tenant's own, not deleted, models, and the stored
    checkpoints of its jobs (``ft:…:ckpt-step-N``, ``service.lineage``)."""
    from service import lineage

    def resolve(model_id: str, tenant_id: str) -> AdapterLocator | None:
        with ctx.sessions() as session:
            try:
                found = lineage.find(session, tenant_id, model_id)
            except NotFound:
                return None
            return AdapterLocator(adapter_id=found.id, base_model=found.base_model, uri=found.adapter_uri)

    return resolve


def service_image_resolver(ctx: Any) -> ImageResolver:
    """Uploaded file ids and storage URIs, only inside the tenant's own part of the storage, sized from the file's
    row or the object's metadata (a stat / HEAD); the object is read later, and only up to the caller's limit."""
    from service import repository as repo

    def resolve(reference: str, tenant_id: str) -> StoredImage:
        storage = ctx.storage
        if reference.startswith(FILE_ID_PREFIX):
            with ctx.sessions() as session:
                row = repo.get_file(session, tenant_id=tenant_id, file_id=reference, param="image_url")
                key, size = storage.file_key(tenant_id, row.id, row.filename), row.bytes
        else:
            try:
                key = storage.key_of_uri(reference)
            except ValueError:
                raise NotFound(f"no image at {reference!r}", param="image_url", code="file_not_found") from None
            own = storage.key_of_uri(f"{storage.root_uri}/tenants/{tenant_id}") + "/"
            if not key.startswith(own) or ".." in key.split("/"):
                raise PermissionDenied(f"{reference!r} is not in your storage", param="image_url")
            size = storage.size(key)
            if size is None:
                raise NotFound(f"no image at {reference!r}", param="image_url", code="file_not_found")
        return StoredImage(size, lambda limit: read_at_most(storage, key, limit))

    return resolve


def read_at_most(storage: Any, key: str, limit: int) -> bytes:
    """The first ``limit`` bytes of an object (all of it when smaller), read in chunks."""
    chunks, size = [], 0
    with storage.open(key) as stream:
        while size < limit and (chunk := stream.read(min(CHUNK_BYTES, limit - size))):
            chunks.append(chunk)
            size += len(chunk)
    return b"".join(chunks)


def chat_limits(settings: Any) -> ChatLimits:
    """The route's ``ChatLimits`` from the service settings (``max_chat_*``, ``chat_default_max_tokens``)."""
    return ChatLimits(max_images=settings.max_chat_images, max_image_bytes=settings.max_chat_image_bytes,
                      max_image_bytes_total=settings.max_chat_image_bytes_total,
                      default_max_tokens=settings.chat_default_max_tokens)


def mount_chat(app: FastAPI, backend: ChatBackend) -> None:
    """Add the chat route to the control-plane app (``service.main.create_app``), with its auth and database."""
    from service.deps import current_tenant, require_admin
    from service.routes.models import serving_refusal

    ctx = app.state.ctx
    ctx.served_models = backend.base_models
    app.include_router(create_chat_router(backend, adapter_resolver=service_adapter_resolver(ctx),
                                          tenant_dependency=current_tenant,
                                          image_resolver=service_image_resolver(ctx),
                                          metrics_dependency=require_admin, limits=chat_limits(ctx.settings),
                                          adapter_check=lambda loc: serving_refusal(ctx, loc.base_model, loc.uri)))
    ctx.deleted_hooks.append(eviction_hook(backend))


def eviction_hook(backend: ChatBackend) -> Callable[[AdapterDeleted], None]:
    """A deletion hook that evicts the adapter from the serving replicas (called from a request's worker thread)."""
    import anyio.from_thread

    def evict(event: AdapterDeleted) -> None:
        anyio.from_thread.run(backend.evict, event.base_model, event.model_id)

    return evict


def standalone_app(backend: ChatBackend, *, adapter_resolver: AdapterResolver, api_keys: dict[str, str],
                   image_resolver: ImageResolver | None = None, limits: ChatLimits = DEFAULT_CHAT_LIMITS) -> FastAPI:
    """A chat-only app without the control plane: static ``Bearer`` keys (key -> tenant id), for local serving."""
    from fastapi import Header

    from service.errors import Unauthorized, install_error_handlers

    def tenant(authorization: str | None = Header(default=None)) -> str:
        token = (authorization or "").removeprefix("Bearer ").strip()
        if token not in api_keys:
            raise Unauthorized("invalid API key")
        return api_keys[token]

    app = FastAPI(title="Qwen-VL chat")
    install_error_handlers(app)
    app.include_router(create_chat_router(backend, adapter_resolver=adapter_resolver, tenant_dependency=tenant,
                                          image_resolver=image_resolver, limits=limits))

    @app.get("/health", operation_id="health-live")
    def health() -> dict[str, str]:
        """Liveness: the process answers (readiness of the model servers is ``GET /v1/chat/ready``)."""
        return {"status": "ok"}

    return app
