"""``GET /v1/models/{id}/content?format=merged`` on the real app (under uvicorn in a thread, SQLite, local storage)
with the real merge worker, and ``qwenvl models download --merged``: the merged model loads with its family's
loader and gives the adapter's logits, is stored next to the adapter (charged to the tenant) and streamed from
there afterwards; other tenants get 404, a bad ``format`` 400, a failed or too slow merge a 503 / 504 naming the
model, and nothing is left in the temporary directory."""

from __future__ import annotations

import io
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from peft import PeftModel
from PIL import Image
from typer.testing import CliRunner

from qwenvl_cli.main import app as qwenvl_app
from qwenvl_core.conversation import ImagePart, Message, TextPart
from qwenvl_core.models.registry import detect_family
from qwenvl_core.specs import LoraSpec
from qwenvl_core.training.lora import apply_lora
from service import repository as repo
from service.errors import QuotaExceeded, TimedOut
from service.main import create_app
from service.merged_export import _Merges
from tests.fixtures.net import free_port, wait_for_port
from tests.service.helpers import auth, make_settings, new_tenant, upload, wait_file
from tests.serving.conftest import eventually

ADMIN = "admin-key-for-tests-0123456789"


@dataclass
class Api:
    app: FastAPI
    url: str
    client: httpx.Client
    objects: Path  # the storage root
    bases: dict[str, Path]  # base model id -> directory
    tenant: str
    key: str
    other_key: str
    train_file: str  # a processed training file of alpha

    def sessions(self) -> Any:
        return self.app.state.ctx.sessions()

    @property
    def settings(self) -> Any:
        return self.app.state.ctx.settings

    def used(self) -> int:
        return int(self.client.get(f"/v1/admin/tenants/{self.tenant}", headers=auth(ADMIN)).json()["used_bytes"])

    def download(self, model_id: str, key: str | None = None, **params: str) -> Any:
        return self.client.get(f"/v1/models/{model_id}/content", params={"format": "merged", **params},
                               headers=auth(key or self.key))


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_dirs: dict[str, Path]) -> Iterator[Api]:
    root = tmp_path_factory.mktemp("merged_download")
    bases = {"qwen-vl-tiny": tiny_model_dir, "qwen2-vl-tiny": tiny_dirs["qwen2-vl"]}
    settings = make_settings(root / "data", tiny_model_dir, admin_key=ADMIN,
                             base_models={name: str(path) for name, path in bases.items()})
    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for_port(port, timeout=60)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=300) as client:
            tenant, key = new_tenant(client, ADMIN, "alpha")
            _, other_key = new_tenant(client, ADMIN, "beta")
            train = upload(client, key)["id"]
            wait_file(client, key, train)
            yield Api(app, url, client, Path(settings.resolved_storage_uri), bases, tenant, key, other_key, train)
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def _adapter(base_dir: Path, out: Path, seed: int = 0) -> Path:
    """A trained-looking adapter (LM LoRA, vision LoRA, merger) saved as training saves it."""
    family = detect_family(base_dir)
    peft_model = apply_lora(family.load_model(base_dir), family, LoraSpec(r=4, alpha=8, vision_lora=True,
                                                                          train_adapter=True))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    peft_model.save_pretrained(str(out))
    return out


def _register(api: Api, base: str, job_id: str, adapter_from: str | None = None,
              tenant: tuple[str, str] | None = None) -> tuple[str, Path]:
    """A fine-tuned model of ``tenant`` (id, name; default alpha) whose adapter (made for ``adapter_from``, default
    ``base``) is stored in the run directory of ``job_id``: (model id, adapter directory)."""
    tenant_id, name = tenant or (api.tenant, "alpha")
    adapter = api.objects / "tenants" / tenant_id / "runs" / job_id / "adapter"
    _adapter(api.bases[adapter_from or base], adapter)
    model_id = f"ft:{base}:{name}::{job_id}"
    with api.sessions() as s, s.begin():
        repo.add_model(s, model_id=model_id, tenant_id=tenant_id, base_model=base, job_id=job_id,
                       adapter_uri=str(adapter))
    return model_id, adapter


def _logits(model_dir: Path, adapter: Path | None = None) -> torch.Tensor:
    family = detect_family(model_dir)
    model = family.forward_contract(family.load_model(model_dir))
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    message = Message(role="user", parts=[ImagePart(Image.new("RGB", (56, 56), (10, 200, 30))), TextPart("colour?")])
    encoded = family.load_processor(model_dir).encode_chat([message])
    assert encoded.vision is not None
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([encoded.input_ids]), **encoded.vision.as_kwargs()).logits


def _error(resp: Any, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["code"] == code, err
    return err


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The API process's temporary directory, to check that merges leave nothing behind."""
    path = tmp_path / "scratch"
    path.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path


def test_merged_download_loads_gives_the_adapters_logits_and_is_then_streamed_from_storage(api, scratch, tmp_path):
    """On Qwen2-VL (v1 and every family: tests/training/test_merge_export.py, the worker included)."""
    base = "qwen2-vl-tiny"
    job = api.client.post("/v1/fine_tuning/jobs", json={"model": "qwen-vl-tiny", "training_file": api.train_file},
                          headers=auth(api.key)).json()  # the run the adapter belongs to (not launched here)
    model_id, adapter = _register(api, base, job["id"])
    used_before = api.used()

    resp = api.download(model_id)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/x-tar"
    assert resp.headers["content-length"] == str(len(resp.content))
    assert resp.headers["content-disposition"] == f'attachment; filename="{job["id"]}-merged.tar"'
    with tarfile.open(fileobj=io.BytesIO(resp.content)) as tar:
        tar.extractall(tmp_path / "out", filter="data")
    merged = tmp_path / "out" / "model"
    assert detect_family(merged).name == detect_family(api.bases[base]).name
    torch.testing.assert_close(_logits(merged), _logits(api.bases[base], adapter), atol=1e-5, rtol=1e-5)
    assert list(scratch.iterdir()) == []

    cached = adapter.with_name("adapter.merged.tar")  # next to the adapter, charged with the run
    assert cached.read_bytes() == resp.content
    run_bytes = sum(p.stat().st_size for p in adapter.parent.rglob("*") if p.is_file())
    assert run_bytes > cached.stat().st_size and api.used() == used_before + run_bytes  # the run was never charged

    cli = CliRunner().invoke(qwenvl_app, ["models", "download", model_id, "-o", str(tmp_path / "cli"), "--merged",
                                          "--base-url", api.url, "--api-key", api.key])
    assert cli.exit_code == 0, cli.output
    unpacked = sorted(p.relative_to(tmp_path / "cli") for p in (tmp_path / "cli").rglob("*"))
    assert unpacked == sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*"))
    assert all(p.read_bytes() == (tmp_path / "out" / p.relative_to(tmp_path / "cli")).read_bytes()
               for p in (tmp_path / "cli").rglob("*") if p.is_file())
    cached.write_bytes(b"stored export")  # a second download streams the stored object, it does not merge again
    again = api.download(model_id)
    assert again.status_code == 200 and again.content == b"stored export"
    assert api.client.get(f"/v1/models/{model_id}/content", headers=auth(api.key)).headers["content-type"] == (
        "application/gzip")  # the PEFT archive stays the default


def test_other_tenants_get_404_a_bad_format_400_and_a_full_tenant_403(api):
    model_id, adapter = _register(api, "qwen-vl-tiny", "ftjob-private")
    err = _error(api.download(model_id, api.other_key), 404, "model_not_found")
    assert err["param"] == "model"
    assert not adapter.with_name("adapter.merged.tar").exists()  # nothing was merged for the other tenant
    for bad in ("gguf", "MERGED", ""):
        err = _error(api.download(model_id, format=bad), 400, "invalid_value")
        assert err["param"] == "format" and "format" in err["message"] and "merged" in err["message"]

    full_id, full_key = new_tenant(api.client, ADMIN, "full", max_stored_bytes=0)  # the export would be charged
    model_id, adapter = _register(api, "qwen-vl-tiny", "ftjob-full", tenant=(full_id, "full"))
    err = _error(api.download(model_id, full_key), 403, "storage_quota_exceeded")
    assert model_id in err["message"] and not adapter.with_name("adapter.merged.tar").exists()


def test_a_failed_merge_answers_503_and_a_slow_one_504_leaving_nothing(api, scratch, monkeypatch):
    # a Qwen2-VL adapter registered on the v1 base: the worker refuses it
    mismatched, adapter = _register(api, "qwen-vl-tiny", "ftjob-mismatch", adapter_from="qwen2-vl-tiny")
    err = _error(api.download(mismatched), 503, "merge_failed")
    assert mismatched in err["message"] and "does not fit its base model" in err["message"]
    assert str(api.bases["qwen-vl-tiny"]) not in err["message"]  # no server paths in answers
    assert not adapter.with_name("adapter.merged.tar").exists() and list(scratch.iterdir()) == []

    slow, adapter = _register(api, "qwen-vl-tiny", "ftjob-slow")
    monkeypatch.setattr(api.settings, "merge_timeout_s", 0.5)
    err = _error(api.download(slow), 504, "merge_timeout")
    assert slow in err["message"] and "longer than" in err["message"]
    assert not adapter.with_name("adapter.merged.tar").exists() and list(scratch.iterdir()) == []

    monkeypatch.setattr(api.settings, "base_models", {"qwen2-vl-tiny": str(api.bases["qwen2-vl-tiny"])})
    err = _error(api.download(slow), 503, "base_model_unavailable")
    assert slow in err["message"]


def test_merges_run_one_at_a_time_in_the_order_asked_one_per_tenant_and_give_up_after_the_timeout():
    """One merge per API process at a time (the same adapter or another): the others wait, up to their timeout, and
    start in the order they asked; a tenant with a merge running or waiting is told 429 for another model at once
    (a tenant could queue merges ahead of everyone, each holding one of the API's request threads)."""
    merges, order = _Merges(), []
    a1, a2, b1, c1 = (f"tenants/{t}/runs/{j}/adapter.merged.tar" for t, j in (("A", 1), ("A", 2), ("B", 1), ("C", 1)))

    def later(key: str, tenant: str, name: str) -> threading.Thread:
        def merge() -> None:
            with merges.claim(key, tenant, 60, name):
                order.append(name)
        waiting = len(merges._queue)
        thread = threading.Thread(target=merge)
        thread.start()
        assert eventually(lambda: len(merges._queue) == waiting + 1)
        return thread

    with merges.claim(a1, "A", 60, "ft:a1"):
        for key, tenant in ((a1, "A"), (b1, "B")):
            with pytest.raises(TimedOut) as refused, merges.claim(key, tenant, 0.05, "ft:other"):
                pass
            assert refused.value.code == "merge_timeout" and "ft:other" in refused.value.message
        with pytest.raises(QuotaExceeded) as busy, merges.claim(a2, "A", 60, "ft:a2"):
            pass
        assert busy.value.code == "merge_in_progress" and busy.value.retry_after_s and "ft:a2" in busy.value.message
        waiting = [later(b1, "B", "ft:b1"), later(c1, "C", "ft:c1"), later(a1, "A", "ft:a1 again")]
        order.append("ft:a1")
    for thread in waiting:
        thread.join(timeout=60)
    assert order == ["ft:a1", "ft:b1", "ft:c1", "ft:a1 again"]
    with merges.claim(a2, "A", 1, "ft:a2"):  # nothing of A's is left: its next model merges
        assert merges._tenants == {"A": (a2, 1)}
    assert merges._tenants == {} and merges._running == set()
