"""The Ray Serve application: an HTTP ingress (the control-plane FastAPI app, or a chat-only app) and one model
deployment per base model, with Ray Serve model multiplexing over LoRA adapters.

This module owns
- ``ModelDeploymentConfig`` and ``model_deployment``: a deployment whose replicas each hold the base weights once
  (a ``ServingEngine``, in a process of its own by default: ``engine_process``) and up to
  ``max_adapters_per_replica`` adapters. The adapter loader is ``@serve.multiplexed``, so Serve routes a request
  for an adapter to a replica that already holds it (or is loading it) and evicts least-recently-used adapters
  (our ``AdapterCache`` uses the same bound and also evicts when Serve unloads); adapters are fetched on first use
  from local disk or S3: nothing is preloaded, so an adapter written after the application started is served
  without a restart.
  ``check_health`` (Serve's liveness probe) fails when the engine (its process or model thread) died; ``ready``
  is the readiness call.
- ``ServeBackend``: the ``ChatBackend`` the ingress uses; it forwards each request to the base model's deployment
  with ``DeploymentHandle.options(multiplexed_model_id=<adapter id>)`` and streams the engine events back.
- ``build_app``: the application from an ASGI-app builder (called on the ingress replica with the backend, so
  nothing unpicklable such as database engines crosses processes) and the model configs;
  ``RunsRootResolver``: an ``AdapterResolver`` over the service's storage layout, for running without the
  control-plane database.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import pickle
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from qwenvl_core.runs import ADAPTER_CONFIG_FILE, ADAPTER_DIR, RunDir
from qwenvl_core.serving.chat import AdapterLocator, ChatBackend
from qwenvl_core.serving.engine import EngineConfig, EngineEvent, EngineRequest, join_events
from qwenvl_core.serving.metrics import merge_expositions
from qwenvl_core.storage import join_key, open_store

APP_NAME = "qwenvl"
CKPT_STEP = "ckpt-step-"  # a checkpoint's model id ends in :ckpt-step-N (OpenAI's shape; service.lineage)
METRICS_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ModelDeploymentConfig:
    """One base model's deployment: where its weights are, replicas, adapters per replica, engine limits."""

    base_model: str
    model_dir: str
    max_adapters_per_replica: int = 8
    num_replicas: int = 1
    autoscaling_config: dict[str, Any] | None = None  # Serve's (min/max_replicas, target_ongoing_requests...)
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    max_ongoing_requests: int = 64
    # A stream's events leave the replica at most this often (the first at once), each joining the tokens made
    # meanwhile: every item Serve streams costs ~0.6 ms of CPU (docs/benchmarks.md); 0: each one when ready.
    stream_interval_s: float = 0.05
    # The engine in a process of its own (``engine_process``), so its model thread shares no GIL with the replica's
    # streaming; False: a thread of the replica's process.
    engine_process: bool = True
    engine: EngineConfig = field(default_factory=EngineConfig)
    dtype: str | None = None  # "bfloat16" to serve (Q-)LoRA adapters on a bf16 base
    quantization: Literal["none", "4bit"] = "none"  # "4bit": the LM in NF4, as Q-LoRA trained (see EngineConfig)

    @property
    def deployment_name(self) -> str:
        return f"model-{self.base_model}"

    def replica_engine_config(self) -> EngineConfig:
        """One replica's ``EngineConfig``: the engine limits with the adapter bound and quantization, the device
        (Ray makes the replica's GPUs visible as cuda:0..), and on a GPU shared with other work (``num_gpus`` < 1)
        a KV cache budget cut to the replica's share (``kv_cache_memory_fraction`` of the free memory, times
        ``num_gpus``; a set ``kv_cache_bytes`` is taken as it is)."""
        share = min(1.0, self.num_gpus) if self.num_gpus > 0 else 1.0
        return EngineConfig(**{**asdict(self.engine), "max_adapters": self.max_adapters_per_replica,
                               "quantization": self.quantization,
                               "device": "cuda" if self.num_gpus > 0 else "cpu",
                               "kv_cache_memory_fraction": self.engine.kv_cache_memory_fraction * share})


# The locator of the adapter a request names, for Serve's multiplexed loader, which is given only the id (a
# per-request value, not a table of every adapter the replica ever served)
_LOCATOR: contextvars.ContextVar[str | None] = contextvars.ContextVar("qwenvl_adapter_locator", default=None)


class _ServedAdapter:
    """What Serve's multiplexing cache holds per adapter; Serve calls ``__del__`` when it evicts it."""

    def __init__(self, engine: Any, adapter_id: str) -> None:
        self._engine, self.adapter_id, self._released = engine, adapter_id, False

    def __del__(self) -> None:
        if not self._released:
            self._released = True
            self._engine.unload_adapter(self.adapter_id)  # keeps the downloaded copy: the adapter still exists


class ModelServerBase:
    """The body of a model replica; ``model_deployment`` adds the ``@serve.multiplexed`` loader."""

    def __init__(self, config: ModelDeploymentConfig) -> None:
        self.config = config
        self.engine: Any
        if config.engine_process:
            from qwenvl_core.serving.engine_process import EngineProcess

            self.engine = EngineProcess(config.model_dir, config.replica_engine_config(), dtype=config.dtype)
        else:
            import torch

            from qwenvl_core.serving.engine import ServingEngine

            self.engine = ServingEngine.from_model_dir(config.model_dir, config.replica_engine_config(),
                                                       dtype=getattr(torch, config.dtype) if config.dtype else None,
                                                       metrics=_replica_metrics())
            self.engine.start()

    def __del__(self) -> None:
        """Serve calls this when it stops the replica: end the model thread (or process) and remove the adapter
        downloads."""
        engine = getattr(self, "engine", None)  # absent when loading the model failed
        if engine is not None:
            engine.close()

    async def _load(self, adapter_id: str) -> _ServedAdapter:
        locator = _LOCATOR.get()  # Serve's multiplexing awaits the loader in the request's own task
        if locator is None:
            raise ValueError(f"adapter {adapter_id}: no locator")
        await asyncio.to_thread(self.engine.load_adapter, adapter_id, locator)
        return _ServedAdapter(self.engine, adapter_id)

    async def stream(self, request: EngineRequest) -> AsyncIterator[bytes]:
        """The request's events as they leave the replica (``to_wire``): a streamed one's at most one a
        ``stream_interval_s``, one that is not streamed to its client as one event at its end."""
        if request.adapter_id is not None:
            if request.adapter_locator is None:
                raise ValueError(f"adapter {request.adapter_id}: no locator")
            token = _LOCATOR.set(request.adapter_locator)
            try:
                await self.get_adapter(serve.get_multiplexed_model_id() or request.adapter_id)  # type: ignore[attr-defined]
            finally:
                _LOCATOR.reset(token)
        if not request.streamed:
            yield to_wire(join_events([event async for event in self.engine.stream(request, coalesce=0)]))
            return
        async for event in self.engine.stream(request, coalesce=self.config.stream_interval_s):
            yield to_wire(event)

    async def evict(self, adapter_id: str) -> bool:
        return self.engine.evict_adapter(adapter_id)

    async def ready(self) -> bool:
        return self.engine.alive

    async def replica_stats(self) -> dict[str, Any]:
        """The engine's adapter cache and counters, and the garbage collector of the replica's process (``gc_*``)
        and of the engine's (``engine_gc_*``; the same process unless ``engine_process``)."""
        engine = await asyncio.to_thread(self.engine.replica_stats)
        return {**engine, "replica": serve.get_replica_context().replica_id.unique_id,
                "engine_gc_frozen": engine["gc_frozen"], "engine_gc_tracked": engine["gc_tracked"],
                "gc_frozen": gc.get_freeze_count(), "gc_tracked": len(gc.get_objects())}

    async def metrics(self) -> bytes:
        """This replica's Prometheus metrics (text format)."""
        return await asyncio.to_thread(self.engine.metrics_text)

    async def replica_metrics(self) -> tuple[str, bytes]:
        """``(replica id, metrics)``: what ``ServeBackend.metrics`` collects from every replica by broadcast."""
        return serve.get_replica_context().replica_id.unique_id, await self.metrics()

    def check_health(self) -> None:
        problem = self.engine.problem()
        if problem is not None:
            raise RuntimeError(problem)


def _replica_metrics() -> Any:
    from prometheus_client import CollectorRegistry

    from qwenvl_core.serving.metrics import ServingMetrics

    return ServingMetrics(CollectorRegistry())


def model_deployment(config: ModelDeploymentConfig) -> Any:
    """A Serve deployment for one base model (the multiplexing bound is fixed per deployment)."""

    class ModelServer(ModelServerBase):
        @serve.multiplexed(max_num_models_per_replica=config.max_adapters_per_replica)
        async def get_adapter(self, adapter_id: str) -> _ServedAdapter:
            return await self._load(adapter_id)

    options: dict[str, Any] = {
        "name": config.deployment_name,
        "ray_actor_options": {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
        "max_ongoing_requests": config.max_ongoing_requests,
        "health_check_period_s": 5,
    }
    if config.autoscaling_config:
        options["autoscaling_config"] = config.autoscaling_config
    else:
        options["num_replicas"] = config.num_replicas
    return serve.deployment(**options)(ModelServer)


def to_wire(event: EngineEvent) -> bytes:
    """An event as a model replica streams it: pickled here, the C pickler with the classes by reference, not by
    Ray's serializer, whose path for this application's classes takes longer: the same streams carry ~1.3x the
    tokens a second (docs/benchmarks.md). Both ends are this application's deployments inside one Ray cluster,
    whose own transfer of the event would be a pickle too."""
    return pickle.dumps(event, protocol=pickle.HIGHEST_PROTOCOL)


def from_wire(item: bytes) -> EngineEvent:
    """The event ``to_wire`` sent (on the ingress)."""
    return pickle.loads(item)


class ServeBackend:
    """``ChatBackend`` over the model deployments of a Serve application (handles are looked up lazily)."""

    def __init__(self, deployments: dict[str, str], app_name: str = APP_NAME) -> None:
        self.deployments, self.app_name = deployments, app_name
        self._handles: dict[str, DeploymentHandle] = {}

    def _handle(self, base_model: str) -> DeploymentHandle:
        if base_model not in self._handles:
            self._handles[base_model] = serve.get_deployment_handle(self.deployments[base_model], self.app_name)
        return self._handles[base_model]

    def base_models(self) -> list[str]:
        return list(self.deployments)

    async def stream(self, base_model: str, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        handle = self._handle(base_model).options(stream=True, multiplexed_model_id=request.adapter_id or "")
        try:
            async for item in handle.stream.remote(request):
                yield from_wire(item)
        except Exception as exc:
            cause = getattr(exc, "cause", None)  # RayTaskError: re-raise the replica's own exception
            if isinstance(cause, Exception):
                raise cause from None
            raise

    async def evict(self, base_model: str, adapter_id: str) -> None:
        """Evict on the replica Serve routes this adapter to (the one holding it)."""
        await self._handle(base_model).options(multiplexed_model_id=adapter_id).evict.remote(adapter_id)

    async def ready(self) -> bool:
        results = await asyncio.gather(*(self._handle(b).ready.remote() for b in self.deployments))
        return all(results)

    async def metrics(self) -> bytes:
        """Every replica's metrics (``DeploymentHandle.broadcast``), labelled ``base_model`` and ``replica``.

        A deployment whose replicas do not answer within ``METRICS_TIMEOUT_S`` (or have none) is left out, so
        one stuck model never blocks the scrape of the others; replicas that failed are skipped the same way.
        """
        async def gather(base: str) -> list[tuple[dict[str, str], bytes]]:
            try:
                answers = await self._handle(base).broadcast("replica_metrics").results_async(
                    timeout_s=METRICS_TIMEOUT_S, return_exceptions=True)
            except Exception:  # no running replica, or the broadcast timed out
                return []
            return [({"base_model": base, "replica": replica}, text) for replica, text in
                    (a for a in answers if not isinstance(a, BaseException))]

        per_model = await asyncio.gather(*(gather(b) for b in self.deployments))
        return merge_expositions(part for parts in per_model for part in parts)


AppBuilder = Callable[[ChatBackend], FastAPI]


def build_app(models: list[ModelDeploymentConfig], app_builder: AppBuilder, *, app_name: str = APP_NAME,
              ingress_cpus: float = 0.25, ingress_replicas: int = 1, ingress_max_ongoing_requests: int = 256) -> Any:
    """The Serve application: ``app_builder(backend)`` runs on each ingress replica; one deployment per model.

    ``ingress_max_ongoing_requests`` is how many requests one ingress replica works on at once (Serve's default,
    5, would let five slow clients block the API; tenants' own limits are the app's, ``service.admission``).

    Run it with ``serve.run(build_app(...), name=app_name, route_prefix="/")`` (``app_name`` must match).
    """
    backend = ServeBackend({m.base_model: m.deployment_name for m in models}, app_name)

    @serve.deployment(name="ingress", num_replicas=ingress_replicas, ray_actor_options={"num_cpus": ingress_cpus},
                      max_ongoing_requests=ingress_max_ongoing_requests)
    @serve.ingress(lambda: app_builder(backend))
    class Ingress:
        def __init__(self, *model_servers: DeploymentHandle) -> None:
            self.model_servers = model_servers  # bound so the deployments belong to this application

    return Ingress.bind(*(model_deployment(m).bind(m) for m in models))


class RunsRootResolver:
    """Adapters in the service's storage layout, ``{root}/tenants/{tenant}/runs/{job_id}/adapter``, and the adapters
    of its checkpoints, ``.../runs/{job_id}/checkpoints/{job_id}/step_{N:08d}/adapter`` (``qwenvl_core.runs``).

    Model ids are ``ft:{base}:{tenant}:{suffix}:{job_id}`` and a checkpoint's ``ft:{base}:{tenant}:{suffix}:{job_id}:
    ckpt-step-{N}``; a tenant resolves only ids naming itself, and only while the adapter exists (deleting the
    directory, or Ray Train removing an old checkpoint, makes it unservable at once).
    """

    def __init__(self, root_uri: str) -> None:
        self.root_uri = root_uri.rstrip("/")

    def __call__(self, model_id: str, tenant_id: str) -> AdapterLocator | None:
        parts = model_id.split(":")
        step = None
        if len(parts) == 6 and parts[5].startswith(CKPT_STEP) and parts[5][len(CKPT_STEP):].isdigit():
            step, parts = int(parts[5][len(CKPT_STEP):]), parts[:5]
        if len(parts) != 5 or parts[0] != "ft" or parts[2] != tenant_id or not all(parts[:3] + parts[4:]):
            return None
        base, job_id = parts[1], parts[4]
        if "/" in job_id or job_id in (".", ".."):
            return None
        run = RunDir(f"{self.root_uri}/tenants/{tenant_id}/runs/{job_id}")
        uri = run.uri_of(ADAPTER_DIR) if step is None else run.checkpoint_adapter_uri(job_id, step)
        store, prefix = open_store(uri)
        if not store.exists(join_key(prefix, ADAPTER_CONFIG_FILE)):
            return None
        return AdapterLocator(adapter_id=model_id, base_model=base, uri=uri)
