"""Adversarial chat requests against the real control-plane app with the chat route mounted on a real tiny-model
engine: image references are size-checked before anything is read (the API process's peak RSS grows by far less
than the bytes a request names), image count and stop-string length are limited, a photo-sized base64 image fits
the body limit, another tenant is answered meanwhile, and a fault in one row of a batch fails only that row (5xx),
never its batch-mates nor as the user's 400."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client import CollectorRegistry
from safetensors.torch import load_file, save_file

from qwenvl_core.errors import QwenVLError
from qwenvl_core.serving.chat import InProcessBackend
from qwenvl_core.serving.engine import EngineConfig, ServingEngine
from qwenvl_core.serving.metrics import ServingMetrics
from service import repository as repo
from service.main import create_app
from service.routes.chat import mount_chat
from tests.service.helpers import auth, make_settings, new_tenant, upload
from tests.serving.conftest import make_adapter

BASE = "qwen-vl-tiny"
ADMIN = "admin-key-for-tests-0123456789"
MB = 1 << 20
BIG_FILE_BYTES = 30 * MB  # an uploaded file over the 20 MiB per-image default
HUGE_OBJECT_BYTES = 64 * MB  # written straight into the tenant's storage
MANY_PARTS = 40  # > the default 16 images; small enough that the unbounded code path does not exhaust the host


class FaultyEngine(ServingEngine):
    """The real engine with one injected fault and a gate (test-only seams, in this subclass only).

    ``fault_at`` ("prefill" or "decode"): every forward of that kind whose batch holds the adapter ``faulty_id``
    raises, as a row the model cannot process would (e.g. an image-count mismatch). ``gate`` cleared holds the
    model thread inside its next forward, so the test can queue requests that will then be batched together.
    """

    faulty_id: str | None = None
    fault_at = "decode"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate, self.held = threading.Event(), threading.Event()
        self.gate.set()

    def _forward(self, ids, mask, positions, images, plan, *rest):  # type: ignore[no-untyped-def]
        if not self.gate.is_set():
            self.held.set()
            self.gate.wait(timeout=60)
        in_plan = plan is not None and any(a.adapter_id == self.faulty_id for a in plan.adapters)
        prefill = ids.shape[1] > 1  # a decode step feeds one token per row
        if in_plan and prefill == (self.fault_at == "prefill"):
            raise QwenVLError("injected fault: image count mismatch in this row")
        return super()._forward(ids, mask, positions, images, plan, *rest)


@dataclass
class Stack:
    client: TestClient
    engine: FaultyEngine
    storage_root: str
    tenant_a: str
    key_a: str
    tenant_b: str
    key_b: str
    big_file_id: str  # tenant A's uploaded BIG_FILE_BYTES file
    good_model: str  # tenant A's adapters: a normal one, one that diverged to NaN, one the fault is injected into
    nan_model: str
    faulty_model: str


def _nan_adapter(model_dir: Path, out_dir: Path) -> Path:
    """A LoRA adapter whose training diverged: every lora_B weight is NaN (loads fine, poisons its rows)."""
    make_adapter(model_dir, out_dir, seed=77)
    path = out_dir / "adapter_model.safetensors"
    tensors = load_file(str(path))
    save_file({k: torch.full_like(v, float("nan")) if "lora_B" in k else v for k, v in tensors.items()}, str(path))
    return out_dir


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("chat-limits")
    adapters = {"good": make_adapter(tiny_model_dir, root / "good", seed=3),
                "nan": _nan_adapter(tiny_model_dir, root / "nan"),
                "faulty": make_adapter(tiny_model_dir, root / "faulty", seed=5)}
    engine = FaultyEngine.from_model_dir(tiny_model_dir, EngineConfig(max_adapters=4, max_batch_size=16),
                                         metrics=ServingMetrics(CollectorRegistry()))
    # The tenants' request-rate limit is off here: these tests send many large bodies on purpose and check the chat
    # limits behind admission (admission itself: tests/security/test_slow_clients.py).
    app = create_app(make_settings(root / "data", tiny_model_dir, admin_key=ADMIN, tenant_requests_per_second=0))
    mount_chat(app, InProcessBackend({BASE: engine}))
    with TestClient(app) as client:
        tenant_a, key_a = new_tenant(client, ADMIN, "team-a")
        tenant_b, key_b = new_tenant(client, ADMIN, "team-b")
        models = {}
        with app.state.ctx.sessions.begin() as session:
            for name, adapter_dir in adapters.items():
                models[name] = f"ft:{BASE}:team-a:{name}:ftjob-{name}"
                repo.add_model(session, model_id=models[name], tenant_id=tenant_a, base_model=BASE,
                               job_id=f"ftjob-{name}", adapter_uri=str(adapter_dir))
        engine.faulty_id = models["faulty"]
        big = upload(client, key_a, b"\0" * BIG_FILE_BYTES, name="big.zip")
        yield Stack(client, engine, app.state.ctx.storage.root_uri, tenant_a, key_a, tenant_b, key_b, big["id"],
                    models["good"], models["nan"], models["faulty"])
    engine.close()


# ----- helpers ---------------------------------------------------------------------------------------------------
def _rss() -> int:
    return psutil.Process().memory_info().rss


class PeakRss:
    """Peak resident memory of this process (which runs the app) inside the block, over what it was before."""

    def __enter__(self) -> PeakRss:
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def growth(self) -> int:
        return self.peak - self.base


def _image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def _body(parts: list[dict[str, Any]], model: str = BASE, **fields: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": 2, **fields,
            "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "what is shown?"}]}]}


def _chat(stack: Stack, key: str, body: dict[str, Any]) -> Any:
    return stack.client.post("/v1/chat/completions", json=body, headers=auth(key))


def _png_data_url(width: int, height: int, noise: bool = False) -> str:
    pixels = (np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8) if noise
              else np.full((height, width, 3), 120, dtype=np.uint8))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _data_url_stub() -> str:
    return _png_data_url(16, 16)


def _write_object(stack: Stack, tenant_id: str, name: str, size: int) -> str:
    """An object of ``size`` bytes in the tenant's own storage, written directly (sparse: quick); its storage URI."""
    uri = f"{stack.storage_root}/tenants/{tenant_id}/uploads-by-hand/{name}"
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.truncate(size)
    return uri


def _error(response: Any) -> dict[str, Any]:
    return response.json()["error"]


def _adapter_uri(stack: Stack, model_id: str) -> str:
    with stack.client.app.state.ctx.sessions() as session:  # type: ignore[attr-defined]
        return repo.get_model(session, tenant_id=stack.tenant_a, model_id=model_id).adapter_uri


# ----- (a) - (c): limits checked before anything is read ------------------------------------------------------------
def test_many_parts_naming_a_large_file_are_refused_before_reading_it(stack: Stack):
    body = _body([_image_part(stack.big_file_id)] * MANY_PARTS)
    with PeakRss() as rss:
        response = _chat(stack, stack.key_a, body)
    assert response.status_code == 400, response.text
    error = _error(response)
    assert error["code"] == "too_many_images" and error["param"] == "messages[0].content[16]"
    assert "16" in error["message"] and str(MANY_PARTS) in error["message"]
    referenced = MANY_PARTS * BIG_FILE_BYTES
    assert rss.growth < referenced // 20, f"RSS grew {rss.growth >> 20} MiB for {referenced >> 20} MiB named"


def test_an_image_over_the_per_image_limit_is_refused_from_its_stored_size(stack: Stack):
    uri = _write_object(stack, stack.tenant_a, "huge.png", HUGE_OBJECT_BYTES)
    for url, size in ((uri, HUGE_OBJECT_BYTES), (stack.big_file_id, BIG_FILE_BYTES)):
        with PeakRss() as rss:
            response = _chat(stack, stack.key_a, _body([_image_part(_data_url_stub()), _image_part(url)]))
        assert response.status_code == 400, response.text
        error = _error(response)
        assert error["code"] == "image_too_large" and error["param"] == "messages[0].content[1]", error
        assert str(20 * MB) in error["message"]
        assert rss.growth < 16 * MB, f"RSS grew {rss.growth >> 20} MiB for a {size >> 20} MiB image"


def test_reads_are_bounded_even_when_the_recorded_size_is_wrong(stack: Stack):
    small = upload(stack.client, stack.key_a, b"PK" + b"\0" * 1022, name="small.zip")
    storage = stack.client.app.state.ctx.storage  # type: ignore[attr-defined]
    path = Path(storage.uri_of_key(storage.file_key(stack.tenant_a, small["id"], "small.zip")))
    with path.open("r+b") as f:  # the object grew behind the service's back: its row still says 1 KiB
        f.truncate(HUGE_OBJECT_BYTES)
    with PeakRss() as rss:
        response = _chat(stack, stack.key_a, _body([_image_part(small["id"])]))
    assert response.status_code == 400, response.text
    assert _error(response)["code"] == "image_too_large" and _error(response)["param"] == "messages[0].content[0]"
    assert rss.growth < HUGE_OBJECT_BYTES // 2, f"RSS grew {rss.growth >> 20} MiB"


def test_images_over_the_request_total_are_refused_before_reading(stack: Stack):
    parts = [_image_part(_write_object(stack, stack.tenant_a, f"part{i}.png", 19 * MB)) for i in range(3)]
    with PeakRss() as rss:
        response = _chat(stack, stack.key_a, _body(parts))
    assert response.status_code == 400, response.text
    error = _error(response)
    assert error["code"] == "images_too_large" and error["param"] == "messages[0].content[2]", error
    assert str(50 * MB) in error["message"]
    assert rss.growth < 19 * MB, f"RSS grew {rss.growth >> 20} MiB"


def test_another_tenants_storage_and_missing_objects_are_still_refused(stack: Stack):
    other = _write_object(stack, stack.tenant_b, "theirs.png", 1024)
    response = _chat(stack, stack.key_a, _body([_image_part(other)]))
    assert response.status_code == 403 and _error(response)["param"] == "image_url"
    missing = f"{stack.storage_root}/tenants/{stack.tenant_a}/nothing-here.png"
    response = _chat(stack, stack.key_a, _body([_image_part(missing)]))
    assert response.status_code == 404 and _error(response)["code"] == "file_not_found"


def test_too_many_images_are_refused(stack: Stack):
    response = _chat(stack, stack.key_a, _body([_image_part(_data_url_stub())] * 17))
    assert response.status_code == 400, response.text
    error = _error(response)
    assert error["code"] == "too_many_images" and error["param"] == "messages[0].content[16]"
    ok = _chat(stack, stack.key_a, _body([_image_part(_data_url_stub())] * 16))
    assert ok.status_code == 200, ok.text


# ----- (d): a photo-sized base64 image fits ------------------------------------------------------------------------
def test_a_photo_sized_base64_image_is_accepted(stack: Stack):
    url = _png_data_url(640, 600, noise=True)
    assert len(url) > 1_400_000  # ~1.5 MB of base64, over the generic 1 MiB request-body limit
    response = _chat(stack, stack.key_a, _body([_image_part(url)]))
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] > 16
    over = {"model": BASE, "messages": [{"role": "user", "content": "x" * (50 * MB)}]}  # the chat route's own limit
    response = _chat(stack, stack.key_a, over)
    assert response.status_code == 413 and _error(response)["code"] == "payload_too_large"


# ----- (e): the other tenant is answered while one abuses the limits ---------------------------------------------------
def test_other_tenant_is_answered_while_one_sends_abusive_requests(stack: Stack):
    body = _body([_image_part(stack.big_file_id)] * MANY_PARTS)
    stop, statuses, lock = threading.Event(), [], threading.Lock()

    def abuse() -> None:
        while not stop.is_set():
            status = _chat(stack, stack.key_a, body).status_code
            with lock:
                statuses.append(status)

    def wait_until(done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 120
        while not done():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.01)

    threads = [threading.Thread(target=abuse, daemon=True) for _ in range(4)]
    with PeakRss() as rss:
        try:
            for t in threads:
                t.start()
            wait_until(lambda: len(statuses) >= 2)
            before = len(statuses)
            for _ in range(3):
                chat = _chat(stack, stack.key_b, {"model": BASE, "max_tokens": 4,
                                                  "messages": [{"role": "user", "content": "hello"}]})
                jobs = stack.client.get("/v1/fine_tuning/jobs", headers=auth(stack.key_b))
                assert chat.status_code == 200 and chat.json()["choices"], chat.text
                assert jobs.status_code == 200, jobs.text
            wait_until(lambda: len(statuses) > before)  # tenant A kept sending while B was served
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=120)
    assert statuses and set(statuses) == {400}
    assert rss.growth < MANY_PARTS * BIG_FILE_BYTES // 10, f"RSS grew {rss.growth >> 20} MiB"


# ----- (f): a fault in one row fails that row only --------------------------------------------------------------------
@pytest.mark.parametrize("fault_at", ["prefill", "decode"])
def test_a_faulty_row_fails_alone_with_a_5xx(stack: Stack, fault_at: str):
    engine = stack.engine
    engine.fault_at = fault_at
    plain = [{"role": "user", "content": "tell me a story"}]
    requests = {  # name -> (key, body); all are queued while the model thread is held, then batched together
        "base-b1": (stack.key_b, {"model": BASE, "max_tokens": 6, "messages": plain}),
        "base-b2": (stack.key_b, {"model": BASE, "max_tokens": 6, "temperature": 0.8, "seed": 1, "messages": plain}),
        "good-a": (stack.key_a, {"model": stack.good_model, "max_tokens": 6, "messages": plain}),
        "faulty-a": (stack.key_a, {"model": stack.faulty_model, "max_tokens": 6, "temperature": 0,
                                   "messages": plain}),
        "nan-a": (stack.key_a, {"model": stack.nan_model, "max_tokens": 6, "temperature": 1.0, "messages": plain}),
    }
    responses: dict[str, Any] = {}

    def send(name: str, key: str, body: dict[str, Any]) -> None:
        responses[name] = _chat(stack, key, body)

    # warm the adapter cache, so every request is prepared quickly
    for model in (stack.good_model, stack.nan_model, stack.faulty_model):
        engine.cache.get(model, _adapter_uri(stack, model))
    engine.gate.clear()
    engine.held.clear()
    blocker = threading.Thread(target=send, args=("blocker", stack.key_b, {
        "model": BASE, "max_tokens": 12, "messages": [{"role": "user", "content": "hold on"}]}))
    blocker.start()
    try:
        assert engine.held.wait(60), "the model thread never reached the gate"
        threads = [threading.Thread(target=send, args=(name, *request)) for name, request in requests.items()]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(engine._waiting) < len(requests):  # all queued: the next step batches them together
            assert time.monotonic() < deadline, "requests were not queued"
            time.sleep(0.01)
    finally:
        engine.gate.set()
    for t in [blocker, *threads]:
        t.join(timeout=120)

    for name in ("blocker", "base-b1", "base-b2", "good-a"):
        assert responses[name].status_code == 200, (name, responses[name].text)
        assert responses[name].json()["choices"][0]["finish_reason"] in ("stop", "length")
    faulty = responses["faulty-a"]
    assert faulty.status_code == 500, faulty.text
    assert _error(faulty)["type"] == "server_error" and _error(faulty)["code"] == "generation_failed"
    nan = responses["nan-a"]
    assert nan.status_code >= 500 and _error(nan)["type"] == "server_error", nan.text
    assert engine.alive
    assert _chat(stack, stack.key_b, {"model": BASE, "max_tokens": 2, "messages": plain}).status_code == 200


# ----- (g): stop strings ---------------------------------------------------------------------------------------------
def test_an_over_long_stop_string_is_refused(stack: Stack):
    body = {"model": BASE, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}], "stop": ["x" * 300]}
    response = _chat(stack, stack.key_b, body)
    assert response.status_code == 400, response.text
    assert _error(response)["param"] == "stop" and "256" in _error(response)["message"]
    body["stop"] = ["y" * 256]
    assert _chat(stack, stack.key_b, body).status_code == 200


def test_a_vanishing_temperature_is_greedy_decoding_not_a_fault(stack: Stack):
    body = {"model": BASE, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    greedy = _chat(stack, stack.key_b, {**body, "temperature": 0})
    tiny = _chat(stack, stack.key_b, {**body, "temperature": 1e-300})  # logits / 1e-300 would be inf / NaN
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["message"] == greedy.json()["choices"][0]["message"]


def test_large_inline_images_are_answered_and_checked_through_the_split_body(stack: Stack):
    """A data URL over 64 KiB is taken out of the body before the JSON parse (``inline_images``): it is still
    decoded and answered, and a broken one is still a 400 naming its part."""
    url = _png_data_url(220, 200, noise=True)
    assert len(url) > 64 * 1024
    ok = _chat(stack, stack.key_a, _body([_image_part(url)]))
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["prompt_tokens"] > 0
    broken = url[:-8] + "!!!!!!!!"  # not base64 any more; still no backslash, so still taken out of the JSON
    response = _chat(stack, stack.key_a, _body([_image_part(broken)]))
    assert response.status_code == 400, response.text
    error = _error(response)
    assert error["code"] == "invalid_image" and error["param"] == "messages[0].content[0]", error


def test_each_of_n_choices_counts_as_one_of_the_tenants_concurrent_requests(stack: Stack):
    """``n`` choices are ``n`` engine requests (batch rows), so they take ``n`` of the tenant's concurrent-request
    slots, held until the response is sent (before: one, so a tenant at its limit put 8x as many rows into the
    replica's shared queue as it was allowed requests)."""
    _, key = new_tenant(stack.client, ADMIN, "team-n", limits={"tenant_max_concurrent_requests": 4})
    body = {"model": BASE, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    over = _chat(stack, key, {**body, "n": 5})
    assert over.status_code == 429, over.text
    assert _error(over)["code"] == "too_many_concurrent_requests" and "counts 5 (its 5 choices)" in \
        _error(over)["message"] and over.headers["Retry-After"] == "1"
    for _ in range(2):  # the slots come back after each response: the same request is admitted again
        fits = _chat(stack, key, {**body, "n": 4})
        assert fits.status_code == 200, fits.text
        assert len(fits.json()["choices"]) == 4
