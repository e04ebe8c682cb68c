"""The FastAPI application factory: ``create_app(settings)`` wires database, storage, validator, scheduler and
routes. Nothing happens at import time; ``python -m service`` (``__main__``) serves it with uvicorn.

Every request first passes ``service.admission.Admission`` (the key checked from the headers before any body byte
is read, per-tenant rate and concurrency limits, the slow-body timeout, and the body's size limit from
``service.limits.body_limit``: uploads at ``max_upload_bytes`` plus multipart overhead, chat completions at
``max_chat_request_bytes``, everything else at ``max_request_bytes``, counted as the body streams).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from service.admission import Admission
from service.api_docs import install_docs
from service.context import AdapterHook, ServiceContext
from service.db import make_engine, migrate, session_factory
from service.errors import install_error_handlers
from service.launcher import Launcher, RayJobsLauncher
from service.limits import EstimateSlots
from service.local_bootstrap import bootstrap_local
from service.routes import admin, files, health, jobs, models
from service.scheduler import Scheduler
from service.schemas import ErrorEnvelope
from service.settings import Mode, Settings
from service.storage import TenantStorage
from service.validation import Validator

log = logging.getLogger(__name__)
ASGIApp = Callable[..., Any]


def _lifespan(ctx: ServiceContext) -> Callable[[FastAPI], Any]:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        switch = sys.getswitchinterval()
        if ctx.settings.gil_switch_interval_s > 0:  # see the setting: short requests wait less behind busy threads
            sys.setswitchinterval(ctx.settings.gil_switch_interval_s)
        if ctx.settings.scheduler_enabled:
            ctx.scheduler.start()
        try:
            yield
        finally:
            if ctx.settings.scheduler_enabled:
                ctx.scheduler.stop()
            ctx.validator.shutdown()
            sys.setswitchinterval(switch)

    return lifespan


def build_context(settings: Settings, launcher: Launcher | None = None) -> ServiceContext:
    """Database (migrated), storage, validator and scheduler for ``settings``."""
    engine = make_engine(settings.resolved_database_url, postgres_pool_size=settings.database_pool_size)
    migrate(engine)
    sessions = session_factory(engine)
    if settings.mode is Mode.LOCAL:
        settings = bootstrap_local(settings, sessions)
    storage = TenantStorage(settings.resolved_storage_uri)
    validator = Validator(sessions, storage, settings.validation_timeout_s)
    if launcher is None and settings.ray_address:
        launcher = RayJobsLauncher(settings.ray_address, settings.job_entrypoint, settings.job_entrypoint_num_cpus,
                                   job_environment(settings), settings.job_pythonpath)
    hooks: list[AdapterHook] = []
    ctx = ServiceContext(settings=settings, engine=engine, sessions=sessions, storage=storage, validator=validator,
                         scheduler=None, adapter_hooks=hooks)  # type: ignore[arg-type]
    ctx.scheduler = Scheduler(settings, sessions, storage, validator, launcher, ctx.notify_adapter_ready)
    return ctx


def job_environment(settings: Settings) -> dict[str, str]:
    """Environment the service gives launched jobs (their Ray runtime env, which the Ray dashboard shows): the
    configured ``job_env`` only. No secret: the MLflow login and S3 keys a job's driver uses come from its Ray
    node's environment (``service.launcher``)."""
    return dict(settings.job_env)


def create_app(settings: Settings | None = None, *, launcher: Launcher | None = None,
               on_adapter_ready: AdapterHook | None = None) -> FastAPI:
    """The API. ``on_adapter_ready`` (or ``register_adapter_hook`` later) is how serving learns of new adapters."""
    ctx = build_context(settings or Settings(), launcher)
    if on_adapter_ready is not None:
        ctx.adapter_hooks.append(on_adapter_ready)
    app = FastAPI(title="Qwen-VL platform API", version="1", lifespan=_lifespan(ctx),
                  description="OpenAI-compatible files, fine-tuning jobs and models, multi-tenant.",
                  docs_url=None, redoc_url=None,  # /docs served offline by install_docs; no /redoc
                  responses={400: {"model": ErrorEnvelope}, 401: {"model": ErrorEnvelope},
                             404: {"model": ErrorEnvelope}})
    app.state.ctx = ctx
    install_error_handlers(app)
    for module in (files, jobs, models, admin, health):
        app.include_router(module.router)
    install_docs(app)
    app.add_middleware(Admission, ctx=ctx)  # type: ignore[arg-type]  # outermost: before any body byte is read
    app.state.estimate_slots = EstimateSlots(ctx.settings.max_concurrent_estimates)
    return app


def register_adapter_hook(app: FastAPI, hook: AdapterHook) -> None:
    """Tell ``hook`` about every adapter that becomes ready from now on (the serving layer's entry point)."""
    app.state.ctx.adapter_hooks.append(hook)
