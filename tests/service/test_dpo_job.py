"""DPO through the API, driven by the official ``openai`` client: a preference file (images as data URLs) is
validated, a ``method: dpo`` job trains on the real workflow (``python -m workflows.finetune`` on a real local Ray
head, Ray Train with two workers), succeeds, and its events carry the DPO metrics; bad preference lines are reported
with line and field; a bad beta is a 400 naming ``method.dpo.hyperparameters.beta``."""

from __future__ import annotations

import base64
import io
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from PIL import Image

from tests.service.conftest import ApiServer, server_env
from tests.service.helpers import wait_for

GOOD = ["red", "blue", "green", "yellow"]
BAD = ["circle", "square", "triangle", "star"]


def _image_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (30, 200, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def preference_lines(n: int, seed: int) -> list[dict[str, Any]]:
    rng, image = random.Random(seed), _image_url()
    lines = []
    for i in range(n):
        content: list[dict[str, Any]] = [{"type": "text", "text": f"Item {seed}-{i}: pick one word."}]
        if i % 2 == 0:
            content.insert(0, {"type": "image_url", "image_url": {"url": image}})
        lines.append({"input": {"messages": [{"role": "user", "content": content}]},
                      "preferred_output": [{"role": "assistant", "content": rng.choice(GOOD)}],
                      "non_preferred_output": [{"role": "assistant", "content": rng.choice(BAD)}]})
    return lines


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, ray_dashboard: str
           ) -> Iterator[openai.OpenAI]:
    root = tmp_path_factory.mktemp("dpo_api")
    env = server_env(root / "data", tiny_model_dir, ray_dashboard,
                     QWENVL_JOB_ENTRYPOINT="{python} -m workflows.finetune --spec {spec}",
                     QWENVL_JOB_ENV=json.dumps({"OMP_NUM_THREADS": "1"}))
    srv = ApiServer(env, root / "api.log")
    srv.start()
    try:
        yield openai.OpenAI(api_key=(root / "data" / "api_key").read_text().strip(), base_url=f"{srv.url}/v1",
                            max_retries=0)
    finally:
        srv.stop()


def _upload(client: openai.OpenAI, tmp_path: Path, name: str, lines: list[Any]) -> Any:
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    with path.open("rb") as fh:
        uploaded = client.files.create(file=fh, purpose="fine-tune")
    return wait_for(lambda: client.files.retrieve(uploaded.id).model_dump(), lambda d: d["status"] != "uploaded",
                    timeout=120)


@pytest.mark.slow  # Ray Train starts two workers (~1-3 min on 2 busy vCPUs)
def test_dpo_job_trains_on_ray_and_reports_preference_metrics(client: openai.OpenAI, tmp_path: Path) -> None:
    train = _upload(client, tmp_path, "train.jsonl", preference_lines(16, 1))
    val = _upload(client, tmp_path, "val.jsonl", preference_lines(8, 2))
    assert train["status"] == "processed" and train["validation"]["format"] == "preference", train
    job = client.fine_tuning.jobs.create(
        model="qwen-vl-tiny", training_file=train["id"], validation_file=val["id"], suffix="dpo", seed=1,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1, "batch_size": 2,
                                                           "learning_rate_multiplier": 500}}},
        extra_body={"compute": {"num_workers": 2, "cpus_per_worker": 0.5}, "micro_batch_size": 1,
                    "lora": {"r": 8, "alpha": 16}, "evaluation": {"compare_base": True}})
    assert job.method.type == "dpo" and job.method.dpo is not None
    assert job.method.dpo.hyperparameters.beta == 0.2
    done = wait_for(lambda: client.fine_tuning.jobs.retrieve(job.id).model_dump(),
                    lambda d: d["status"] in ("succeeded", "failed", "cancelled"), timeout=600)
    assert done["status"] == "succeeded", done
    assert done["fine_tuned_model"] == f"ft:qwen-vl-tiny:default:dpo:{job.id}"
    assert done["method"]["type"] == "dpo" and done["method"]["dpo"] == {"hyperparameters": {
        "n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 500.0, "beta": 0.2}}
    events = client.fine_tuning.jobs.list_events(fine_tuning_job_id=job.id, limit=100).data
    steps = [e.data for e in events if e.type == "metrics"]
    assert steps and steps[0]["step"] == steps[0]["total_steps"] == 4  # 16 pairs / (2 per worker x 2 workers)
    assert {"reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward"} <= set(steps[0]["metrics"])
    (final,) = [e.data["metrics"] for e in events if e.message.startswith("evaluation at step 4")]
    assert {"eval/loss", "eval/reward_margin", "eval/preference_accuracy", "eval_base/preference_accuracy"} <= set(
        final)
    assert final["eval/reward_margin"] > 0 and final["eval/loss"] < final["eval_base/loss"]


def test_bad_preference_lines_are_reported_with_line_and_field(client: openai.OpenAI, tmp_path: Path) -> None:
    good = preference_lines(1, 3)[0]
    bad = _upload(client, tmp_path, "bad.jsonl", [
        good,
        {**good, "non_preferred_output": [{"role": "user", "content": "star"}]},
        {**good, "preferred_output": good["non_preferred_output"]},
        "{not json",
    ])
    assert bad["status"] == "error"
    errors = [(e["line"], e["field"]) for e in bad["validation"]["errors"]]
    assert errors[:2] == [(2, "non_preferred_output[0].role"), (3, "non_preferred_output")], bad["validation"]
    assert bad["validation"]["errors"][0]["text"].startswith("bad.jsonl:2: non_preferred_output[0].role: ")
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(model="qwen-vl-tiny", training_file=bad["id"], method={"type": "dpo"})
    assert err.value.body["param"] == "training_file"  # type: ignore[index]


@pytest.mark.parametrize("beta", [0, -1, 2.5, "high"])
def test_bad_beta_is_a_400_naming_the_field(client: openai.OpenAI, beta: Any) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(model="qwen-vl-tiny", training_file="file-any",
                                       method={"type": "dpo", "dpo": {"hyperparameters": {"beta": beta}}})
    body = err.value.body
    assert body["param"] == "method.dpo.hyperparameters.beta", body  # type: ignore[index]
    assert "beta must be" in body["message"]  # type: ignore[index]


def test_method_and_file_format_must_agree(client: openai.OpenAI, tmp_path: Path) -> None:
    chat = _upload(client, tmp_path, "chat.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                                  {"role": "assistant", "content": "a"}]}])
    pairs = _upload(client, tmp_path, "pairs.jsonl", preference_lines(2, 4))
    assert chat["status"] == pairs["status"] == "processed"
    for training_file, method, fragment in ((chat["id"], {"type": "dpo"}, "is in the openai format; method 'dpo'"),
                                            (pairs["id"], {"type": "supervised"}, "is in the preference format")):
        with pytest.raises(openai.BadRequestError) as err:
            client.fine_tuning.jobs.create(model="qwen-vl-tiny", training_file=training_file, method=method)
        body = err.value.body
        assert body["param"] == "training_file" and body["code"] == "invalid_file_format", body  # type: ignore[index]
        assert fragment in body["message"]  # type: ignore[index]
