"""``POST /v1/chat/completions`` (OpenAI-compatible, images, streaming) over a ``ChatBackend``.

This module owns the HTTP edge of serving: authorisation of the ``model`` (a base model, or an adapter of the
caller's own tenant; anything else is 404 ``model_not_found``, so other tenants' adapters are not even
confirmed to exist), resolving image references the tenant owns (uploaded file ids, storage URIs), mapping
engine errors to the service's error envelope, and streaming SSE chunks. Generation itself is behind the
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

from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from qwenvl_core.conversation import ImageSource
from qwenvl_core.errors import QwenVLError
from qwenvl_core.serving.chat import (
    AdapterLocator,
    AdapterResolver,
    ChatBackend,
    ChatCompletion,
    ChatCompletionRequest,
    ChatRequestError,
    ImageResolver,
    collect_completion,
    sampling_params,
    sse_stream,
    to_messages,
)
from qwenvl_core.serving.engine import EngineRequest
from qwenvl_core.serving.lora_batch import AdapterError
from service.context import AdapterDeleted
from service.errors import ApiError, InvalidRequest, NotFound, PermissionDenied, Unavailable

FILE_ID_PREFIX = "file-"


def _tenant_id(tenant: Any) -> str:
    return tenant if isinstance(tenant, str) else str(tenant.id)


def _api_error(exc: Exception) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, AdapterError):
        return Unavailable(f"the adapter could not be loaded: {exc}", param="model", code="adapter_unavailable")
    if isinstance(exc, ChatRequestError):
        return InvalidRequest(str(exc), param=exc.param, code="invalid_value")
    if isinstance(exc, QwenVLError):
        return InvalidRequest(str(exc), code="invalid_value")
    raise exc


def create_chat_router(
    backend: ChatBackend,
    *,
    adapter_resolver: AdapterResolver,
    tenant_dependency: Callable[..., Any],
    image_resolver: ImageResolver | None = None,
    metrics_dependency: Callable[..., Any] | None = None,
) -> APIRouter:
    """The chat routes; ``tenant_dependency`` is a FastAPI dependency giving the caller's tenant (id or row).

    ``metrics_dependency`` guards ``GET /metrics`` (e.g. the admin key); ``None`` leaves it open, as Prometheus
    scrapers usually expect on a private network.
    """
    router = APIRouter(tags=["chat"])

    async def target(model: str, tenant_id: str) -> tuple[str, AdapterLocator | None]:
        if model in backend.base_models():
            return model, None
        locator = await run_in_threadpool(adapter_resolver, model, tenant_id)
        if locator is None or locator.base_model not in backend.base_models():
            raise NotFound(f"the model {model!r} does not exist", param="model", code="model_not_found")
        return locator.base_model, locator

    @router.post("/v1/chat/completions", operation_id="chat-completions", response_model=ChatCompletion)
    async def chat_completions(body: ChatCompletionRequest, tenant: Any = Depends(tenant_dependency)) -> Any:  # noqa: B008
        tenant_id = _tenant_id(tenant)
        base, locator = await target(body.model, tenant_id)
        resolve = (lambda ref: image_resolver(ref, tenant_id)) if image_resolver else None
        try:
            messages = await run_in_threadpool(to_messages, body, resolve)
            request = EngineRequest(messages, sampling_params(body), adapter_id=locator.adapter_id if locator else None,
                                    adapter_locator=locator.uri if locator else None)
            events = backend.stream(base, request)
            if not body.stream:
                return await collect_completion(body.model, events)
            first = await anext(events)  # errors in preparing the request still get a proper status
        except Exception as exc:
            raise _api_error(exc) from exc
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(sse_stream(body.model, events, include_usage, first), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

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
    """Adapter ids from the service database: only the tenant's own, not deleted, models."""
    from service import repository as repo

    def resolve(model_id: str, tenant_id: str) -> AdapterLocator | None:
        with ctx.sessions() as session:
            try:
                row = repo.get_model(session, tenant_id=tenant_id, model_id=model_id)
            except NotFound:
                return None
            return AdapterLocator(adapter_id=row.id, base_model=row.base_model, uri=row.adapter_uri)

    return resolve


def service_image_resolver(ctx: Any) -> ImageResolver:
    """Uploaded file ids and storage URIs, only inside the tenant's own part of the storage."""
    from service import repository as repo

    def resolve(reference: str, tenant_id: str) -> ImageSource:
        storage = ctx.storage
        if reference.startswith(FILE_ID_PREFIX):
            with ctx.sessions() as session:
                row = repo.get_file(session, tenant_id=tenant_id, file_id=reference, param="image_url")
                key = storage.file_key(tenant_id, row.id, row.filename)
        else:
            try:
                key = storage.key_of_uri(reference)
            except ValueError:
                raise NotFound(f"no image at {reference!r}", param="image_url", code="file_not_found") from None
            own = storage.key_of_uri(f"{storage.root_uri}/tenants/{tenant_id}") + "/"
            if not key.startswith(own) or ".." in key.split("/"):
                raise PermissionDenied(f"{reference!r} is not in your storage", param="image_url")
        with storage.open(key) as stream:
            return stream.read()

    return resolve


def mount_chat(app: FastAPI, backend: ChatBackend) -> None:
    """Add the chat route to the control-plane app (``service.main.create_app``), with its auth and database."""
    from service.deps import current_tenant, require_admin

    ctx = app.state.ctx
    app.include_router(create_chat_router(backend, adapter_resolver=service_adapter_resolver(ctx),
                                          tenant_dependency=current_tenant,
                                          image_resolver=service_image_resolver(ctx),
                                          metrics_dependency=require_admin))
    ctx.deleted_hooks.append(eviction_hook(backend))


def eviction_hook(backend: ChatBackend) -> Callable[[AdapterDeleted], None]:
    """A deletion hook that evicts the adapter from the serving replicas (called from a request's worker thread)."""
    import anyio.from_thread

    def evict(event: AdapterDeleted) -> None:
        anyio.from_thread.run(backend.evict, event.base_model, event.model_id)

    return evict


def standalone_app(backend: ChatBackend, *, adapter_resolver: AdapterResolver, api_keys: dict[str, str],
                   image_resolver: ImageResolver | None = None) -> FastAPI:
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
                                          image_resolver=image_resolver))

    @app.get("/health", operation_id="health-live")
    def health() -> dict[str, str]:
        """Liveness: the process answers (readiness of the model servers is ``GET /v1/chat/ready``)."""
        return {"status": "ok"}

    return app
