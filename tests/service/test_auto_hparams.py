"""``auto`` hyperparameters through the real API (TestClient, SQLite, the real file validator): the job shows
``auto`` until its files are validated, then the values the scheduler resolved from the base model's training
defaults and the training file's statistics, with an event saying why; explicit values win; caps bound auto;
bad values are 400s naming the field. The scheduler thread is off: tests tick it."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service import repository as repo
from service.jobspec import build_spec
from service.main import create_app
from tests.service.helpers import auth, jsonl, make_settings, new_tenant, upload, wait_file

ADMIN = "admin-key-for-auto-tests-0123456789"
# 200 one-turn text samples: upload validation counts 2 turns each (no tokenizer: about 2 x 64 tokens per sample)
SAMPLES = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"a {i}"}]}
           for i in range(200)]
AUTO = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}


@dataclass
class Api:
    client: TestClient
    tenant_id: str
    key: str
    train: str
    official_dir: Path

    def tick(self) -> None:
        self.client.app.state.ctx.scheduler.tick()  # type: ignore[attr-defined]

    def post(self, key: str | None = None, **body: Any) -> Any:
        body = {"model": "qwen-vl-tiny", "training_file": self.train, **body}
        return self.client.post("/v1/fine_tuning/jobs", json=body, headers=auth(key or self.key))

    def create(self, key: str | None = None, **body: Any) -> dict[str, Any]:
        resp = self.post(key, **body)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def queued(self, job: dict[str, Any], key: str | None = None) -> dict[str, Any]:
        self.tick()
        doc = self.client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=auth(key or self.key)).json()
        assert doc["status"] == "queued", doc
        return doc

    def events(self, job: dict[str, Any], key: str | None = None) -> list[dict[str, Any]]:
        return self.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 100},
                               headers=auth(key or self.key)).json()["data"]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Api]:
    root = tmp_path_factory.mktemp("auto")
    official = root / "qwen2.5-vl-7b"  # an official checkpoint's directory: no training_defaults.json
    official.mkdir()
    (official / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    settings = make_settings(root / "data", tiny_model_dir, admin_key=ADMIN, default_max_active_jobs=50,
                             base_models={"qwen-vl-tiny": str(tiny_model_dir), "qwen2.5-vl-7b": str(official)})
    with TestClient(create_app(settings)) as client:
        tenant_id, key = new_tenant(client, ADMIN, "auto-a")
        train = upload(client, key, jsonl(SAMPLES))["id"]
        assert wait_file(client, key, train)["status"] == "processed"
        yield Api(client, tenant_id, key, train, official)


def test_a_job_with_only_model_and_files_shows_auto_then_the_resolved_values_and_why(api: Api) -> None:
    job = api.create()
    assert job["status"] == "validating_files" and job["hyperparameters"] == AUTO
    assert job["method"]["supervised"]["hyperparameters"] == AUTO
    # LoRA does not depend on the data: the base model's (qwen-vl-tiny's training_defaults.json) from the start
    assert job["extensions"]["lora"] == {"r": 16, "alpha": 32.0, "dropout": 0.0, "targets": "all-linear"}
    assert "micro_batch_size" not in job["extensions"]
    done = api.queued(job)
    # 200 samples, 1 worker: batch 8 (the base model's); 25 steps per epoch -> 40 epochs for its 1,000 steps;
    # lr 1e-2 x sqrt(8 / 16); ~128 tokens per sample -> all 8 in one forward pass of 4,096 tokens
    assert done["hyperparameters"] == {"n_epochs": 40, "batch_size": 8, "learning_rate_multiplier": 707.1}
    assert done["method"]["supervised"]["hyperparameters"] == done["hyperparameters"]
    assert done["extensions"]["micro_batch_size"] == 8
    events = api.events(job)
    auto = next(e for e in events if e["message"].startswith("auto: n_epochs"))
    assert "n_epochs 40 (200 samples, 25 steps per epoch: the base model needs about 1000 steps)" in auto["message"]
    assert "batch_size 8 (the base model's 8)" in auto["message"]
    assert auto["data"]["values"] == {"n_epochs": 40, "batch_size": 8, "learning_rate_multiplier": 707.1,
                                      "micro_batch_size": 8}
    assert set(auto["data"]["auto"]) == {"n_epochs", "batch_size", "micro_batch_size", "learning_rate_multiplier"}
    lora = next(e for e in events if e["message"].startswith("auto: lora.r"))
    assert lora["message"].startswith("auto: lora.r 16 (the base model's 16)")
    # what the scheduler writes as the job's spec.json trains with these values
    spec = build_spec(job_id=job["id"], tenant_id="t", base_model_path="unused-after-resolution", train_uri="x",
                      validation_uri=None, output_uri="y", seed=1, hyperparameters=done["hyperparameters"],
                      ext=done["extensions"])
    hp = spec.hyperparameters
    assert (hp.n_epochs, hp.batch_size, hp.micro_batch_size) == (40, 8, 8)
    assert hp.peak_learning_rate == pytest.approx(707.1e-5)
    assert (spec.lora.r, spec.lora.alpha, spec.lora.targets) == (16, 32.0, "all-linear")


def test_explicit_values_win(api: Api) -> None:
    hp = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 3.0}
    job = api.create(method={"type": "supervised", "supervised": {"hyperparameters": hp}}, micro_batch_size=2,
                     lora={"r": 4, "alpha": 4, "dropout": 0.1, "targets": "attention"})
    assert job["hyperparameters"] == hp
    assert job["extensions"]["lora"] == {"r": 4, "alpha": 4.0, "dropout": 0.1, "targets": "attention"}
    done = api.queued(job)
    assert done["hyperparameters"] == hp and done["extensions"]["micro_batch_size"] == 2
    assert not [e for e in api.events(job) if e["message"].startswith("auto:")]
    # partly explicit: batch 4 given, the rest follows it (50 steps per epoch -> 20 epochs; lr x sqrt(4 / 16))
    part = api.queued(api.create(hyperparameters={"batch_size": 4}, lora={"r": 8}))
    assert part["hyperparameters"] == {"n_epochs": 20, "batch_size": 4, "learning_rate_multiplier": 500.0}
    assert part["extensions"]["lora"]["alpha"] == 16.0  # the base model's alpha / r (2) x the rank given


def test_an_official_base_model_gets_its_family_recipe(api: Api) -> None:
    job = api.create(model="qwen2.5-vl-7b")
    assert job["extensions"]["lora"] == {"r": 8, "alpha": 16.0, "dropout": 0.0, "targets": "all-linear"}
    done = api.queued(job)
    # LLaMA-Factory's Qwen2.5-VL LoRA recipe: 3 epochs, batch 8, lr 1e-4 = 10 x 1e-5
    assert done["hyperparameters"] == {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 10.0}


def test_auto_stays_within_the_tenants_caps(api: Api) -> None:
    resp = api.client.post("/v1/admin/tenants", headers=auth(ADMIN), json={
        "name": "auto-capped", "limits": {"job_max_epochs": 5, "job_max_lora_rank": 8,
                                          "job_max_micro_batch_size": 2}})
    assert resp.status_code == 201, resp.text
    key = resp.json()["key"]["key"]
    train = upload(api.client, key, jsonl(SAMPLES))["id"]
    assert wait_file(api.client, key, train)["status"] == "processed"
    job = api.create(key, training_file=train)
    assert job["extensions"]["lora"]["r"] == 8
    done = api.queued(job, key)
    assert done["hyperparameters"]["n_epochs"] == 5 and done["extensions"]["micro_batch_size"] == 2
    assert any("capped at 5" in e["message"] for e in api.events(job, key))


def test_a_file_without_statistics_gets_the_data_free_values(api: Api) -> None:
    ctx, tenant_id = api.client.app.state.ctx, api.tenant_id  # type: ignore[attr-defined]
    file_id = repo.new_id("file")
    stored = ctx.storage.put(ctx.storage.file_key(tenant_id, file_id, "raw.jsonl"), io.BytesIO(jsonl(SAMPLES)))
    with ctx.sessions() as s, s.begin():  # stored as processed without a report (e.g. by an operator's import)
        repo.add_file(s, file_id=file_id, tenant_id=tenant_id, filename="raw.jsonl", purpose="fine-tune",
                      size=stored.size, sha256=stored.sha256, storage_key=stored.key, status="processed")
    done = api.queued(api.create(training_file=file_id))
    assert done["hyperparameters"] == {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 707.1}
    assert done["extensions"]["micro_batch_size"] == 1


@pytest.mark.parametrize(("body", "param", "fragment"), [
    ({"lora": {"r": "big"}}, "lora.r", "lora.r must be an integer from 1 to 1024 or 'auto', got 'big'"),
    ({"lora": {"r": 0}}, "lora.r", "lora.r must be an integer from 1 to 1024 or 'auto', got 0"),
    ({"lora": {"r": True}}, "lora.r", "got True"),
    ({"hyperparameters": {"n_epochs": "lots"}}, "hyperparameters.n_epochs",
     "n_epochs must be an integer or 'auto', got 'lots'"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": "Auto"}}}},
     "method.supervised.hyperparameters.batch_size", "batch_size must be an integer or 'auto', got 'Auto'"),
    ({"hyperparameters": {"learning_rate_multiplier": "1e-3"}}, "hyperparameters.learning_rate_multiplier",
     "learning_rate_multiplier must be a number or 'auto', got '1e-3'"),
    ({"hyperparameters": {"batch_size": 0}}, "hyperparameters.batch_size", "between 1 and 1024"),
    ({"hyperparameters": {"learning_rate_multiplier": 0}}, "hyperparameters.learning_rate_multiplier", "(0, 1000]"),
    ({"micro_batch_size": "some"}, "micro_batch_size", "an integer from 1 to 1024 or 'auto', got 'some'"),
    ({"micro_batch_size": 0}, "micro_batch_size", "an integer from 1 to 1024 or 'auto', got 0"),
])
def test_bad_values_are_400s_naming_the_field(api: Api, body: dict[str, Any], param: str, fragment: str) -> None:
    resp = api.post(**body)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and fragment in err["message"], err


def test_auto_can_be_written_out(api: Api) -> None:
    job = api.create(lora={"r": "auto", "alpha": 8}, micro_batch_size="auto")
    assert job["extensions"]["lora"] == {"r": 16, "alpha": 8.0, "dropout": 0.0, "targets": "all-linear"}
    assert api.queued(job)["extensions"]["micro_batch_size"] == 8
