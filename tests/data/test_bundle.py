"""Bundles: zip-slip, links, devices and compression bombs are rejected without writing outside the
extraction directory; valid zip and tar.gz bundles extract and validate."""

from __future__ import annotations

import io
import json
import random
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from qwenvl_core.data import BundleError, BundleLimits, open_bundle, validate_file
from qwenvl_core.data.bundle import extract_bundle

RECORD = {"messages": [
    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "imgs/a.png"}},
                                 {"type": "text", "text": "colour?"}]},
    {"role": "assistant", "content": "red"},
]}


def _zip(path: Path, entries: list[tuple[str, bytes, int | None]]) -> Path:
    """entries: (name, data, unix mode or None)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if mode is not None:
                info.external_attr = mode << 16
            zf.writestr(info, data)
    return path


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.fixture
def png_bytes(data_dir: Path) -> bytes:
    return (data_dir / "imgs" / "a.png").read_bytes()


@pytest.fixture
def sandbox(tmp_path: Path) -> tuple[Path, Path]:
    """(archive folder, extraction dir) with a sentinel parent to detect writes outside."""
    root = tmp_path / "sandbox"
    (root / "dest").mkdir(parents=True)
    return root, root / "dest"


def _outside_files(root: Path, dest: Path, archive: Path) -> list[Path]:
    return [p for p in root.rglob("*") if not p.is_relative_to(dest) and p != archive]


DATA = json.dumps(RECORD).encode()


@pytest.mark.parametrize(("name", "fragment"), [
    ("../evil.png", "'..' are not allowed"),
    ("imgs/../../evil.png", "'..' are not allowed"),
    ("/tmp/evil.png", "absolute paths"),
    ("C:/evil.png", "drive letters"),
    ("..\\evil.png", "'..' are not allowed"),
])
def test_zip_slip_rejected(sandbox, name, fragment, png_bytes):
    root, dest = sandbox
    archive = _zip(root / "b.zip", [("train.jsonl", DATA, None), (name, png_bytes, None)])
    with pytest.raises(BundleError, match=fragment):
        extract_bundle(archive, dest, BundleLimits())
    assert _outside_files(root, dest, archive) == []
    assert not (root.parent / "evil.png").exists()


def test_zip_symlink_and_device_entries_rejected(sandbox):
    root, dest = sandbox
    for mode in (stat.S_IFLNK | 0o777, stat.S_IFCHR | 0o644, stat.S_IFIFO | 0o644):
        archive = _zip(root / "b.zip", [("train.jsonl", DATA, None), ("imgs/a.png", b"/etc/passwd", mode)])
        with pytest.raises(BundleError, match="links and special files"):
            extract_bundle(archive, dest, BundleLimits())
        assert list(dest.iterdir()) == []  # zip entries are all checked before anything is written
    assert _outside_files(root, dest, archive) == []


@pytest.mark.parametrize("member", [
    _link("imgs/a.png", "/etc/passwd", tarfile.SYMTYPE),
    _link("imgs/a.png", "train.jsonl", tarfile.LNKTYPE),
    _link("dev0", "", tarfile.CHRTYPE),
    _link("fifo", "", tarfile.FIFOTYPE),
])
def test_tar_links_and_devices_rejected(sandbox, member):
    root, dest = sandbox
    archive = _tar(root / "b.tar.gz", [(_file("train.jsonl"), DATA), (member, None)])
    with pytest.raises(BundleError, match="links and special files"):
        extract_bundle(archive, dest, BundleLimits())
    assert _outside_files(root, dest, archive) == []
    assert not any(p.is_symlink() for p in dest.rglob("*"))


def test_tar_slip_rejected(sandbox, png_bytes):
    root, dest = sandbox
    archive = _tar(root / "b.tar.gz", [(_file("train.jsonl"), DATA), (_file("../../evil.png"), png_bytes)])
    with pytest.raises(BundleError, match="'..' are not allowed"):
        extract_bundle(archive, dest, BundleLimits())
    assert _outside_files(root, dest, archive) == []


def test_zip_compression_bomb_rejected_by_ratio(sandbox):
    root, dest = sandbox
    archive = _zip(root / "b.zip", [("train.jsonl", b"\n" * (4 << 20), None)])
    with pytest.raises(BundleError, match="compression ratio .*possible compression bomb"):
        extract_bundle(archive, dest, BundleLimits())
    assert _outside_files(root, dest, archive) == []


def test_tar_compression_bomb_rejected_while_copying(sandbox):
    root, dest = sandbox
    archive = _tar(root / "b.tar.gz", [(_file("train.jsonl"), b"\n" * (4 << 20))])
    with pytest.raises(BundleError, match="possible compression bomb"):
        extract_bundle(archive, dest, BundleLimits())
    written = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    assert written <= 2 << 20  # stopped early, not after writing everything


@pytest.mark.parametrize(("limits", "fragment"), [
    (BundleLimits(max_total_bytes=200), "uncompressed size exceeds 200"),
    (BundleLimits(max_files=2), "more than 2 files"),
    (BundleLimits(max_image_bytes=10), "image of .* bytes exceeds the limit of 10"),
])
def test_configurable_limits(sandbox, png_bytes, limits, fragment):
    root, dest = sandbox
    entries = [("train.jsonl", DATA, None), ("imgs/a.png", png_bytes, None), ("imgs/b.png", png_bytes, None)]
    archive = _zip(root / "b.zip", entries)
    with pytest.raises(BundleError, match=fragment):
        extract_bundle(archive, dest, limits)


def test_data_file_count_must_be_one(sandbox):
    root, dest = sandbox
    with pytest.raises(BundleError, match="no .json or .jsonl"):
        extract_bundle(_zip(root / "a.zip", [("readme.txt", b"x", None)]), dest, BundleLimits())
    with pytest.raises(BundleError, match="exactly one data file, found 2: a.jsonl, b.json"):
        extract_bundle(_zip(root / "b.zip", [("a.jsonl", DATA, None), ("b.json", b"[]", None)]), dest,
                       BundleLimits())


def test_duplicate_entries_rejected(sandbox):
    root, dest = sandbox
    archive = root / "d.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("train.jsonl", DATA)
        with pytest.warns(UserWarning):
            zf.writestr("train.jsonl", b"other")
    with pytest.raises(BundleError, match="duplicate entry"):
        extract_bundle(archive, dest, BundleLimits())


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_valid_bundles_extract_and_clean_up(tmp_path, png_bytes, suffix):
    entries = [("data/train.jsonl", DATA), ("data/imgs/a.png", png_bytes), ("__MACOSX/._x", b"junk"),
               ("data/notes.txt", b"n")]
    archive = tmp_path / f"up{suffix}"
    if suffix == ".zip":
        _zip(archive, [(n, d, None) for n, d in entries])
    else:
        _tar(archive, [(_file(n), d) for n, d in entries])
    with open_bundle(archive) as bundle:
        assert bundle.display_name == f"up{suffix}:data/train.jsonl"
        assert bundle.base_dir.name == "data" and (bundle.base_dir / "imgs" / "a.png").is_file()
        assert sorted(bundle.skipped) == ["__MACOSX/._x", "data/notes.txt"]
        extracted = bundle.base_dir.parent
    assert not extracted.exists()
    report = validate_file(archive)
    assert report.ok and report.valid_samples == 1


def test_not_an_archive_and_wrong_extension(tmp_path):
    bad = tmp_path / "b.zip"
    bad.write_bytes(b"garbage")
    assert "not a valid zip file" in str(validate_file(bad).issues.errors[0])
    txt = tmp_path / "x.txt"
    txt.write_text("hi")
    with pytest.raises(BundleError, match="expected a .json, .jsonl, .zip or .tar.gz"):
        with open_bundle(txt):
            pass


def _patch(path: Path, patch) -> Path:
    raw = bytearray(path.read_bytes())
    patch(raw, raw.find(b"PK\x01\x02"))  # the local header is at 0, the central one at the offset given
    path.write_bytes(bytes(raw))
    return path


def _flip_data(raw: bytearray, _central: int) -> None:  # stored: the CRC no longer matches
    raw[raw.find(DATA[:10])] ^= 0xFF


def _encrypted(raw: bytearray, central: int) -> None:
    raw[6] |= 1
    raw[central + 8] |= 1


def _method_93(raw: bytearray, central: int) -> None:  # zstandard, which zipfile cannot decompress
    raw[8:10] = raw[central + 10:central + 12] = (93).to_bytes(2, "little")


def _broken_deflate(raw: bytearray, _central: int) -> None:
    start = 30 + int.from_bytes(raw[26:28], "little") + int.from_bytes(raw[28:30], "little")
    raw[start:start + 8] = b"\xff" * 8


@pytest.mark.parametrize(("patch", "compression", "fragment"), [
    (_flip_data, zipfile.ZIP_STORED, "cannot be read (Bad CRC-32"),
    (_encrypted, zipfile.ZIP_STORED, "is encrypted"),
    (_method_93, zipfile.ZIP_STORED, "cannot be read (That compression method is not supported)"),
    (_broken_deflate, zipfile.ZIP_DEFLATED, "cannot be read (Error -3 while decompressing data"),
])
def test_damaged_zip_entries_are_bundle_errors_naming_the_entry(tmp_path, patch, compression, fragment):
    archive = tmp_path / "b.zip"
    with zipfile.ZipFile(archive, "w", compression) as zf:
        zf.writestr("train.jsonl", DATA * 20)
    _patch(archive, patch)
    report = validate_file(archive)
    assert [(i.code, i.location.file) for i in report.issues.errors] == [("bundle", "b.zip")]
    message = report.issues.errors[0].message
    assert message.startswith("entry 'train.jsonl': ") and fragment in message


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
@pytest.mark.parametrize("name", ["a" * 300 + ".jsonl", "/".join(["d"] * 3000) + "/t.jsonl"])
def test_entry_names_too_long_for_the_file_system_are_bundle_errors(sandbox, suffix, name):
    root, dest = sandbox
    archive = root / f"b{suffix}"
    if suffix == ".zip":
        _zip(archive, [(name, DATA, None)])
    else:
        _tar(archive, [(_file(name), DATA)])
    with pytest.raises(BundleError) as caught:
        extract_bundle(archive, dest, BundleLimits())
    message = str(caught.value)
    assert message.startswith(f"b{suffix}: entry {name[:200]!r}... ({len(name)} characters): ")
    assert message.endswith("the name is too long for the file system") and len(message) < 400


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_an_entry_below_a_file_is_a_bundle_error(sandbox, png_bytes, suffix):
    root, dest = sandbox
    entries = [("train.jsonl", DATA), ("imgs/a.png", png_bytes), ("imgs/a.png/b.png", png_bytes)]
    archive = root / f"b{suffix}"
    if suffix == ".zip":
        _zip(archive, [(n, d, None) for n, d in entries])
    else:
        _tar(archive, [(_file(n), d) for n, d in entries])
    with pytest.raises(BundleError, match=r"entry 'imgs/a.png/b.png': duplicate entry or clashes"):
        extract_bundle(archive, dest, BundleLimits())
    assert _outside_files(root, dest, archive) == []


def test_damaged_tar_data_is_a_bundle_error_naming_the_entry(sandbox, png_bytes):
    root, dest = sandbox
    noise = random.Random(0).randbytes(64 << 10)  # incompressible: most of the archive is this entry's data
    archive = _tar(root / "b.tar.gz", [(_file("imgs/a.png"), png_bytes), (_file("train.jsonl"), DATA + noise)])
    raw = archive.read_bytes()
    archive.write_bytes(raw[: len(raw) * 2 // 3])  # an upload cut off in the middle of train.jsonl
    with pytest.raises(BundleError) as caught:
        extract_bundle(archive, dest, BundleLimits())
    assert str(caught.value).startswith("b.tar.gz: entry 'train.jsonl': cannot be read (corrupt archive: ")
