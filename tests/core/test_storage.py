"""The object store interface, the same tests on local disk and on S3 (moto's HTTP server)."""

from __future__ import annotations

import hashlib
import io

import pytest

from qwenvl_core.storage import LocalStore, S3Store, StorageError, open_store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    server = request.getfixturevalue("s3_env")
    server.client().create_bucket(Bucket=f"bucket-{abs(hash(str(tmp_path))) % 10**8}")
    bucket = server.client().list_buckets()["Buckets"][-1]["Name"]
    return S3Store(bucket, client=server.client())


def test_put_get_list_delete(store):
    assert store.get_bytes("a/b.json") is None and not store.exists("a/b.json") and store.size("a/b.json") is None
    store.put_bytes("a/b.json", b"{}")
    store.put_bytes("a/c/d.txt", "数据".encode())
    store.put_bytes("ab.txt", b"x")
    assert store.get_bytes("a/c/d.txt").decode() == "数据"
    assert store.list_keys("a/") == ["a/b.json", "a/c/d.txt"]
    assert store.size("a/b.json") == 2
    store.delete("a")
    assert store.list_keys("a/") == [] and store.exists("ab.txt")


def test_streams_are_checksummed(store):
    payload = bytes(range(256)) * 40_000  # ~10 MB, more than one chunk
    stored = store.put_stream("big/blob.bin", io.BytesIO(payload))
    assert stored.size == len(payload) and stored.sha256 == hashlib.sha256(payload).hexdigest()
    with store.open_read("big/blob.bin") as src:
        assert src.read() == payload
    with pytest.raises(StorageError):
        store.open_read("big/missing.bin")


def test_local_keys_cannot_escape_the_root(tmp_path):
    store = LocalStore(tmp_path / "root")
    with pytest.raises(StorageError, match="escapes"):
        store.put_bytes("../outside.txt", b"x")
    assert not (tmp_path / "outside.txt").exists()


def test_open_store_parses_uris(tmp_path):
    store, prefix = open_store(str(tmp_path))
    assert isinstance(store, LocalStore) and prefix == ""
    with pytest.raises(StorageError, match="only local paths and s3://"):
        open_store("gs://bucket/x")
    with pytest.raises(StorageError, match="no bucket"):
        open_store("s3:///x")


def test_read_uri_local_and_s3(tmp_path, s3_env):
    from qwenvl_core.storage import read_uri

    (tmp_path / "spec.json").write_text('{"a": 1}')
    assert read_uri(str(tmp_path / "spec.json")) == b'{"a": 1}'
    s3_env.client().create_bucket(Bucket="specs")
    s3_env.client().put_object(Bucket="specs", Key="jobs/x/spec.json", Body=b"{}")
    assert read_uri("s3://specs/jobs/x/spec.json") == b"{}"
    with pytest.raises(StorageError, match="no such"):
        read_uri("s3://specs/jobs/missing.json")
    with pytest.raises(StorageError, match="no such"):
        read_uri(str(tmp_path / "missing.json"))
