"""The full production Serve application, importable by ``serve run`` and a KubeRay RayService:
``workflows.app:app`` (an application builder; everything comes from ``QWENVL_*`` environment variables).

The ingress is the control-plane FastAPI app (``service.main.create_app(Settings())``) with the chat route
mounted (``service.routes.chat.mount_chat``); one model deployment per entry of ``QWENVL_BASE_MODELS`` (model id ->
local model directory on every serving node), with replicas / autoscaling, CPUs / GPUs and the number of LoRA
adapters per replica from the ``serve_*`` settings. Run it with::

    serve run workflows.app:app            # on a running Ray cluster (RAY_ADDRESS)

The ingress builds the API on its own replica (``control_plane_app``), so the database engine, scheduler and
validator live there; with several ingress replicas the scheduler is leader-elected through the database.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from service.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from qwenvl_core.serving.chat import ChatBackend


def model_configs(settings: Settings) -> list[Any]:
    """One ``ModelDeploymentConfig`` per base model, from the ``serve_*`` settings (and the ``max_chat_image*``
    limits, which each replica's engine re-checks)."""
    from qwenvl_core.serving.engine import EngineConfig
    from workflows.serve_app import ModelDeploymentConfig

    engine = EngineConfig(max_images_per_request=settings.max_chat_images,
                          max_image_bytes=settings.max_chat_image_bytes,
                          max_image_bytes_total=settings.max_chat_image_bytes_total,
                          max_batch_size=settings.serve_max_batch_size,
                          decode_graphs=settings.serve_decode_graphs,
                          max_total_tokens=settings.serve_max_total_tokens,
                          prefill_chunk_tokens=settings.serve_prefill_chunk_tokens,
                          kv_cache_bytes=settings.serve_kv_cache_bytes,
                          adapter_slots=settings.serve_adapter_slots,
                          vision_adapter_bytes=settings.serve_vision_adapter_bytes,
                          max_lora_rank=settings.serve_max_lora_rank,
                          max_waiting=settings.serve_max_waiting,
                          request_timeout_s=settings.serve_request_timeout_s,
                          stall_timeout_s=settings.serve_stall_timeout_s or None)  # 0: never

    autoscaling = None
    if settings.serve_max_replicas is not None:
        autoscaling = {"min_replicas": settings.serve_replicas, "max_replicas": settings.serve_max_replicas,
                       "target_ongoing_requests": target_ongoing_requests(settings)}
    return [ModelDeploymentConfig(base_model=model_id, model_dir=model_dir,
                                  max_adapters_per_replica=settings.serve_max_adapters_per_replica,
                                  num_replicas=settings.serve_replicas, autoscaling_config=autoscaling,
                                  num_cpus=settings.serve_num_cpus, num_gpus=settings.serve_num_gpus,
                                  dtype=settings.serve_dtype, quantization=settings.serve_quantization,
                                  stream_interval_s=settings.serve_stream_interval_ms / 1000,
                                  engine_process=settings.serve_engine_process, engine=engine)
            for model_id, model_dir in settings.base_models.items()]


def target_ongoing_requests(settings: Settings) -> float:
    """Serve's autoscaling target per model replica: the set one, else half the replica's batch (its set size, or
    the engine's default for the replica's device), so replicas are added while the running ones still have room
    for the requests that arrive during a new one's start (minutes for a GPU replica loading its model)."""
    import torch

    from qwenvl_core.serving.engine import EngineConfig, resolve_config

    if settings.serve_target_ongoing_requests is not None:
        return settings.serve_target_ongoing_requests
    device = torch.device("cuda" if settings.serve_num_gpus > 0 else "cpu")
    return resolve_config(EngineConfig(max_batch_size=settings.serve_max_batch_size), device).max_batch_size / 2


def control_plane_app(backend: ChatBackend) -> FastAPI:
    """The ingress ASGI app: the control plane (settings from the environment) plus the chat route."""
    from service.main import create_app
    from service.routes.chat import mount_chat

    api = create_app(Settings())
    mount_chat(api, backend)
    return api


def app(args: dict[str, str] | None = None) -> Any:
    """Serve application builder (``serve run workflows.app:app``); ``args`` are unused: configure with env vars."""
    from workflows.serve_app import build_app

    settings = Settings()
    return build_app(model_configs(settings), control_plane_app, ingress_replicas=settings.serve_ingress_replicas,
                     ingress_max_ongoing_requests=settings.max_ongoing_requests)
