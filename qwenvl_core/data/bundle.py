"""Upload bundles: a bare ``.json``/``.jsonl`` file, or a ``.zip`` / ``.tar.gz`` holding one data file plus the
images it references, extracted safely.

This module owns archive safety. Extraction refuses absolute paths, ``..``, drive letters, links (symbolic and
hard), device files and FIFOs, and enforces ``BundleLimits`` (file count, total uncompressed bytes, compression
ratio, bytes per image) while it copies, counting the bytes actually written rather than trusting headers.
Files are created with ``O_EXCL | O_NOFOLLOW`` below a fresh directory and their resolved paths are checked
to stay inside it, so nothing is ever written outside the extraction directory. Only data files and images
are extracted; other entries (``__MACOSX/``, ``.DS_Store``, ...) are skipped. Image pixel limits are enforced
when images are decoded (``validate``), with the ``ImageLimits`` of the image loader. A damaged or unreadable
archive (bad CRC, encryption, unsupported compression, corrupt data, a name too long for the file system) is a
``BundleError`` naming the entry where known, never another exception.
"""

from __future__ import annotations

import errno
import gzip
import lzma
import os
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from qwenvl_core.data.issues import BundleError
from qwenvl_core.scratch import ScratchDir

DATA_SUFFIXES = (".jsonl", ".json")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz")
_COPY_CHUNK = 1 << 20
_SHOWN_NAME = 200  # characters of an entry name quoted in messages
_ZIP_ENCRYPTED = 0x1  # general purpose flag bit 0
# What opening or reading a damaged zip entry raises: bad CRC or header, encryption (RuntimeError), an
# unsupported compression method (NotImplementedError), corrupt deflate / bzip2 / lzma data, truncated data.
_ZIP_READ_ERRORS = (zipfile.BadZipFile, RuntimeError, NotImplementedError, zlib.error, lzma.LZMAError, EOFError,
                    OSError)
_TAR_READ_ERRORS = (tarfile.TarError, zlib.error, lzma.LZMAError, EOFError, OSError)  # gzip's BadGzipFile: OSError


@dataclass(frozen=True)
class BundleLimits:
    """Limits applied while extracting an archive (all configurable; defaults suit uploads of a few GB)."""

    max_total_bytes: int = 8 << 30
    max_files: int = 200_000
    max_ratio: float = 100.0
    min_ratio_check_bytes: int = 1 << 20  # tiny archives legitimately compress text very well
    max_image_bytes: int = 20 << 20
    max_data_bytes: int = 4 << 30


@dataclass(frozen=True)
class Bundle:
    """Where the data file is after opening a bundle, and the name to show in messages."""

    data_file: Path
    base_dir: Path
    display_name: str
    skipped: list[str] = field(default_factory=list)


def is_archive(path: Path) -> bool:
    """True for ``.zip``, ``.tar.gz`` and ``.tgz`` names."""
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


@contextmanager
def open_bundle(path: str | Path, limits: BundleLimits | None = None, workdir: Path | None = None
                ) -> Iterator[Bundle]:
    """Yield the ``Bundle`` of ``path``; archives are extracted to a temporary directory removed on exit."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: file not found")
    if not is_archive(path):
        if not path.name.lower().endswith(DATA_SUFFIXES):
            raise BundleError(f"{path.name}: expected a .json, .jsonl, .zip or .tar.gz file")
        yield Bundle(path, path.parent, path.name)
        return
    with ScratchDir("bundle", workdir) as scratch:  # swept by the next one if this process is killed
        dest = scratch / "extracted"
        dest.mkdir()
        yield extract_bundle(path, dest, limits or BundleLimits())


def extract_bundle(archive: Path, dest: Path, limits: BundleLimits) -> Bundle:
    """Extract ``archive`` into the existing empty directory ``dest`` and locate its single data file."""
    extractor = _Extractor(archive, dest, limits)
    if archive.name.lower().endswith(".zip"):
        extractor.extract_zip()
    else:
        extractor.extract_tar()
    return extractor.bundle()


class _Extractor:
    """Checks every entry, copies the wanted ones and keeps the running totals."""

    def __init__(self, archive: Path, dest: Path, limits: BundleLimits) -> None:
        self.archive, self.dest, self.limits = archive, dest.resolve(), limits
        self.archive_bytes = max(archive.stat().st_size, 1)
        self.files = 0
        self.total = 0
        self.data_files: list[str] = []
        self.skipped: list[str] = []

    def fail(self, name: str, message: str) -> BundleError:
        shown = repr(name) if len(name) <= _SHOWN_NAME else f"{name[:_SHOWN_NAME]!r}... ({len(name)} characters)"
        return BundleError(f"{self.archive.name}: entry {shown}: {message}")

    # -- formats -------------------------------------------------------------------------------------------

    def extract_zip(self) -> None:
        try:
            zf = zipfile.ZipFile(self.archive)
        except (zipfile.BadZipFile, OSError) as e:
            raise BundleError(f"{self.archive.name}: not a valid zip file ({e})") from e
        with zf:
            infos = zf.infolist()
            for info in infos:  # the central directory allows checking every entry before writing any
                self._check_zip_entry(info)
            if sum(i.file_size for i in infos) > self.limits.max_total_bytes:
                raise BundleError(f"{self.archive.name}: uncompressed size exceeds {self.limits.max_total_bytes} bytes")
            wanted = [i for i in infos if not i.is_dir() and self._wanted(i.filename, i.file_size)]
            for info in wanted:
                if info.flag_bits & _ZIP_ENCRYPTED:
                    raise self.fail(info.filename, "is encrypted (password-protected entries are not supported)")
                with self._reading(info.filename):
                    src = zf.open(info)
                with src:
                    self._copy(info.filename, src, info.file_size, self._reading)

    @contextmanager
    def _reading(self, name: str) -> Iterator[None]:
        """Turn the errors of reading a damaged zip entry into a ``BundleError`` naming it."""
        try:
            yield
        except _ZIP_READ_ERRORS as e:
            raise self.fail(name, f"cannot be read ({e})") from e

    def _check_zip_entry(self, info: zipfile.ZipInfo) -> None:
        self._parts(info.filename)
        kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the archiver stored no Unix file type
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise self.fail(info.filename, "links and special files are not allowed")
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size >= self.limits.min_ratio_check_bytes and ratio > self.limits.max_ratio:
            raise self.fail(info.filename, f"compression ratio {ratio:.0f} exceeds {self.limits.max_ratio:g} "
                            "(possible compression bomb)")

    def extract_tar(self) -> None:
        try:
            tf = tarfile.open(self.archive, mode="r|*")
        except (tarfile.TarError, OSError) as e:
            raise BundleError(f"{self.archive.name}: not a valid tar archive ({e})") from e
        with tf:
            members = iter(tf)
            while True:
                with self._tar_reading(None):  # the next header
                    member = next(members, None)
                if member is None:
                    break
                self._tar_member(tf, member)

    @contextmanager
    def _tar_reading(self, name: str | None) -> Iterator[None]:
        """Turn the errors of reading a damaged tar stream into a ``BundleError`` naming the entry being read (not
        those of writing it out: a full disk here is the server's problem, not the archive's)."""
        try:
            yield
        except _TAR_READ_ERRORS as e:
            if name is None:
                raise BundleError(f"{self.archive.name}: corrupt archive ({e})") from e
            raise self.fail(name, f"cannot be read (corrupt archive: {e})") from e

    def _tar_member(self, tf: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        if member.isdir():
            self._parts(member.name)
            return
        if not member.isreg():
            raise self.fail(member.name, "links and special files are not allowed")
        if not self._wanted(member.name, member.size):
            return
        src = tf.extractfile(member)
        if src is None:
            raise self.fail(member.name, "cannot be read")
        with src:
            self._copy(member.name, src, member.size, self._tar_reading)

    # -- shared checks and copying ---------------------------------------------------------------------------

    def _parts(self, name: str) -> tuple[str, ...]:
        parts = _safe_parts(name)
        if parts is None:
            raise self.fail(name, "absolute paths, drive letters and '..' are not allowed")
        return parts

    def _wanted(self, name: str, declared: int) -> bool:
        parts = self._parts(name)
        lower = name.lower()
        if parts[0] == "__MACOSX" or parts[-1].startswith("."):
            self.skipped.append(name)
            return False
        if lower.endswith(DATA_SUFFIXES):
            self.data_files.append("/".join(parts))
            self._check_size(name, declared, self.limits.max_data_bytes, "data file")
        elif lower.endswith(IMAGE_SUFFIXES):
            self._check_size(name, declared, self.limits.max_image_bytes, "image")
        else:
            self.skipped.append(name)
            return False
        self.files += 1
        if self.files > self.limits.max_files:
            raise BundleError(f"{self.archive.name}: more than {self.limits.max_files} files")
        return True

    def _check_size(self, name: str, size: int, limit: int, what: str) -> None:
        if size > limit:
            raise self.fail(name, f"{what} of {size} bytes exceeds the limit of {limit} bytes")

    def _count(self, name: str, n: int, declared: int, written: int) -> None:
        self.total += n
        if written > declared:
            raise self.fail(name, "holds more bytes than its header declares")
        if self.total > self.limits.max_total_bytes:
            raise BundleError(f"{self.archive.name}: uncompressed size exceeds {self.limits.max_total_bytes} bytes")
        ratio = self.total / self.archive_bytes
        if self.total >= self.limits.min_ratio_check_bytes and ratio > self.limits.max_ratio:
            raise BundleError(f"{self.archive.name}: compression ratio {ratio:.0f} exceeds "
                              f"{self.limits.max_ratio:g} (possible compression bomb)")

    def _copy(self, name: str, src: BinaryIO, declared: int,
              reading: Callable[[str], AbstractContextManager[object]] = nullcontext) -> None:
        """Write ``src`` to the entry's file, counting the bytes; ``reading(name)`` wraps every read of ``src``."""
        fd = self._create(name)
        written = 0
        with os.fdopen(fd, "wb") as out:
            while True:
                with reading(name):
                    chunk = src.read(_COPY_CHUNK)
                if not chunk:
                    break
                written += len(chunk)
                self._count(name, len(chunk), declared, written)
                out.write(chunk)

    def _create(self, name: str) -> int:
        """Create the entry's file (and its folders) exclusively, below ``dest``; its descriptor."""
        target = self.dest.joinpath(*self._parts(name))
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.parent.resolve().is_relative_to(self.dest) or target.exists():
                raise self.fail(name, "duplicate entry or path outside the extraction directory")
            return os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except OSError as e:
            if e.errno == errno.ENAMETOOLONG:
                raise self.fail(name, "the name is too long for the file system") from e
            if e.errno in (errno.EEXIST, errno.ENOTDIR, errno.EISDIR):  # a file where a folder goes, or back
                raise self.fail(name, "duplicate entry or clashes with another entry's path") from e
            raise

    def bundle(self) -> Bundle:
        if not self.data_files:
            raise BundleError(f"{self.archive.name}: no .json or .jsonl data file in the bundle")
        if len(self.data_files) > 1:
            raise BundleError(f"{self.archive.name}: expected exactly one data file, found "
                              f"{len(self.data_files)}: {', '.join(sorted(self.data_files)[:5])}")
        rel = self.data_files[0]
        data_file = self.dest.joinpath(*rel.split("/"))
        return Bundle(data_file, data_file.parent, f"{self.archive.name}:{rel}", self.skipped)


def _safe_parts(name: str) -> tuple[str, ...] | None:
    """The path components of an archive entry, or None if it is absolute or escapes (``..``, drive)."""
    pure = PurePosixPath(name.replace("\\", "/"))
    parts = tuple(p for p in pure.parts if p not in ("", "."))
    if pure.is_absolute() or not parts or ".." in parts or ":" in parts[0]:
        return None
    return parts


def write_bundle(data_file: Path, out: Path, members: list[Path]) -> Path:
    """Write ``data_file`` and ``members`` (files below its folder) as a ``.zip`` or ``.tar.gz`` at ``out``.

    Entries are relative to the data file's folder and carry a fixed timestamp, so equal inputs give equal
    archives.
    """
    base = data_file.parent
    names = [data_file.name] + [m.relative_to(base).as_posix() for m in members]
    if out.name.endswith(".zip"):
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name in names:
                info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                zf.writestr(info, (base / name).read_bytes(), compress_type=zipfile.ZIP_DEFLATED)
        return out
    with gzip.GzipFile(out, "wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tf:
        for name in names:
            info = tf.gettarinfo(str(base / name), arcname=name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            with (base / name).open("rb") as f:
                tf.addfile(info, f)
    return out
