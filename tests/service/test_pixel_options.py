"""Per-job ``min_pixels`` / ``max_pixels`` through the API: job creation stores them in the job's spec, a base model
that cannot take them (Qwen-VL v1, or a budget its processor cannot honour) is a 400 naming the option, and the
estimate counts image tokens with them (the real app in-process, SQLite, local storage, the real worker)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from qwenvl_core.models.processing import ProcessorOptions
from qwenvl_core.models.registry import get_family
from service.jobspec import build_spec
from service.main import create_app
from tests.service.helpers import auth, jsonl, make_settings, new_tenant, upload, wait_file

ADMIN = "admin-key-for-tests-0123456789"
SIZE = (800, 600)  # larger than the tiny Qwen2.5-VL's max_pixels (256 x 28 x 28)


def _data_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", SIZE, (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass
class Api:
    client: TestClient
    key: str
    file_id: str
    hf_dir: Path


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Api]:
    hf_dir = get_family("qwen2.5-vl").materialize("qwen2.5-vl-tiny", tmp_path_factory.mktemp("m") / "q25", seed=0)
    settings = make_settings(tmp_path_factory.mktemp("api"), tiny_model_dir, admin_key=ADMIN,
                             base_models={"qwen-vl-tiny": str(tiny_model_dir), "qwen2.5-vl-tiny": str(hf_dir)},
                             estimate_tokens_per_second=100.0)
    record = {"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url()}},
                                     {"type": "text", "text": "What colour is it?"}]},
        {"role": "assistant", "content": "red"}]}
    with TestClient(create_app(settings)) as client:
        _, key = new_tenant(client, ADMIN, "pixels")
        file_id = upload(client, key, jsonl([record, record]))["id"]
        assert wait_file(client, key, file_id)["status"] == "processed"
        yield Api(client, key, file_id, hf_dir)


def _post(api: Api, path: str, **body: object):
    return api.client.post(f"/v1/fine_tuning/{path}", json={"training_file": api.file_id, **body},
                           headers=auth(api.key))


def _error(resp, param: str) -> str:
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param, err
    return err["message"]


def test_a_job_on_a_dynamic_resolution_family_carries_its_pixel_budget(api: Api) -> None:
    resp = _post(api, "jobs", model="qwen2.5-vl-tiny", min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["extensions"]["min_pixels"] == 3136 and job["extensions"]["max_pixels"] == 50176
    spec = build_spec(job_id=job["id"], tenant_id="t", base_model_path=str(api.hf_dir), train_uri="x",
                      validation_uri=None, output_uri="y", seed=1, hyperparameters=job["hyperparameters"],
                      ext=job["extensions"])  # what the scheduler writes as the job's spec.json
    assert (spec.hyperparameters.min_pixels, spec.hyperparameters.max_pixels) == (3136, 50176)
    api.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=auth(api.key))


@pytest.mark.parametrize(("body", "param", "fragment"), [
    ({"model": "qwen-vl-tiny", "max_pixels": 200_000}, "max_pixels", "resizes every image to one fixed size"),
    ({"model": "qwen-vl-tiny", "min_pixels": 4000}, "min_pixels", "Qwen2-VL, Qwen2.5-VL and Qwen3-VL"),
    ({"model": "qwen2.5-vl-tiny", "min_pixels": 300_000}, "min_pixels",
     "must not exceed max_pixels 200704 .*preprocessor_config.json"),
    ({"model": "qwen2.5-vl-tiny", "min_pixels": 9000, "max_pixels": 8000}, "max_pixels", "must not exceed"),
    ({"model": "qwen2.5-vl-tiny", "max_pixels": 100}, "max_pixels", "greater than or equal to 784"),
    ({"model": "qwen2.5-vl-tiny", "max_pixels": 10**9}, "max_pixels", "less than or equal to 16777216"),
])
@pytest.mark.parametrize("path", ["jobs", "estimate"])
def test_pixel_options_a_base_model_cannot_take_are_a_400_naming_the_option(api: Api, path, body, param,
                                                                            fragment) -> None:
    import re

    assert re.search(fragment, _error(_post(api, path, **body), param))


def test_the_estimate_counts_image_tokens_with_the_jobs_budget(api: Api) -> None:
    totals = {}
    for label, options in (("default", ProcessorOptions()), ("small", ProcessorOptions(max_pixels=28 * 28 * 16))):
        resp = _post(api, "estimate", model="qwen2.5-vl-tiny", **options.set_fields())
        assert resp.status_code == 200, resp.text
        totals[label] = resp.json()["total_tokens"]
        processor = get_family("qwen2.5-vl").load_processor(api.hf_dir, options)
        totals[f"{label}_images"] = 2 * processor.image_tokens(SIZE)  # two samples, one image each
    assert totals["small_images"] <= 2 * 16 < totals["default_images"]
    assert totals["default"] - totals["small"] == totals["default_images"] - totals["small_images"]
