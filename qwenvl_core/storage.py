"""Object storage on local disk or S3: one small interface used by training runs and by the service.

A *store* holds bytes under string keys (``a/b/c.json``). ``open_store(uri)`` returns the store and the key
prefix for a local path or an ``s3://bucket/prefix`` URI. S3 goes through boto3; an S3-compatible endpoint
(MinIO, moto) comes from ``AWS_ENDPOINT_URL`` as boto3 reads it. Local writes are atomic and durable
(temporary file, fsync, rename, fsync of the directory); an S3 PUT is all or nothing. Streams are copied in
chunks, never read whole into memory.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

from qwenvl_core.errors import QwenVLError

CHUNK_BYTES = 8 * 1024 * 1024
_T = TypeVar("_T")


class StorageError(QwenVLError):
    """A storage URI is malformed or an object cannot be read or written."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: its key, size in bytes and last modification (Unix seconds)."""

    key: str
    size: int
    modified_at: float


class ObjectStore(Protocol):
    """Bytes under keys. Keys use ``/``; a missing key reads as ``None`` / ``False``, never an exception."""

    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes | None: ...
    def exists(self, key: str) -> bool: ...
    def list_keys(self, prefix: str, start_after: str | None = None) -> list[str]:
        """Sorted keys under ``prefix``; with ``start_after``, only keys sorting after it (S3 ``StartAfter``)."""
        ...
    def list_objects(self, prefix: str) -> list[ObjectInfo]: ...
    def delete(self, key: str) -> None: ...
    def put_stream(self, key: str, stream: IO[bytes]) -> StoredObject: ...
    def open_read(self, key: str) -> IO[bytes]: ...
    def size(self, key: str) -> int | None: ...


def _hashing_copy(src: IO[bytes], dst: IO[bytes]) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    while chunk := src.read(CHUNK_BYTES):
        digest.update(chunk)
        dst.write(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    """Make a rename in directory ``path`` durable (a filesystem that cannot fsync a directory is left as it is)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


class LocalStore:
    """Objects as files under ``root``; keys may not escape it."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).absolute()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise StorageError(f"storage key {key!r} escapes the store root")
        return path

    def _atomic_target(self, key: str) -> tuple[Path, IO[bytes], str]:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        return target, os.fdopen(fd, "wb"), tmp

    def put_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` durably and atomically (see ``_write_atomic``)."""
        self._write_atomic(key, lambda out: out.write(data))

    def put_stream(self, key: str, stream: IO[bytes]) -> StoredObject:
        size, sha = self._write_atomic(key, lambda out: _hashing_copy(stream, out))
        return StoredObject(key=key, size=size, sha256=sha)

    def _write_atomic(self, key: str, write: Callable[[IO[bytes]], _T]) -> _T:
        """``write`` into a temporary file next to the key's, fsync it, rename it over the key, fsync the directory:
        after a crash the key holds its old bytes or all of the new ones. On any error the temporary file is removed
        and the key is untouched."""
        target, out, tmp = self._atomic_target(key)
        try:
            with out:
                result = write(out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)
        return result

    def get_bytes(self, key: str) -> bytes | None:
        path = self._path(key)
        return path.read_bytes() if path.is_file() else None

    def open_read(self, key: str) -> IO[bytes]:
        path = self._path(key)
        if not path.is_file():
            raise StorageError(f"object {key!r} does not exist")
        return path.open("rb")

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int | None:
        path = self._path(key)
        return path.stat().st_size if path.is_file() else None

    def list_keys(self, prefix: str, start_after: str | None = None) -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        keys = (p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())
        return sorted(k for k in keys if not Path(k).name.startswith(".") and (start_after is None or k > start_after))

    def list_objects(self, prefix: str) -> list[ObjectInfo]:
        """Like ``list_keys``, with sizes and times (an object removed meanwhile is left out)."""
        found = []
        for key in self.list_keys(prefix):
            try:
                st = self._path(key).stat()
            except FileNotFoundError:
                continue
            found.append(ObjectInfo(key=key, size=st.st_size, modified_at=st.st_mtime))
        return found

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


class S3Store:
    """Objects in one S3 bucket (boto3; endpoint and credentials from the usual AWS environment)."""

    def __init__(self, bucket: str, client: Any | None = None) -> None:
        import boto3

        self.bucket = bucket
        self.client = client or boto3.client("s3")

    def _missing(self, exc: Exception) -> bool:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        return code in {"404", "NoSuchKey", "NotFound"}

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def put_stream(self, key: str, stream: IO[bytes]) -> StoredObject:
        # Spool through a temporary file so the checksum is known before the object becomes visible, then
        # upload one part at a time: memory holds one CHUNK_BYTES part, whatever the object's size.
        with tempfile.TemporaryFile() as spool:
            size, sha = _hashing_copy(stream, spool)
            spool.seek(0)
            if size <= CHUNK_BYTES:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=spool.read(), Metadata={"sha256": sha})
            else:
                self._multipart(key, spool, {"sha256": sha})
        return StoredObject(key=key, size=size, sha256=sha)

    def _multipart(self, key: str, spool: IO[bytes], metadata: dict[str, str]) -> None:
        upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=key, Metadata=metadata)["UploadId"]
        parts = []
        try:
            while chunk := spool.read(CHUNK_BYTES):
                number = len(parts) + 1
                etag = self.client.upload_part(Bucket=self.bucket, Key=key, PartNumber=number, UploadId=upload_id,
                                               Body=chunk)["ETag"]
                parts.append({"ETag": etag, "PartNumber": number})
            self.client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                  MultipartUpload={"Parts": parts})
        except BaseException:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            raise

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except Exception as exc:
            if self._missing(exc):
                return None
            raise

    def open_read(self, key: str) -> IO[bytes]:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        except Exception as exc:
            if self._missing(exc):
                raise StorageError(f"object s3://{self.bucket}/{key} does not exist") from None
            raise

    def size(self, key: str) -> int | None:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"])
        except Exception as exc:
            if self._missing(exc):
                return None
            raise

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def list_keys(self, prefix: str, start_after: str | None = None) -> list[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        keys: list[str] = []
        after = {"StartAfter": start_after} if start_after else {}  # S3 lists only the keys after it
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix, **after):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return sorted(keys)

    def list_objects(self, prefix: str) -> list[ObjectInfo]:
        """Like ``list_keys``, with sizes and times, from the same listing (no request per object)."""
        paginator = self.client.get_paginator("list_objects_v2")
        found = [ObjectInfo(key=obj["Key"], size=int(obj["Size"]), modified_at=obj["LastModified"].timestamp())
                 for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix) for obj in page.get("Contents", [])]
        return sorted(found, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        keys = self.list_keys(key.rstrip("/") + "/") + [key]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})


def open_store(uri: str) -> tuple[ObjectStore, str]:
    """The store and key prefix of a local path or an ``s3://bucket/prefix`` URI."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        if not bucket:
            raise StorageError(f"storage URI {uri!r} has no bucket")
        return S3Store(bucket), prefix.strip("/")
    if "://" in uri:
        raise StorageError(f"storage URI {uri!r}: only local paths and s3:// are supported")
    return LocalStore(uri), ""


def read_uri(uri: str) -> bytes:
    """The bytes of one object given as a local path or an ``s3://bucket/key`` URI."""
    if not uri.startswith("s3://"):
        path = Path(uri)
        if not path.is_file():
            raise StorageError(f"{uri}: no such file")
        return path.read_bytes()
    store, key = open_store(uri)
    data = store.get_bytes(key)
    if data is None:
        raise StorageError(f"{uri}: no such object")
    return data


def join_key(*parts: str) -> str:
    """Join key parts with ``/``, skipping empty ones."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def upload_dir(store: ObjectStore, local_dir: str | Path, prefix: str) -> list[StoredObject]:
    """Copy every file under ``local_dir`` to ``prefix/<relative path>``."""
    stored = []
    for path in sorted(Path(local_dir).rglob("*")):
        if path.is_file():
            with path.open("rb") as src:
                stored.append(store.put_stream(join_key(prefix, path.relative_to(local_dir).as_posix()), src))
    return stored


def download_dir(store: ObjectStore, prefix: str, local_dir: str | Path) -> list[Path]:
    """Copy every object under ``prefix/`` into ``local_dir`` (keys checked to stay inside it)."""
    root = Path(local_dir).absolute()
    written = []
    for key in store.list_keys(prefix.rstrip("/") + "/" if prefix else ""):
        target = (root / key[len(prefix) :].lstrip("/")).resolve()
        if not target.is_relative_to(root.resolve()):
            raise StorageError(f"object key {key!r} would be written outside {root}")
        target.parent.mkdir(parents=True, exist_ok=True)
        with store.open_read(key) as src, target.open("wb") as out:
            shutil.copyfileobj(src, out, CHUNK_BYTES)
        written.append(target)
    return written


def iter_chunks(stream: IO[bytes]) -> Iterator[bytes]:
    """Read a stream in ``CHUNK_BYTES`` chunks (for streaming HTTP responses)."""
    while chunk := stream.read(CHUNK_BYTES):
        yield chunk
