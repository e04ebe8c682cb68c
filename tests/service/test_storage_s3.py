"""The API on S3 storage (moto's server over HTTP): uploads streamed with checksums, per-tenant keys, content
download, deletion, and validation reading back from S3."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi.testclient import TestClient

from service.main import create_app
from service.storage import TenantStorage, safe_filename
from tests.fixtures.s3 import S3Server
from tests.service.helpers import SAMPLES, auth, jsonl, make_settings, upload, wait_file


def test_files_on_s3_use_the_tenant_layout(tmp_path: Path, tiny_model_dir: Path, s3_env: S3Server) -> None:
    s3_env.client().create_bucket(Bucket="qwenvl-test")
    settings = make_settings(tmp_path, tiny_model_dir, storage_uri="s3://qwenvl-test/platform")
    with TestClient(create_app(settings)) as client:
        key = (tmp_path / "api_key").read_text().strip()
        body = jsonl(SAMPLES)
        doc = upload(client, key, body, "../../evil name.jsonl")
        assert doc["sha256"] == hashlib.sha256(body).hexdigest() and doc["filename"] == "evil_name.jsonl"
        admin = (tmp_path / "admin_key").read_text().strip()
        tenant = client.get("/v1/admin/tenants", headers=auth(admin)).json()["data"][0]["id"]
        keys = [o["Key"] for o in s3_env.client().list_objects_v2(Bucket="qwenvl-test")["Contents"]]
        assert keys == [f"platform/tenants/{tenant}/files/{doc['id']}/evil_name.jsonl"]
        assert wait_file(client, key, doc["id"])["status"] == "processed"
        assert client.get(f"/v1/files/{doc['id']}/content", headers=auth(key)).content == body
        client.delete(f"/v1/files/{doc['id']}", headers=auth(key))
        assert "Contents" not in s3_env.client().list_objects_v2(Bucket="qwenvl-test")


def test_layout_helpers() -> None:
    storage = TenantStorage("/srv/objects")
    assert storage.run_uri("t1", "ftjob-1") == "/srv/objects/tenants/t1/runs/ftjob-1"
    assert storage.key_of_uri(storage.uri_of_key("tenants/t1/files/f/x.jsonl")) == "tenants/t1/files/f/x.jsonl"
    assert safe_filename("C:\\data\\..\\a b.jsonl") == "a_b.jsonl" and safe_filename("..") == "upload"
