"""Continued training and checkpoints as models (issue 14 items 1 and 2), driven by the official ``openai`` client.

One real tiny fine-tune runs through the scheduler on the real local Ray head (the workflow the service submits,
``python -m workflows.finetune``), checkpointing every step and keeping the last two. Its checkpoints are listed
as models (``fine_tuned_model_checkpoint``, only those still stored), answer chat completions, are retrieved and
downloaded through ``/v1/models``; two jobs continue from it (from a checkpoint id and from the finished model) on
its base model, from its adapter, with the lineage on the job, the new model and the MLflow tags. The refusals: a
parent of another tenant or unknown is 404 with one message, a conflicting LoRA field 400 naming it, a parent job
that is unfinished / cancelled 400, a deleted one 404. The trainer's side (the new adapter starts from the parent's
weights, every family) is ``tests/training/test_init_adapter.py``.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load
from sqlalchemy.orm import Session, sessionmaker

from qwenvl_core.runs import RunDir
from qwenvl_core.serving.chat import InProcessBackend
from qwenvl_core.serving.engine import EngineConfig, ServingEngine
from service import integrations, lineage
from service import repository as repo
from service.db import make_engine, migrate, session_factory
from service.errors import NotFound
from service.main import create_app
from service.routes.chat import mount_chat
from tests.service.helpers import auth, make_settings, new_tenant, upload, wait_file, wait_for

BASE = "qwen-vl-tiny"
ADMIN = "admin-key-for-tests-0123456789"
FINISHED = ("succeeded", "failed", "cancelled")
SMALL = {"hyperparameters": {"n_epochs": 1, "batch_size": 1, "learning_rate_multiplier": 50.0},
         "compute": {"num_workers": 1, "cpus_per_worker": 0.5}}


@dataclass
class Stack:
    http: TestClient
    client: openai.OpenAI  # tenant "default"
    other: openai.OpenAI  # tenant "other"
    key: str
    file_id: str
    parent: dict[str, Any]  # the finished parent job

    def job(self, job_id: str) -> dict[str, Any]:
        return self.http.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth(self.key)).json()  # type: ignore[no-any-return]

    def wait(self, job_id: str) -> dict[str, Any]:
        return wait_for(lambda: self.job(job_id), lambda d: d["status"] in FINISHED, timeout=300)


def _client(http: TestClient, key: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url="http://testserver/v1", http_client=http, max_retries=0)


@pytest.fixture(scope="module")
def st(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, ray_dashboard: str) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("continued")
    settings = make_settings(root / "data", tiny_model_dir, scheduler_enabled=True, ray_address=ray_dashboard,
                             admin_key=ADMIN, job_env={"QWENVL_WORK_DIR": str(root)})
    engine = ServingEngine.from_model_dir(tiny_model_dir, EngineConfig(max_adapters=4))
    app = create_app(settings)
    mount_chat(app, InProcessBackend({BASE: engine}))
    with TestClient(app) as http:
        key = (root / "data" / "api_key").read_text().strip()
        _, other_key = new_tenant(http, ADMIN, "other")
        client = _client(http, key)
        file_id, val_id = upload(http, key)["id"], upload(http, key, name="validation.jsonl")["id"]
        assert wait_file(http, key, file_id)["status"] == wait_file(http, key, val_id)["status"] == "processed"
        job = client.fine_tuning.jobs.create(model=BASE, training_file=file_id, validation_file=val_id,
                                             suffix="parent", seed=5,
                                             extra_body={"max_steps": 3, "lora": {"r": 4, "alpha": 8},
                                                         "checkpoint": {"every_n_steps": 1, "keep": 2},
                                                         "evaluation": {"every_n_steps": 2, "max_samples": 2,
                                                                        "task_metrics": False,
                                                                        "compare_base": False}, **SMALL})
        st = Stack(http, client, _client(http, other_key), key, file_id, {})
        st.parent = st.wait(job.id)
        assert st.parent["status"] == "succeeded", st.parent
        yield st
    engine.close()


def _chat(client: openai.OpenAI, model: str) -> str:
    answer = client.chat.completions.create(model=model, max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    assert answer.model == model and answer.choices[0].message.role == "assistant"
    return answer.choices[0].message.content or ""


def _weights(archive: bytes) -> dict[str, Any]:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        member = tar.extractfile("adapter/adapter_model.safetensors")
        assert member is not None and "adapter/adapter_config.json" in tar.getnames()
        return load(member.read())


def test_listed_checkpoints_are_models_served_retrieved_and_downloaded(st: Stack) -> None:
    parent = st.parent
    model = parent["fine_tuned_model"]
    ckpts = st.client.fine_tuning.jobs.checkpoints.list(parent["id"]).data
    # every step checkpointed; keep 2: Ray Train removed step 1's, so only the stored (servable) ones are listed
    assert [c.step_number for c in ckpts] == [3, 2]
    assert [c.fine_tuned_model_checkpoint for c in ckpts] == [f"{model}:ckpt-step-3", f"{model}:ckpt-step-2"]
    # OpenAI's checkpoint metrics, read through the official client's model: each step's training loss, and the
    # validation metrics where a periodic evaluation ran (every 2 steps here)
    newest, evaluated = ckpts[0].metrics, ckpts[1].metrics
    assert (newest.step, evaluated.step) == (3, 2) and newest.train_loss > 0 and evaluated.train_loss > 0
    assert newest.valid_loss is None and evaluated.valid_loss > 0
    assert 0 <= evaluated.valid_mean_token_accuracy <= 1
    gone = f"{model}:ckpt-step-1"
    assert st.http.get(f"/v1/models/{gone}", headers=auth(st.key)).json()["error"]["code"] == "model_not_found"

    for ckpt in ckpts:
        assert _chat(st.client, ckpt.fine_tuned_model_checkpoint) is not None  # chat completions serve it
        got = st.client.models.retrieve(ckpt.fine_tuned_model_checkpoint).model_dump()
        assert got["kind"] == "checkpoint" and got["step_number"] == ckpt.step_number
        assert got["base_model"] == BASE and got["fine_tuning_job_id"] == parent["id"]
    by_id = st.client.models.retrieve(ckpts[1].id).model_dump()  # the ftckpt- id names the same model
    assert by_id["id"] == ckpts[1].fine_tuned_model_checkpoint

    final = _weights(st.http.get(f"/v1/models/{model}/content", headers=auth(st.key)).content)
    last = _weights(st.http.get(f"/v1/models/{ckpts[0].fine_tuned_model_checkpoint}/content",
                                headers=auth(st.key)).content)
    earlier = _weights(st.http.get(f"/v1/models/{ckpts[1].fine_tuned_model_checkpoint}/content",
                                   headers=auth(st.key)).content)
    assert last.keys() == final.keys() == earlier.keys()
    assert all(last[k].equal(final[k]) for k in final)  # the last step's checkpoint is the finished adapter
    assert any(not earlier[k].equal(final[k]) for k in final)  # step 2's is its own

    for model_id in (ckpts[0].fine_tuned_model_checkpoint, ckpts[0].id):  # another tenant: as if unknown
        with pytest.raises(openai.NotFoundError) as err:
            st.other.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}])
        assert err.value.body["code"] == "model_not_found"  # type: ignore[index]
        with pytest.raises(openai.NotFoundError):
            st.other.models.retrieve(model_id)
    deleted = st.http.delete(f"/v1/models/{ckpts[0].fine_tuned_model_checkpoint}", headers=auth(st.key))
    assert deleted.status_code == 400 and deleted.json()["error"]["code"] == "checkpoint_not_deletable"


def test_jobs_continue_from_a_checkpoint_and_from_the_model_with_lineage(st: Stack) -> None:
    parent = st.parent
    ckpt = st.client.fine_tuning.jobs.checkpoints.list(parent["id"]).data[1]  # step 2
    from_ckpt = st.client.fine_tuning.jobs.create(model=ckpt.id, training_file=st.file_id, suffix="from-ckpt",
                                                  extra_body={"max_steps": 1, **SMALL})
    # the other one waits for its (new) file's validation: created and checked, then cancelled before it launches
    from_model = st.client.fine_tuning.jobs.create(model=parent["fine_tuned_model"], training_file=_fresh_file(st),
                                                   suffix="from-model", extra_body={"max_steps": 1, **SMALL})
    st.client.fine_tuning.jobs.cancel(from_model.id)
    assert from_ckpt.model == ckpt.fine_tuned_model_checkpoint and from_model.model == parent["fine_tuned_model"]
    for job in (from_ckpt, from_model):
        extra = job.model_extra or {}
        assert extra["parent_model"] == job.model and extra["base_model"] == BASE
        assert extra["extensions"]["lora"] == parent["extensions"]["lora"]  # the parent's LoRA configuration
    parent_run = RunDir(_job_row(st, parent["id"]).output_uri)
    assert _job_row(st, from_model.id).request["parent"] == {  # what the scheduler gives the spec as init_adapter
        "model": parent["fine_tuned_model"], "job_id": parent["id"], "step": None,
        "adapter_uri": parent_run.uri_of("adapter")}

    done = st.wait(from_ckpt.id)
    assert done["status"] == "succeeded", done
    assert done["fine_tuned_model"] == f"ft:{BASE}:default:from-ckpt:{done['id']}"  # named after the base model
    spec = RunDir(_job_row(st, done["id"]).output_uri).read_json("spec.json")
    assert spec["init_adapter"] == parent_run.checkpoint_adapter_uri(parent["id"], 2)  # the workflow's start
    messages = [e.message for e in st.client.fine_tuning.jobs.list_events(done["id"], limit=100).data]
    assert any("starts from its parent's weights" in m for m in messages), messages
    model = st.client.models.retrieve(done["fine_tuned_model"]).model_dump()
    assert model["parent_model"] == ckpt.fine_tuned_model_checkpoint and model["base_model"] == BASE
    assert _chat(st.client, done["fine_tuned_model"]) is not None

    with st.http.app.state.ctx.sessions() as s:  # type: ignore[attr-defined]
        job = repo.job_by_id(s, job_id=from_ckpt.id)
        train = repo.file_by_id(s, file_id=st.file_id)
        assert job is not None and train is not None
        tags = integrations.job_tracking(s, st.http.app.state.ctx.settings, job,  # type: ignore[attr-defined]
                                         [("training", train, "uri")])["tags"]
    assert tags["qwenvl.base_model"] == BASE and tags["qwenvl.parent_model"] == ckpt.fine_tuned_model_checkpoint
    assert tags["qwenvl.parent_job_id"] == parent["id"] and tags["qwenvl.parent_checkpoint_step"] == "2"

    st.client.models.delete(done["fine_tuned_model"])  # a deleted parent: 404 saying so
    err = _create_error(st, st.key, 404, model=done["fine_tuned_model"])
    assert err["code"] == "model_not_found" and "was deleted" in err["message"], err


def _fresh_file(st: Stack) -> str:
    """A new upload of the training data, still being validated (a job on it stays in validating_files)."""
    return str(upload(st.http, st.key)["id"])


def _job_row(st: Stack, job_id: str) -> Any:
    with st.http.app.state.ctx.sessions() as s:  # type: ignore[attr-defined]
        job = repo.job_by_id(s, job_id=job_id)
        assert job is not None
        s.expunge(job)
        return job


def _create_error(st: Stack, key: str, status: int, **body: Any) -> dict[str, Any]:
    resp = st.http.post("/v1/fine_tuning/jobs", json={"training_file": st.file_id, **body}, headers=auth(key))
    assert resp.status_code == status, resp.text
    return resp.json()["error"]  # type: ignore[no-any-return]


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = (f"sqlite:///{tmp_path / 'db.sqlite'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres_database"))
    engine = make_engine(url)
    migrate(engine)
    yield session_factory(engine)
    engine.dispose()


def test_lineage_columns_and_checkpoint_lookups_on_both_databases(sessions: sessionmaker[Session],
                                                                  tmp_path: Path) -> None:
    """Migration 0004's columns, the checkpoint lookups by id and by step, and the list filtered to stored steps."""
    with sessions() as s, s.begin():
        tenant = repo.create_tenant(s, name="lineage-co", max_active_jobs=2, max_stored_bytes=1000)
        run = RunDir(str(tmp_path / "run"))
        job = repo.add_job(s, id="ftjob-p", tenant_id=tenant.id, model=BASE, training_file="file-x",
                           validation_file=None, suffix="s", seed=1, meta={}, request={"hyperparameters": {}},
                           output_uri=run.uri, parent_model="ft:x:y:z:ftjob-0")
        repo.add_events(s, job_id=job.id, events=[
            {"seq": i, "created_at": 1, "level": "info", "type": "checkpoint", "message": "c", "data": {"step": step}}
            for i, step in enumerate([1, 2, 3, 2])])  # a restart saved step 2 again
        repo.add_model(s, model_id="ft:m", tenant_id=tenant.id, base_model=BASE, job_id=job.id, adapter_uri="a",
                       parent_model=job.parent_model)
    with sessions() as s:
        assert repo.get_model(s, tenant_id=tenant.id, model_id="ft:m").parent_model == "ft:x:y:z:ftjob-0"
        newest = repo.checkpoint_event(s, job_id="ftjob-p", step=2)
        assert newest is not None and newest.seq == 3
        assert repo.checkpoint_event(s, ref=newest.ref) is not None and repo.checkpoint_event(s, job_id="ftjob-p",
                                                                                             step=9) is None
        for i in (3, 2):  # what Ray Train keeps (checkpoint.keep 2): steps 3 and 2, each with its adapter
            run.write_json(f"checkpoints/ftjob-p/step_{i:08d}/adapter/adapter_config.json", {})
        run.write_json("checkpoints/ftjob-p/step_00000001/state.json", {})  # no adapter: not a model
        assert run.checkpoint_adapter_steps("ftjob-p") == {2, 3}
        assert run.checkpoint_has_adapter("ftjob-p", 2) and not run.checkpoint_has_adapter("ftjob-p", 1)
        rows, more = repo.list_events(s, job_id="ftjob-p", limit=10, after=None, types=["checkpoint"],
                                      latest_per_step=True, steps=sorted(run.checkpoint_adapter_steps("ftjob-p")))
        assert [(r.data["step"], r.seq) for r in rows] == [(2, 3), (3, 2)] and not more
        found = lineage.find(s, tenant.id, f"ftckpt-{newest.ref}")
        assert found.id == f"ft:{BASE}:lineage-co:s:ftjob-p:ckpt-step-2" and found.step == 2
        assert found.adapter_uri == run.checkpoint_adapter_uri("ftjob-p", 2)
        for bad in ("ftckpt-" + "9" * 40, f"ft:{BASE}:lineage-co:s:ftjob-p:ckpt-step-" + "9" * 40,
                    f"ft:{BASE}:lineage-co:s:ftjob-p:ckpt-step-1"):  # overflowing numbers; a step not stored
            with pytest.raises(NotFound):
                lineage.find(s, tenant.id, bad)


def test_runs_root_resolver_serves_a_stored_checkpoint(tmp_path: Path) -> None:
    """Serving without the control plane (``RunsRootResolver``): a checkpoint id resolves to its stored adapter."""
    from workflows.serve_app import RunsRootResolver

    run = RunDir(str(tmp_path / "tenants" / "team" / "runs" / "ftjob-1"))
    run.write_json("checkpoints/ftjob-1/step_00000004/adapter/adapter_config.json", {"r": 4})
    resolve = RunsRootResolver(str(tmp_path))
    found = resolve(f"ft:{BASE}:team:s:ftjob-1:ckpt-step-4", "team")
    assert found is not None and found.uri == run.checkpoint_adapter_uri("ftjob-1", 4) and found.base_model == BASE
    for missing in (f"ft:{BASE}:team:s:ftjob-1:ckpt-step-3", f"ft:{BASE}:team:s:ftjob-1:ckpt-step-x",
                    f"ft:{BASE}:team:s:ftjob-1"):  # no such checkpoint; not a step; no final adapter yet
        assert resolve(missing, "team") is None
    assert resolve(f"ft:{BASE}:team:s:ftjob-1:ckpt-step-4", "other") is None  # another tenant's


def test_refusals_name_the_problem_and_never_confirm_another_tenants_model(st: Stack) -> None:
    model = st.parent["fine_tuned_model"]
    ckpt = st.client.fine_tuning.jobs.checkpoints.list(st.parent["id"]).data[0]
    other_key = st.other.api_key
    other_file = upload(st.http, other_key)["id"]
    unknown = _create_error(st, other_key, 404, model=f"ft:{BASE}:other::ftjob-doesnotexist", training_file=other_file)
    for parent in (model, ckpt.fine_tuned_model_checkpoint, ckpt.id):
        err = _create_error(st, other_key, 404, model=parent, training_file=other_file)
        assert err["code"] == unknown["code"] == "model_not_found" and err["param"] == "model"
        assert err["message"] == unknown["message"].replace(f"ft:{BASE}:other::ftjob-doesnotexist", parent)
    assert _create_error(st, st.key, 404, model="ftckpt-999999999")["code"] == "model_not_found"

    for field, value in (("r", 16), ("alpha", 4.0), ("targets", "attention"), ("vision_lora", True)):
        err = _create_error(st, st.key, 400, model=model, lora={field: value})
        assert err["param"] == f"lora.{field}" and err["code"] == "lora_conflicts_with_parent", err
    same = st.client.fine_tuning.jobs.create(model=model, training_file=_fresh_file(st),
                                             extra_body={"lora": {"r": 4, "dropout": 0.0}, "max_steps": 1})
    assert (same.model_extra or {})["extensions"]["lora"]["dropout"] == 0.0  # dropout may change
    st.client.fine_tuning.jobs.cancel(same.id)

    unfinished = st.client.fine_tuning.jobs.create(model=BASE, training_file=_fresh_file(st), suffix="u",
                                                   extra_body={"max_steps": 1})
    name = f"ft:{BASE}:default:u:{unfinished.id}"
    err = _create_error(st, st.key, 400, model=name)
    assert err["code"] == "model_not_ready" and err["param"] == "model" and "checkpoints" in err["message"], err
    st.client.fine_tuning.jobs.cancel(unfinished.id)
    assert st.wait(unfinished.id)["status"] == "cancelled"
    err = _create_error(st, st.key, 400, model=name)
    assert err["code"] == "model_not_ready" and "cancelled before producing it" in err["message"], err
