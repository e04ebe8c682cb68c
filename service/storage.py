"""Per-tenant object layout on top of ``qwenvl_core.storage`` (local disk or S3; one client, not a second).

Layout under the storage root (a local path or ``s3://bucket/prefix``)::

    tenants/{tenant_id}/files/{file_id}/{filename}     uploaded files, streamed with size + sha256 recorded
    tenants/{tenant_id}/runs/{job_id}/                 the run directory of a job (``qwenvl_core.runs``)
    tenants/{tenant_id}/runs/{job_id}/adapter/         the PEFT adapter a successful job produced

Keys are built only here, from ids the service generated, so a tenant can never name another tenant's object.
"""

from __future__ import annotations

import re
import tarfile
from pathlib import Path
from typing import IO

from qwenvl_core.storage import CHUNK_BYTES, ObjectStore, StoredObject, join_key, open_store

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SUFFIX = re.compile(r"(?:\.[A-Za-z0-9]{1,16}){1,2}\Z")  # ".jsonl", ".tar.gz": taken from the raw name
MAX_FILENAME = 200


def safe_filename(name: str) -> str:
    """The last path component of ``name`` with unusual characters replaced: never empty, never a dot file, at
    most ``MAX_FILENAME`` characters. Its suffix (up to two ASCII ``.ext`` parts) is kept as given, also when the
    stem is shortened or has no ASCII character left (``训练数据.jsonl`` -> ``upload.jsonl``)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    match = _SUFFIX.search(base)
    suffix = match.group(0) if match else ""
    stem = _UNSAFE.sub("_", base[: len(base) - len(suffix)]).strip("._") or "upload"
    return stem[: MAX_FILENAME - len(suffix)].rstrip(".") + suffix


class TenantStorage:
    """The service's object storage, with the tenant layout of the module docstring."""

    def __init__(self, root_uri: str) -> None:
        self.root_uri = root_uri.rstrip("/")
        self.store: ObjectStore
        self.store, self.prefix = open_store(self.root_uri)

    def file_key(self, tenant_id: str, file_id: str, filename: str) -> str:
        return join_key(self.prefix, "tenants", tenant_id, "files", file_id, safe_filename(filename))

    def files_prefix(self, tenant_id: str) -> str:
        """The key prefix under which ``file_key`` puts the tenant's uploads (``{prefix}{file_id}/{filename}``)."""
        return join_key(self.prefix, "tenants", tenant_id, "files") + "/"

    def run_uri(self, tenant_id: str, job_id: str) -> str:
        return f"{self.root_uri}/tenants/{tenant_id}/runs/{job_id}"

    def uri_of_key(self, key: str) -> str:
        """A URI (or local path) other processes can open for a key of this store."""
        rel = key[len(self.prefix):].lstrip("/") if self.prefix else key
        return f"{self.root_uri}/{rel}"

    def key_of_uri(self, uri: str) -> str:
        """The store key of a URI inside this storage root."""
        if not uri.startswith(self.root_uri + "/"):
            raise ValueError(f"{uri!r} is not inside the storage root {self.root_uri!r}")
        return join_key(self.prefix, uri[len(self.root_uri) + 1:])

    def put(self, key: str, stream: IO[bytes]) -> StoredObject:
        return self.store.put_stream(key, stream)

    def open(self, key: str) -> IO[bytes]:
        return self.store.open_read(key)

    def delete(self, key: str) -> None:
        self.store.delete(key)

    def size(self, key: str) -> int | None:
        return self.store.size(key)

    def write_tar_gz(self, prefix_uri: str, archive: Path, arcname: str) -> int:
        """Write every object under ``prefix_uri`` into a ``.tar.gz`` at ``archive`` (streamed); returns members."""
        prefix = self.key_of_uri(prefix_uri).rstrip("/") + "/"
        keys = self.store.list_keys(prefix)
        with tarfile.open(archive, "w:gz") as tar:
            for key in keys:
                size = self.store.size(key) or 0
                info = tarfile.TarInfo(f"{arcname}/{key[len(prefix):]}")
                info.size, info.mode = size, 0o644
                with self.store.open_read(key) as src:
                    tar.addfile(info, _Reader(src))
        return len(keys)


class _Reader:
    """A file-like wrapper giving tarfile bounded reads from a store stream."""

    def __init__(self, src: IO[bytes]) -> None:
        self.src = src

    def read(self, n: int = CHUNK_BYTES) -> bytes:
        return self.src.read(n if n and n > 0 else CHUNK_BYTES)
