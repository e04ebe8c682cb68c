"""User mistakes in requests are a 400 (or the 404 of an unknown id) naming the field, never a 500 and never
silently ignored: pagination cursors, text that cannot be stored, upload names, duplicated hyperparameters and
infinite numbers. TestClient on SQLite and local storage, scheduler off (like ``test_api.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service import repository as repo
from service.main import create_app
from service.storage import MAX_FILENAME, safe_filename
from tests.service.helpers import SAMPLES, auth, jsonl, make_settings, new_tenant, upload, wait_file

ADMIN = "admin-key-for-tests-0123456789"


@dataclass
class Api:
    client: TestClient
    key: str
    tenant: str
    file: str  # a processed training file of the tenant

    def post_raw(self, path: str, raw: str, key: str | None = None) -> Any:
        """POST ``raw`` JSON text as is: lone surrogates (``\\ud800``) and ``Infinity`` are not what a JSON encoder
        writes, but what a client can send."""
        return self.client.post(path, content=raw.encode(), headers={**auth(key or self.key),
                                                                     "Content-Type": "application/json"})

    def job_raw(self, extra: str) -> Any:
        """POST a job whose body is the model, the training file and ``extra`` (JSON members, no braces)."""
        return self.post_raw("/v1/fine_tuning/jobs",
                             f'{{"model": "qwen-vl-tiny", "training_file": "{self.file}", {extra}}}')

    def job(self, **body: Any) -> Any:
        return self.client.post("/v1/fine_tuning/jobs", json={"model": "qwen-vl-tiny", "training_file": self.file,
                                                              **body}, headers=auth(self.key))

    def cancel(self, resp: Any) -> None:
        if resp.status_code == 200:
            self.client.post(f"/v1/fine_tuning/jobs/{resp.json()['id']}/cancel", headers=auth(self.key))


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Api]:
    settings = make_settings(tmp_path_factory.mktemp("validation"), tiny_model_dir, admin_key=ADMIN,
                             default_max_active_jobs=100, estimate_tokens_per_second=100.0)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        tenant, key = new_tenant(client, ADMIN, "alpha")
        file_id = upload(client, key)["id"]
        assert wait_file(client, key, file_id)["status"] == "processed"
        yield Api(client, key, tenant, file_id)


def _error(resp: Any, status: int, param: str | None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["param"] == param, err
    return err


# ----- pagination cursors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("tail", ["²", "99999999999999999999999"])
def test_event_and_checkpoint_cursors_that_name_no_id_are_unknown_ids(api: Api, tail: str) -> None:
    """``str.isdigit`` is true for ``²`` (``int`` refuses it) and a 23-digit number overflows SQLite's integer:
    both were a 500; they are ids that do not exist, the 404 an unknown cursor gets."""
    resp = api.job()
    job_id = resp.json()["id"]
    try:
        for path, prefix in (("events", "ftevent-"), ("checkpoints", "ftckpt-")):
            err = _error(api.client.get(f"/v1/fine_tuning/jobs/{job_id}/{path}", params={"after": prefix + tail},
                                        headers=auth(api.key)), 404, "after")
            assert err["code"] == "not_found" and f"{path[:-1]} with id '{prefix + tail}'" in err["message"]
        events = api.client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=auth(api.key)).json()["data"]
        page = api.client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"after": events[0]["id"]},
                              headers=auth(api.key))
        assert page.status_code == 200, page.text  # a real cursor still pages
    finally:
        api.cancel(resp)


def test_decimal_ids_are_ascii_digits_that_fit_a_bigint() -> None:
    assert repo.decimal_id("42") == 42 and repo.decimal_id("9" * 18) == 10**18 - 1
    for text in ("", "²", "٣", "1\x00", "-1", "+1", " 1", "9" * 19, "1e3"):
        assert repo.decimal_id(text) is None, text


# ----- text that cannot be stored -----------------------------------------------------------------------------
@pytest.mark.parametrize(("extra", "param"), [
    ('"metadata": {"a": "\\ud800"}', "metadata"),
    ('"metadata": {"\\udfff": "x"}', "metadata"),
    ('"metadata": {"a": "b\\u0000"}', "metadata"),
    ('"model": "qwen-vl-tiny\\ud800"', "model"),
    ('"integrations": [{"type": "mlflow", "mlflow": {"experiment_name": "\\ud800"}}]', "integrations"),
])
def test_job_text_that_cannot_be_stored_is_a_400_naming_its_field(api: Api, extra: str, param: str) -> None:
    """A lone surrogate has no UTF-8 encoding (the response, or the database, failed on it: a 500, or a job stored
    with it); PostgreSQL stores no NUL. Neither is a job."""
    before = api.client.get("/v1/fine_tuning/jobs", headers=auth(api.key)).json()["data"]
    resp = api.job_raw(extra)
    api.cancel(resp)
    err = _error(resp, 400, param)
    assert "U+" in err["message"]
    assert api.client.get("/v1/fine_tuning/jobs", headers=auth(api.key)).json()["data"] == before


def test_admin_key_name_that_cannot_be_stored_is_a_400(api: Api) -> None:
    resp = api.post_raw(f"/v1/admin/tenants/{api.tenant}/keys", '{"name": "ops \\ud83d"}', key=ADMIN)
    assert "U+D83D" in _error(resp, 400, "name")["message"]
    listed = api.client.get(f"/v1/admin/tenants/{api.tenant}/keys", headers=auth(ADMIN))
    assert listed.status_code == 200 and len(listed.json()) == 1
    # valid text beyond ASCII is kept, a surrogate pair (JSON's escape of an emoji) included
    made = api.post_raw(f"/v1/admin/tenants/{api.tenant}/keys", '{"name": "équipe \\ud83d\\ude00"}', key=ADMIN)
    assert made.status_code == 201 and made.json()["name"] == "équipe 😀", made.text
    resp = api.job(metadata={"équipe": "视觉 😀"})
    api.cancel(resp)
    assert resp.status_code == 200 and resp.json()["metadata"] == {"équipe": "视觉 😀"}, resp.text


# ----- upload names -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "stored"), [
    ("训练数据.jsonl", "upload.jsonl"),
    ("ü.jsonl", "upload.jsonl"),
    ("日本.zip", "upload.zip"),
    ("x" * 500 + ".jsonl", "x" * (MAX_FILENAME - len(".jsonl")) + ".jsonl"),
])
def test_unicode_and_long_upload_names_keep_their_suffix(api: Api, name: str, stored: str) -> None:
    """The suffix decides the format; it used to be lost (``file 'jsonl': expected one of ...``)."""
    doc = upload(api.client, api.key, jsonl(SAMPLES), name=name)
    assert doc["filename"] == stored
    if name.startswith("训"):  # (one is enough: validation reads the format from the suffix alike for all)
        assert wait_file(api.client, api.key, doc["id"])["status"] == "processed"


def test_an_upload_with_two_files_or_two_purposes_is_a_400_naming_the_part(api: Api) -> None:
    """The form kept the last of each and dropped the rest unsaid (two files: one stored, one lost)."""
    before = api.client.get("/v1/files", headers=auth(api.key)).json()["data"]
    two_files = [("file", ("a.jsonl", jsonl(SAMPLES))), ("file", ("b.jsonl", jsonl(SAMPLES)))]
    err = _error(api.client.post("/v1/files", files=two_files, data={"purpose": "fine-tune"}, headers=auth(api.key)),
                 400, "file")
    assert err["code"] == "duplicate_part" and "2 'file' parts" in err["message"]
    two_purposes = [("purpose", (None, "batch")), ("purpose", (None, "fine-tune")), ("file", ("a.jsonl", jsonl(SAMPLES)))]
    _error(api.client.post("/v1/files", files=two_purposes, headers=auth(api.key)), 400, "purpose")
    assert api.client.get("/v1/files", headers=auth(api.key)).json()["data"] == before


def test_safe_filename_keeps_the_suffix_and_stays_safe() -> None:
    assert safe_filename("a/../../b.jsonl") == "b.jsonl" and safe_filename("C:\\x\\..\\.bashrc") == "upload.bashrc"
    assert safe_filename("..") == "upload" and safe_filename("") == "upload" and safe_filename(".jsonl") == "upload.jsonl"
    assert safe_filename("données.tar.gz") == "donn_es.tar.gz" and safe_filename("t.JSONL") == "t.JSONL"
    assert safe_filename("a.jsonl\n") == "a.jsonl" and safe_filename("x.jsonl.") == "x.jsonl"
    long = safe_filename("é" + "y" * 300 + ".tar.gz")
    assert len(long) == MAX_FILENAME and long.startswith("yy") and long.endswith("y.tar.gz")


# ----- hyperparameters given twice ----------------------------------------------------------------------------
def test_top_level_hyperparameters_apply_to_a_method_without_its_own(api: Api) -> None:
    resp = api.job(hyperparameters={"n_epochs": 3}, method={"type": "supervised"})
    api.cancel(resp)
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["hyperparameters"]["n_epochs"] == 3
    assert job["method"]["supervised"]["hyperparameters"]["n_epochs"] == 3


@pytest.mark.parametrize("method", [
    {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 2}}},
    {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}},
])
def test_hyperparameters_given_twice_is_a_400(api: Api, method: dict[str, Any]) -> None:
    resp = api.job(hyperparameters={"n_epochs": 3}, method=method)
    api.cancel(resp)
    err = _error(resp, 400, "hyperparameters")
    assert f"method.{method['type']}.hyperparameters only" in err["message"]


# ----- infinite numbers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("extra", "param"), [
    ('"lora": {"alpha": Infinity}', "lora.alpha"),
    ('"lora": {"alpha": 1e309}', "lora.alpha"),
    ('"evaluation": {"early_stopping": {"min_delta": Infinity}}', "evaluation.early_stopping.min_delta"),
])
def test_infinite_numbers_in_a_job_are_a_400(api: Api, extra: str, param: str) -> None:
    resp = api.job_raw(extra)
    api.cancel(resp)
    assert "finite" in _error(resp, 400, param)["message"]


def test_infinite_throughput_in_an_estimate_is_a_400(api: Api) -> None:
    resp = api.post_raw("/v1/fine_tuning/estimate", f'{{"model": "qwen-vl-tiny", "training_file": "{api.file}", '
                        '"tokens_per_second": Infinity}')
    _error(resp, 400, "tokens_per_second")


@pytest.mark.parametrize(("body", "param"), [
    ({"validation_file": ""}, "validation_file"),
    ({"lora": {"targets": ["c_attn", ""]}}, "lora.targets"),
    ({"lora": {"modules_to_save": [""]}}, "lora.modules_to_save.0"),
])
def test_empty_names_are_a_400_naming_the_field(api: Api, body: dict[str, Any], param: str) -> None:
    """An empty file id or module name names nothing (an empty LoRA target matched nothing and failed the job only
    once it trained); the request is refused where it says so."""
    resp = api.job(**body)
    api.cancel(resp)
    _error(resp, 400, param)


@pytest.mark.parametrize(("raw", "says"), [
    (b'{"model": "\xff"}', "not valid UTF-8 (byte 12)"),
    (b'{"metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
])
def test_a_body_that_cannot_be_parsed_says_why(api: Api, raw: bytes, says: str) -> None:
    """FastAPI answers 'There was an error parsing the body' for any parse failure but JSON syntax."""
    resp = api.client.post("/v1/fine_tuning/jobs", content=raw,
                           headers={**auth(api.key), "Content-Type": "application/json"})
    err = _error(resp, 400, "body")
    assert err["code"] == "invalid_body" and says in err["message"], err
