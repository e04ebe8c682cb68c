"""``workflows.app``: the Serve application builder the RayService and compose file import (without Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from qwenvl_core.serving.chat import InProcessBackend
from service.settings import Settings
from tests.infra.isolated import run_python
from workflows.app import control_plane_app, target_ongoing_requests

ADMIN_KEY = "admin-key-for-infra-tests-0123456789"


_MODEL_CONFIGS = """
import json, sys
from service.settings import Settings
from workflows.app import model_configs
print(json.dumps([{"base_model": c.base_model, "model_dir": c.model_dir, "replicas": c.num_replicas,
                   "autoscaling": c.autoscaling_config, "adapters": c.max_adapters_per_replica,
                   "gpus": c.num_gpus, "cpus": c.num_cpus, "dtype": c.dtype,
                   "graphs": c.replica_engine_config().decode_graphs,
                   "prefill": c.engine.prefill_chunk_tokens, "batch": c.engine.max_batch_size,
                   "stream_interval": c.stream_interval_s, "engine_process": c.engine_process,
                   "stall": c.engine.stall_timeout_s,
                   "image_limits": [c.engine.max_images_per_request, c.engine.max_image_bytes,
                                    c.engine.max_image_bytes_total]}
                  for kwargs in json.load(sys.stdin) for c in model_configs(Settings(**kwargs))]))
"""


def test_model_configs_follow_the_serve_settings():
    autoscaled = {"base_models": {"a": "/models/a", "b": "/models/b"}, "serve_replicas": 2, "serve_max_replicas": 5,
                  "serve_max_adapters_per_replica": 3, "serve_num_gpus": 1, "serve_num_cpus": 4,
                  "serve_dtype": "bfloat16", "max_chat_images": 4, "max_chat_image_bytes": 1000,
                  "max_chat_image_bytes_total": 3000, "serve_decode_graphs": "cuda",
                  "serve_prefill_chunk_tokens": 1024, "serve_max_batch_size": 48,
                  "serve_stream_interval_ms": 20, "serve_engine_process": False, "serve_stall_timeout_s": 60}
    fixed = {"base_models": {"c": "/models/c"}, "serve_replicas": 2}
    never = {"base_models": {"d": "/models/d"}, "serve_stall_timeout_s": 0}
    a, b, c, d = run_python(_MODEL_CONFIGS, [autoscaled, fixed, never])  # workflows.serve_app imports Ray: own process
    assert (a["base_model"], a["model_dir"], b["base_model"]) == ("a", "/models/a", "b")
    assert (a["adapters"], a["gpus"], a["cpus"], a["dtype"]) == (3, 1, 4, "bfloat16")
    assert (a["graphs"], c["graphs"]) == ("cuda", "off")
    assert (a["prefill"], c["prefill"]) == (1024, None)  # None: the replica's engine picks by its device
    assert (a["batch"], c["batch"]) == (48, None)
    assert (a["stream_interval"], c["stream_interval"]) == (0.02, 0.05)
    assert (a["engine_process"], c["engine_process"]) == (False, True)
    assert (a["stall"], c["stall"], d["stall"]) == (60, 300, None)  # 0: never
    assert a["autoscaling"] == {"min_replicas": 2, "max_replicas": 5, "target_ongoing_requests": 24.0}  # 48 / 2
    assert c["autoscaling"] is None and c["replicas"] == 2
    assert a["image_limits"] == [4, 1000, 3000] and c["image_limits"] == [16, 20 << 20, 50 << 20]
    with pytest.raises(ValueError, match="QWENVL_SERVE_MAX_REPLICAS"):
        Settings(serve_replicas=3, serve_max_replicas=2)
    with pytest.raises(ValueError, match="QWENVL_SERVE_DECODE_GRAPHS=cuda needs GPU replicas"):
        Settings(serve_decode_graphs="cuda")  # CPU replicas
    assert Settings(serve_decode_graphs="cuda", serve_num_gpus=1, serve_quantization="4bit").serve_quantization == "4bit"
    with pytest.raises(ValueError, match="serve_prefill_chunk_tokens"):
        Settings(serve_prefill_chunk_tokens=-1)
    with pytest.raises(ValueError, match="serve_max_batch_size"):
        Settings(serve_max_batch_size=0)
    with pytest.raises(ValueError, match="serve_decode_graphs"):
        Settings(serve_decode_graphs="static")  # the engine's test mode is not a deployment setting


def test_the_autoscaling_target_is_half_a_replicas_batch_unless_set():
    """GPU replicas decode 64 rows by default, CPU ones 16: Serve adds a replica when the running ones average half
    of that (a set batch size or target is followed)."""
    assert target_ongoing_requests(Settings(serve_num_gpus=1)) == 32
    assert target_ongoing_requests(Settings()) == 8
    assert target_ongoing_requests(Settings(serve_num_gpus=0.5, serve_max_batch_size=20)) == 10
    assert target_ongoing_requests(Settings(serve_num_gpus=1, serve_target_ongoing_requests=3)) == 3
    with pytest.raises(ValueError, match="serve_target_ongoing_requests"):
        Settings(serve_target_ongoing_requests=0)


def test_control_plane_app_reads_the_environment_and_mounts_chat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("QWENVL_MODE", "production")
    monkeypatch.setenv("QWENVL_ADMIN_KEY", ADMIN_KEY)
    monkeypatch.setenv("QWENVL_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("QWENVL_SCHEDULER_ENABLED", "false")
    app = control_plane_app(InProcessBackend({}))
    with TestClient(app) as client:
        created = client.post("/v1/admin/tenants", json={"name": "team-a"},
                              headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert created.status_code == 201, created.text
        key = created.json()["key"]["key"]
        body = {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}
        assert client.post("/v1/chat/completions", json=body).status_code == 401
        answer = client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        assert answer.json()["error"]["code"] == "model_not_found"
