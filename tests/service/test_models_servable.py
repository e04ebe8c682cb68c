"""``/v1/models`` says which models the chat route can serve now, and why not; the chat route refuses an unservable
adapter with the same reason (one decision: ``qwenvl_core.serving.servable``). The real control-plane app with the
chat route mounted on a real engine (qwen-vl-tiny), in process."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from qwenvl_core.serving import servable
from qwenvl_core.serving.chat import InProcessBackend
from qwenvl_core.serving.engine import EngineConfig, ServingEngine
from qwenvl_core.serving.lora_batch import AdapterError, read_adapter_config
from service import repository as repo
from service.main import create_app
from service.routes.chat import mount_chat
from tests.service.helpers import auth, make_settings, new_tenant
from tests.serving.conftest import make_adapter

BASE = "qwen-vl-tiny"
GONE = "qwen2-vl-gone"  # offered for training, deployed nowhere
ADMIN = "admin-key-for-tests-0123456789"
MAX_RANK = 8  # the servers' max_lora_rank here (the "good" adapter's rank)


def _edited(source: Path, target: Path, config: dict[str, Any] | None = None, meta: dict[str, Any] | None = None,
            drop: str | None = None) -> Path:
    shutil.copytree(source, target)
    if config:
        path = target / servable.ADAPTER_CONFIG
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if meta:
        (target / servable.ADAPTER_META).write_text(json.dumps(meta))
    if drop:
        (target / drop).unlink()
    return target


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One servable adapter and variants the engine cannot serve, each a PEFT directory."""
    root = tmp_path_factory.mktemp("servable")
    good = make_adapter(tiny_model_dir, root / "good", seed=1)
    return {
        "good": good,
        "gone": good,  # fine files, but on a base that is not deployed
        "missing": _edited(good, root / "missing", drop=servable.ADAPTER_WEIGHTS),
        "saved": _edited(good, root / "saved", {"modules_to_save": ["transformer.visual.attn_pool", "lm_head"]}),
        "dora": _edited(good, root / "dora", {"use_dora": True}),
        "family": _edited(good, root / "family", meta={"family": "qwen2-vl"}),
        "rank": make_adapter(tiny_model_dir, root / "rank", seed=2, rank=MAX_RANK * 2),
    }


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path,
           adapters: dict[str, Path]) -> Iterator[tuple[TestClient, str, dict[str, str]]]:
    """(client, tenant key, {adapter name: model id}) of the control plane serving BASE only."""
    engine = ServingEngine.from_model_dir(tiny_model_dir, EngineConfig(max_adapters=2, max_lora_rank=MAX_RANK))
    settings = make_settings(tmp_path_factory.mktemp("data"), tiny_model_dir, admin_key=ADMIN,
                             base_models={BASE: str(tiny_model_dir), GONE: str(tiny_model_dir / "absent")},
                             serve_max_lora_rank=MAX_RANK)
    app = create_app(settings)
    mount_chat(app, InProcessBackend({BASE: engine}))
    with TestClient(app) as client:
        tenant, key = new_tenant(client, ADMIN, "team-s")
        ids = {}
        with app.state.ctx.sessions.begin() as session:
            for i, (name, path) in enumerate(adapters.items()):
                base = GONE if name == "gone" else BASE
                ids[name] = f"ft:{base}:team-s:{name}:ftjob-{i}"
                repo.add_model(session, model_id=ids[name], tenant_id=tenant, base_model=base, job_id=f"ftjob-{i}",
                               adapter_uri=str(path))
        yield client, key, ids
    engine.close()


EXPECTED = {  # adapter -> (code, a phrase of the reason)
    "gone": (servable.BASE_NOT_DEPLOYED, f"base model {GONE} is not deployed on this cluster"),
    "missing": (servable.FILES_MISSING, f"missing from storage ({servable.ADAPTER_WEIGHTS})"),
    "saved": (servable.NOT_SUPPORTED, "modules_to_save 'lm_head' is outside the vision tower"),
    "dora": (servable.NOT_SUPPORTED, "use_dora is set"),
    "family": (servable.NOT_SUPPORTED, "trained on a qwen2-vl model, its base model is qwen-vl"),
    "rank": (servable.NOT_SUPPORTED, f"its LoRA rank {2 * MAX_RANK} is above the largest rank the model servers "
                                     f"hold (max_lora_rank {MAX_RANK})"),
}


def _chat(client: TestClient, key: str, model: str) -> Any:
    body = {"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    return client.post("/v1/chat/completions", json=body, headers=auth(key))


def test_models_say_whether_they_are_servable_and_why_not(served) -> None:
    client, key, ids = served
    listed = {m["id"]: m for m in client.get("/v1/models", headers=auth(key)).json()["data"]}
    assert listed[BASE]["servable"] is True and listed[BASE]["unservable_reason"] is None
    assert listed[GONE]["servable"] is False and listed[GONE]["unservable_code"] == servable.BASE_NOT_DEPLOYED
    assert f"base model {GONE} is not deployed" in listed[GONE]["unservable_reason"]
    assert listed[ids["good"]]["servable"] is True and listed[ids["good"]]["unservable_code"] is None
    for name, (code, phrase) in EXPECTED.items():
        model = listed[ids[name]]
        assert (model["servable"], model["unservable_code"]) == (False, code), name
        assert phrase in model["unservable_reason"], (name, model["unservable_reason"])
        assert client.get(f"/v1/models/{ids[name]}", headers=auth(key)).json() == model  # retrieve agrees


def test_chat_refuses_a_listed_unservable_adapter_with_the_listed_reason(served) -> None:
    client, key, ids = served
    listed = {m["id"]: m for m in client.get("/v1/models", headers=auth(key)).json()["data"]}
    refused = [m for m in listed.values() if m["servable"] is False and m["kind"] == "adapter"]
    assert len(refused) == len(EXPECTED)
    for model in refused:
        answer = _chat(client, key, model["id"])
        error = answer.json()["error"]
        assert answer.status_code == 400 and error["param"] == "model", (model["id"], answer.text)
        assert error["code"] == model["unservable_code"]
        assert error["message"] == f"the model {model['id']!r} cannot be served: {model['unservable_reason']}"
    answer = _chat(client, key, ids["good"])
    assert answer.status_code == 200 and answer.json()["model"] == ids["good"]


def test_the_engine_refuses_with_the_same_rule(adapters: dict[str, Path]) -> None:
    """The engine's own load-time check is the same function: the reason the API lists is what it raises."""
    for name in ("saved", "dora", "family", "rank"):
        reason = servable.adapter_refusal(BASE, str(adapters[name]), {BASE: "qwen-vl"}, max_rank=MAX_RANK)
        assert reason is not None
        with pytest.raises(AdapterError) as raised:
            read_adapter_config(adapters[name], "qwen-vl", max_rank=MAX_RANK)
        assert reason.reason.endswith(str(raised.value).split(": ", 1)[1])
    assert read_adapter_config(adapters["good"], "qwen-vl", max_rank=MAX_RANK)["peft_type"] == "LORA"
    assert read_adapter_config(adapters["rank"], "qwen-vl")["r"] == 2 * MAX_RANK  # no max_rank: not checked


def test_the_largest_rank_counts_the_per_module_ranks() -> None:
    assert servable.largest_rank({"r": 8, "rank_pattern": {"q_proj": 32, "v_proj": 4}}) == 32
    assert servable.largest_rank({"r": 16}) == 16
    assert servable.largest_rank({"r": "sixteen", "rank_pattern": None}) is None
    refusal = servable.config_refusal({"r": 8, "rank_pattern": {"mlp.w1": 128}}, max_rank=64)
    assert refusal is not None and "rank 128" in refusal
    assert servable.config_refusal({"r": 64}, max_rank=64) is None


def test_the_openai_client_still_parses_the_listing(served) -> None:
    client, key, ids = served
    models = openai.OpenAI(api_key=key, base_url="http://testserver/v1", http_client=client).models.list()
    by_id = {m.id: m for m in models.data}
    assert by_id[ids["good"]].model_extra["servable"] is True
    assert by_id[ids["missing"]].model_extra["unservable_code"] == servable.FILES_MISSING


def test_an_api_without_model_servers_serves_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path, tiny_model_dir, admin_key=ADMIN))) as client:
        _, key = new_tenant(client, ADMIN, "team-n")
        (base,) = client.get("/v1/models", headers=auth(key)).json()["data"]
    assert (base["servable"], base["unservable_code"]) == (False, servable.BASE_NOT_DEPLOYED)
    assert "serves no chat completions" in base["unservable_reason"]


def test_the_family_tables_agree_with_the_registry() -> None:
    """servable's torch-free facts (model_type -> family, vision prefix) are the registry families' own."""
    from qwenvl_core.models.registry import FamilyName, get_family

    assert set(servable.FAMILY_OF_MODEL_TYPE.values()) == set(servable.VISION_PREFIX) == {f.value for f in FamilyName}
    for model_type, name in servable.FAMILY_OF_MODEL_TYPE.items():
        family = get_family(name)
        assert family.matches({"model_type": model_type, "visual": {}})
        prefix = servable.VISION_PREFIX[name]
        assert family.component_of(prefix + "blocks.0.attn.qkv.weight") in ("vision", "adapter")
        assert family.component_of(prefix.replace("visual", "language_model") + "layers.0.weight") == "language"


def test_a_decision_is_kept_for_a_short_while_then_read_again(adapters: dict[str, Path], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The chat route asks on every request: the stored files are read once per ``DECISION_TTL_S``, not each time."""
    adapter = tmp_path / "adapter"
    shutil.copytree(adapters["good"], adapter)
    assert servable.adapter_refusal(BASE, str(adapter), {BASE: "qwen-vl"}) is None
    (adapter / servable.ADAPTER_WEIGHTS).unlink()
    assert servable.adapter_refusal(BASE, str(adapter), {BASE: "qwen-vl"}) is None  # the kept decision
    monkeypatch.setattr(servable, "DECISION_TTL_S", 0.0)
    monkeypatch.setattr(servable, "_decisions", type(servable._decisions)())
    refusal = servable.adapter_refusal(BASE, str(adapter), {BASE: "qwen-vl"})
    assert refusal is not None and refusal.code == servable.FILES_MISSING
