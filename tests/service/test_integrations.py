"""A job's ``integrations`` (``service.integrations``) through the real API and a real ``mlflow server --app-name
basic-auth`` configured as the platform configures it: ``mlflow`` is applied to the job's run (experiment inside
the tenant's namespace, readable by that tenant's MLflow login only; run name; tags), every other type is a 400
naming ``integrations[i].type``; and the run shows what was trained on what (model-training experiment, dataset
inputs, lineage tags), read back through the MLflow client.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from qwenvl_core.specs import EXPERIMENT_KIND_MODEL_TRAINING, EXPERIMENT_KIND_TAG, tenant_experiment_name
from tests.service.helpers import auth, make_settings
from tests.service.mlflow_jobs import new_tenant, processed_file, track_job, tracked_app
from tests.service.scheduler_harness import RecordingLauncher

INTEGRATION = {"type": "mlflow", "mlflow": {"experiment_name": "vision-sweep", "run_name": "lr 1e-4, r 8",
                                            "tags": {"team": "vision", "sweep/arm": "3"}}}


@pytest.fixture(scope="module")
def world(mlflow_auth_server, tiny_model_dir, tmp_path_factory) -> Any:
    root = tmp_path_factory.mktemp("integrations")
    with TestClient(tracked_app(root, tiny_model_dir, mlflow_auth_server)) as client:
        ctx = client.app.state.ctx
        tenants = {name: new_tenant(client, name) for name in ("int-a", "int-b")}
        files = {name: (processed_file(ctx, t["tenant"]["id"], "train.jsonl"),
                        processed_file(ctx, t["tenant"]["id"], "val.jsonl", [{"messages": [
                            {"role": "user", "content": "held out"}, {"role": "assistant", "content": "yes"}]}] * 3))
                 for name, t in tenants.items()}
        yield {"client": client, "ctx": ctx, "tenants": tenants, "files": files, "server": mlflow_auth_server}


def _create(world: Any, tenant: str, **body: Any) -> Any:
    train, val = world["files"][tenant]
    return world["client"].post("/v1/fine_tuning/jobs", headers=auth(world["tenants"][tenant]["key"]["key"]),
                                json={"model": "qwen-vl-tiny", "training_file": train, "validation_file": val, **body})


def _as(server: Any, login: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", login["username"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", login["password"])
    return MlflowClient(server.uri)


def client_admin(world: Any, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    """The platform's MLflow login (what jobs log with)."""
    server = world["server"]
    return _as(server, {"username": server.admin_username, "password": server.admin_password}, monkeypatch)


def _assert_400(response: Any, param: str, *words: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    for word in words:
        assert word in error["message"], error


@pytest.mark.parametrize("integration", [
    {"type": "wandb", "wandb": {"project": "my-project", "name": "run-1", "tags": ["a"]}},
    {"type": "comet", "comet": {}},
    {"type": "MLFLOW", "MLFLOW": {}},
], ids=["wandb", "unknown", "wrong-case"])
def test_other_types_are_refused_naming_the_type_and_what_is_supported(world, integration) -> None:
    response = _create(world, "int-a", integrations=[integration])
    _assert_400(response, "integrations[0].type", repr(integration["type"]), "not supported", '"mlflow"')
    assert response.json()["error"]["code"] == "unsupported_integration"


def test_the_index_of_the_refused_integration_is_named(world) -> None:
    response = _create(world, "int-a", integrations=[INTEGRATION, {"type": "wandb", "wandb": {"project": "p"}}])
    _assert_400(response, "integrations[1].type", "'wandb'")
    _assert_400(_create(world, "int-a", integrations=[INTEGRATION, INTEGRATION]), "integrations[1].type",
                "at most one")
    _assert_400(_create(world, "int-a", integrations=[{"mlflow": {}}]), "integrations[0].type", "required")


@pytest.mark.parametrize(("mlflow", "param", "word"), [
    ({"experiment_name": "../int-b/default"}, "integrations[0].mlflow.experiment_name", "pattern"),
    ({"experiment_name": "team/x"}, "integrations[0].mlflow.experiment_name", "pattern"),
    ({"experiment_name": "x" * 65}, "integrations[0].mlflow.experiment_name", "pattern"),
    ({"experiment_name": ""}, "integrations[0].mlflow.experiment_name", "pattern"),
    ({"run_name": "r" * 129}, "integrations[0].mlflow.run_name", "128"),
    ({"run_name": "bad\nname"}, "integrations[0].mlflow.run_name", "pattern"),
    ({"tags": {f"k{i}": "v" for i in range(17)}}, "integrations[0].mlflow.tags", "at most 16 tags"),
    ({"tags": {"mlflow.user": "admin"}}, "integrations[0].mlflow.tags", "reserved"),
    ({"tags": {"qwenvl.job_id": "ftjob-other"}}, "integrations[0].mlflow.tags", "reserved"),
    ({"tags": {"tenant": "int-b"}}, "integrations[0].mlflow.tags", "reserved"),
    ({"tags": {"k": "v" * 513}}, "integrations[0].mlflow.tags", "512"),
    ({"tags": {"bad\tkey": "v"}}, "integrations[0].mlflow.tags", "tag key"),
    ({"tags": {"k": 3}}, "integrations[0].mlflow.tags.k", "string"),
    ({"project": "wandb-style"}, "integrations[0].mlflow.project", "Extra inputs"),
], ids=["dotdot", "slash", "long-exp", "empty-exp", "long-run", "control-run", "many-tags", "mlflow-tag",
        "qwenvl-tag", "tenant-tag", "long-value", "bad-key", "int-value", "unknown-field"])
def test_mlflow_fields_are_validated(world, mlflow, param, word) -> None:
    _assert_400(_create(world, "int-a", integrations=[{"type": "mlflow", "mlflow": mlflow}]), param, word)


def test_an_unknown_key_of_the_integration_object_is_named(world) -> None:
    response = _create(world, "int-a", integrations=[{"type": "mlflow", "mlflow": {}, "wandb": {"project": "p"}}])
    _assert_400(response, "integrations[0].wandb", "unknown field")
    _assert_400(_create(world, "int-a", integrations=[{"type": "mlflow", "mlflow": "exp"}]),
                "integrations[0].mlflow", "object")


def test_mlflow_is_refused_where_the_platform_runs_no_mlflow(tmp_path: Path, tiny_model_dir: Path) -> None:
    from service.main import create_app
    from tests.service.mlflow_jobs import ADMIN_KEY

    settings = make_settings(tmp_path, tiny_model_dir, admin_key=ADMIN_KEY)
    with TestClient(create_app(settings, launcher=RecordingLauncher())) as client:
        tenant = new_tenant(client, "no-mlflow")
        train = processed_file(client.app.state.ctx, tenant["tenant"]["id"], "train.jsonl")
        response = client.post("/v1/fine_tuning/jobs", headers=auth(tenant["key"]["key"]), json={
            "model": "qwen-vl-tiny", "training_file": train, "integrations": [{"type": "mlflow"}]})
        _assert_400(response, "integrations[0].type", "QWENVL_MLFLOW_TRACKING_URI")
        assert response.json()["error"]["code"] == "integration_unavailable"
        response = client.post("/v1/fine_tuning/jobs", headers=auth(tenant["key"]["key"]),
                               json={"model": "qwen-vl-tiny", "training_file": train})
        assert response.status_code == 200 and response.json()["integrations"] is None


@pytest.fixture(scope="module")
def tracked(world) -> Any:
    """Tenant A's job with the mlflow integration, launched and logged; tenant B's job with the same experiment
    name and no other option; both runs finished."""
    created = _create(world, "int-a", integrations=[INTEGRATION])
    assert created.status_code == 200, created.text
    other = _create(world, "int-b", integrations=[{"type": "mlflow", "mlflow": {"experiment_name": "vision-sweep"}}])
    assert other.status_code == 200, other.text
    spec_a, run_a = track_job(world["ctx"], created.json()["id"], world["server"])
    spec_b, run_b = track_job(world["ctx"], other.json()["id"], world["server"])
    return {"job": created.json(), "other": other.json(), "spec": spec_a, "run": run_a, "run_b": run_b}


def test_the_job_returns_the_integration_as_stored(world, tracked) -> None:
    stored = [{"type": "mlflow", "mlflow": {**INTEGRATION["mlflow"]}}]
    assert tracked["job"]["integrations"] == stored
    fetched = world["client"].get(f"/v1/fine_tuning/jobs/{tracked['job']['id']}",
                                  headers=auth(world["tenants"]["int-a"]["key"]["key"]))
    assert fetched.json()["integrations"] == stored
    assert tracked["other"]["integrations"] == [{"type": "mlflow", "mlflow": {
        "experiment_name": "vision-sweep", "run_name": None, "tags": {}}}]


def test_the_run_lands_in_the_tenants_experiment_with_its_name_and_tags(world, tracked, monkeypatch) -> None:
    tenant_a = world["tenants"]["int-a"]["tenant"]["id"]
    admin = client_admin(world, monkeypatch)
    run = admin.get_run(tracked["run"])
    experiment = admin.get_experiment(run.info.experiment_id)
    assert experiment.name == tenant_experiment_name(tenant_a, "vision-sweep") == f"{tenant_a}/vision-sweep"
    assert run.info.run_name == "lr 1e-4, r 8" and run.info.status == "FINISHED"
    assert run.data.tags["team"] == "vision" and run.data.tags["sweep/arm"] == "3"
    assert run.data.tags["qwenvl.job_id"] == tracked["job"]["id"] and run.data.tags["tenant"] == tenant_a
    other = admin.get_run(tracked["run_b"])
    assert other.info.experiment_id != run.info.experiment_id
    assert other.info.run_name == tracked["other"]["id"]  # default run name: the job id


def test_each_tenant_reads_its_own_named_experiment_and_not_the_others(world, tracked, monkeypatch) -> None:
    logins = {name: t["mlflow"] for name, t in world["tenants"].items()}
    ids = {name: world["tenants"][name]["tenant"]["id"] for name in logins}
    runs = {"int-a": tracked["run"], "int-b": tracked["run_b"]}
    for me, other in (("int-a", "int-b"), ("int-b", "int-a")):
        client = _as(world["server"], logins[me], monkeypatch)
        mine = client.get_experiment_by_name(f"{ids[me]}/vision-sweep")
        assert mine is not None
        assert [r.info.run_id for r in client.search_runs([mine.experiment_id])] == [runs[me]]
        theirs = client_admin(world, monkeypatch).get_run(runs[other]).info.experiment_id
        client = _as(world["server"], logins[me], monkeypatch)
        with pytest.raises(MlflowException, match="PERMISSION_DENIED|403"):
            client.get_experiment(theirs)
        with pytest.raises(MlflowException, match="PERMISSION_DENIED|403"):
            client.get_run(runs[other])
        assert {e.name for e in client.search_experiments()} == {f"{ids[me]}/default", f"{ids[me]}/vision-sweep"}


def test_experiments_are_model_training_experiments(world, tracked, monkeypatch) -> None:
    admin = client_admin(world, monkeypatch)
    for tenant in world["tenants"].values():
        for name in ("default", "vision-sweep"):  # made with the tenant / on job creation
            experiment = admin.get_experiment_by_name(f"{tenant['tenant']['id']}/{name}")
            assert experiment.tags.get(EXPERIMENT_KIND_TAG) == EXPERIMENT_KIND_MODEL_TRAINING, (name, experiment.tags)


def test_the_files_are_the_runs_dataset_inputs(world, tracked, monkeypatch) -> None:
    from service.models import File

    admin = client_admin(world, monkeypatch)
    inputs = admin.get_run(tracked["run"]).inputs.dataset_inputs
    by_context = {{t.key: t.value for t in i.tags}["mlflow.data.context"]: i.dataset for i in inputs}
    assert set(by_context) == {"training", "validation"}
    train_id, val_id = world["files"]["int-a"]
    with world["ctx"].sessions() as s:
        rows = {row.id: row for row in s.query(File).filter(File.id.in_([train_id, val_id]))}
    for context, file_id in (("training", train_id), ("validation", val_id)):
        dataset, row = by_context[context], rows[file_id]
        assert dataset.name == file_id
        assert dataset.digest == row.sha256[:32]
        assert dataset.source_type == "local"
        assert world["ctx"].storage.uri_of_key(row.storage_key) in dataset.source
    assert rows[train_id].sha256 != rows[val_id].sha256


def test_lineage_is_in_the_run_tags(world, tracked, monkeypatch) -> None:
    admin = client_admin(world, monkeypatch)
    tags = admin.get_run(tracked["run"]).data.tags
    train_id, val_id = world["files"]["int-a"]
    assert tags["qwenvl.base_model"] == "qwen-vl-tiny"
    assert tags["qwenvl.training_file"] == train_id and tags["qwenvl.validation_file"] == val_id
    assert "qwenvl.parent_model" not in tags  # trained from a base model
    assert train_id in tags["mlflow.note.content"] and tracked["job"]["id"] in tags["mlflow.note.content"]
    history = admin.get_metric_history(tracked["run"], "train_loss")
    assert len(history) == 12 and history[-1].value < history[0].value


def test_a_spec_without_listed_datasets_logs_its_files_hashed(world, tmp_path: Path, tiny_model_dir: Path,
                                                               monkeypatch) -> None:
    """``qwenvl finetune``'s specs list no datasets: the tracker hashes the files, in a new experiment it marks as a
    model-training one."""
    import hashlib

    from qwenvl_core.specs import FineTuneJobSpec, JobState
    from tests.service.helpers import SAMPLES, jsonl
    from workflows.tracking import MlflowTracker

    train = tmp_path / "cli-train.jsonl"
    train.write_bytes(jsonl(SAMPLES))
    server = world["server"]
    spec = FineTuneJobSpec(job_id="cli-job", base_model=str(tiny_model_dir), train_file=str(train),
                           output_uri=str(tmp_path / "run"), tracking={"tracking_uri": server.uri, "experiment": "cli"})
    admin = client_admin(world, monkeypatch)  # sets the platform's login in the environment
    tracker = MlflowTracker(spec, system_metrics=False)
    tracker.on_start({"params": {}, "config": spec.model_dump(mode="json"), "data_reports": {}})
    tracker.finish(JobState.SUCCEEDED, None, [])
    run = admin.get_run(tracker.run_id)
    [dataset_input] = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "cli-train.jsonl"
    assert dataset_input.dataset.digest == hashlib.sha256(train.read_bytes()).hexdigest()[:32]
    assert [t.value for t in dataset_input.tags if t.key == "mlflow.data.context"] == ["training"]
    experiment = admin.get_experiment(run.info.experiment_id)
    assert experiment.name == "local/cli"
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND_MODEL_TRAINING
