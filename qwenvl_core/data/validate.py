"""Streaming validation of a data file or bundle into a structured report, and the sample reader for training.

One pass over the records (``reader``), each parsed by its format (``formats``), checked (``checks``), its
images decoded under ``ImageLimits`` (``images.load_image``), its id checked against earlier ids, and, when a
family processor is given, tokenized under the length policy (``encode``) for statistics (``stats``). Memory stays
flat: only the capped issue lists, a small cache of image results and, for the duplicate-id check, an 8-byte
hash and a line number per explicit sample id (``IdIndex``) are kept. ``iter_samples`` runs the same checks and yields valid samples, stopping at the first error.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qwenvl_core.conversation import ImagePart
from qwenvl_core.data.bundle import Bundle, BundleLimits, open_bundle
from qwenvl_core.data.checks import SampleRules, check_sample
from qwenvl_core.data.encode import EncodeOptions, LengthError, LengthPolicy, TokenizedSample, tokenize_sample
from qwenvl_core.data.formats import DataFormat, Sample, detect_format, parse_record
from qwenvl_core.data.issues import (
    BundleError,
    DataError,
    Issue,
    IssueCollector,
    Location,
    Severity,
    has_errors,
    raise_first_error,
)
from qwenvl_core.data.preference import PreferenceSample, parse_preference
from qwenvl_core.data.reader import Record, iter_records
from qwenvl_core.data.stats import DatasetStats
from qwenvl_core.errors import ImageError, PromptError
from qwenvl_core.images import DEFAULT_IMAGE_LIMITS, ImageLimits, load_image
from qwenvl_core.models.processing import FamilyProcessor

_IMAGE_CACHE = 4096
_REHASH_CHUNK = 4096


@dataclass(frozen=True)
class ValidationOptions:
    """What to check and the limits to check against (all configurable)."""

    max_issues: int = 100  # errors (and, separately, warnings) kept in the report; all are counted
    rules: SampleRules = field(default_factory=SampleRules)
    check_images: bool = True
    image_limits: ImageLimits = DEFAULT_IMAGE_LIMITS
    bundle_limits: BundleLimits = field(default_factory=BundleLimits)
    encode: EncodeOptions = field(default_factory=EncodeOptions)


@dataclass
class ValidationReport:
    """The outcome of validating one file: counts, capped issues with totals, statistics."""

    file: str
    format: DataFormat | None = None
    records: int = 0
    valid_samples: int = 0
    issues: IssueCollector = field(default_factory=IssueCollector)
    stats: DatasetStats = field(default_factory=DatasetStats)
    options: ValidationOptions = field(default_factory=ValidationOptions)

    @property
    def ok(self) -> bool:
        return self.issues.error_count == 0

    def to_dict(self) -> dict[str, Any]:
        enc = self.options.encode
        return {
            "file": self.file, "format": self.format.value if self.format else None, "ok": self.ok,
            "records": self.records, "valid_samples": self.valid_samples,
            "invalid_samples": self.records - self.valid_samples,
            "error_count": self.issues.error_count, "warning_count": self.issues.warning_count,
            "errors": [i.to_dict() for i in self.issues.errors],
            "warnings": [i.to_dict() for i in self.issues.warnings],
            "errors_truncated": self.issues.error_count > len(self.issues.errors),
            "stats": self.stats.to_dict(),
            "options": {"max_length": enc.max_length, "length_policy": enc.length_policy.value,
                        "label_mask": enc.mask.value, "max_images": self.options.rules.max_images},
        }


@dataclass
class CheckedSample:
    """One record after every check: the sample (None if unparseable), its issues and tokens."""

    record: Record
    sample: Sample | None
    issues: list[Issue]
    tokenized: TokenizedSample | None = None

    @property
    def valid(self) -> bool:
        return self.sample is not None and not has_errors(self.issues)


def validate_file(path: str | Path, processor: FamilyProcessor | None = None,
                  options: ValidationOptions = ValidationOptions()) -> ValidationReport:
    """Validate a ``.json``/``.jsonl`` file or a ``.zip``/``.tar.gz`` bundle; never raises for bad data."""
    path = Path(path)
    try:
        with open_bundle(path, options.bundle_limits) as bundle:
            return validate_bundle(bundle, processor, options)
    except BundleError as e:
        report = ValidationReport(path.name, issues=IssueCollector(options.max_issues), options=options)
        report.issues.add(Issue("bundle", str(e).removeprefix(f"{path.name}: "), Location(path.name)))
        return report


def validate_bundle(bundle: Bundle, processor: FamilyProcessor | None = None,
                    options: ValidationOptions = ValidationOptions()) -> ValidationReport:
    """``validate_file`` on a bundle already open (``open_bundle``), which a caller then reads without extracting it
    again (a training job); never raises for bad data."""
    report = ValidationReport(bundle.display_name, issues=IssueCollector(options.max_issues), options=options)
    checker = _Checker(bundle, processor, options)
    for checked in checker.run():
        report.records += 1
        report.issues.extend(checked.issues)
        if checked.valid and checked.sample is not None:
            report.valid_samples += 1
            report.stats.add(checked.sample, checked.tokenized)
    report.format = checker.format
    if report.records == 0 and report.issues.error_count == 0:
        report.issues.add(Issue("empty_file", "no samples in the file", Location(bundle.display_name)))
    return report


def iter_samples(bundle: Bundle, processor: FamilyProcessor | None = None,
                 options: ValidationOptions = ValidationOptions()) -> Iterator[Sample]:
    """The samples of an opened bundle, fully checked; ``DataError`` at the first invalid one."""
    for checked in _Checker(bundle, processor, options).run():
        raise_first_error(checked.issues)
        if checked.sample is not None:
            yield checked.sample


class IdIndex:
    """Set of sample ids remembering where each was first seen, in ~24-48 bytes per id.

    Open addressing over numpy arrays of 64-bit id hashes (blake2b) and 32-bit lines, instead of a dict
    (~120 bytes per id), so that the one piece of validation state that must grow with the file stays small.
    """

    def __init__(self, capacity: int = 1024) -> None:
        self._keys = np.zeros(capacity, dtype=np.uint64)  # 0 = empty slot
        self._lines = np.zeros(capacity, dtype=np.uint32)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def add(self, sample_id: str, line: int) -> int | None:
        """Record ``sample_id`` at ``line``; if it was seen before, return where (and keep the first).

        Any ``str`` is accepted: a lone surrogate (which ``reader`` refuses in data files) hashes as its
        ``surrogatepass`` bytes instead of raising.
        """
        raw = sample_id.encode("utf-8", "surrogatepass")
        key = int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") or 1
        if 2 * (self._n + 1) > len(self._keys):
            self._grow()
        slot = self._find(key)
        if self._keys[slot]:
            return int(self._lines[slot])
        self._keys[slot], self._lines[slot] = key, line
        self._n += 1
        return None

    def _find(self, key: int) -> int:
        mask = len(self._keys) - 1
        slot = key & mask
        while self._keys[slot] and int(self._keys[slot]) != key:
            slot = (slot + 1) & mask
        return slot

    def _grow(self) -> None:
        keys, lines = self._keys[self._keys != 0], self._lines[self._keys != 0]
        self._keys = np.zeros(2 * len(self._keys), dtype=np.uint64)
        self._lines = np.zeros(len(self._keys), dtype=np.uint32)
        for start in range(0, len(keys), _REHASH_CHUNK):  # chunks: no Python int per id at once
            chunk = zip(keys[start:start + _REHASH_CHUNK].tolist(), lines[start:start + _REHASH_CHUNK].tolist(),
                        strict=True)
            for key, line in chunk:
                slot = self._find(key)
                self._keys[slot], self._lines[slot] = key, line


class _Checker:
    """Per-file state of a validation pass: the detected format, seen ids and cached image results."""

    def __init__(self, bundle: Bundle, processor: FamilyProcessor | None, options: ValidationOptions) -> None:
        self.bundle, self.processor, self.options = bundle, processor, options
        self.format: DataFormat | None = None
        self.format_line: int | None = None
        self.ids = IdIndex()
        self.image_results: OrderedDict[Path, str | None] = OrderedDict()

    def run(self) -> Iterator[CheckedSample]:
        for record in iter_records(self.bundle.data_file, self.bundle.display_name):
            yield self.check(record)

    def check(self, record: Record) -> CheckedSample:
        if record.issue is not None:
            return CheckedSample(record, None, [record.issue])
        fmt = self._format(record)
        if isinstance(fmt, Issue):
            return CheckedSample(record, None, [fmt])
        if fmt is DataFormat.PREFERENCE:
            return self._check_preference(record)
        parsed = parse_record(record.value, fmt, record.location, self.bundle.base_dir)
        issues = list(parsed.issues)
        if parsed.sample is None or has_errors(issues):
            return CheckedSample(record, None, issues)
        issues += check_sample(parsed, self.options.rules)
        issues += self._duplicate_id(record)
        if self.options.check_images:
            issues += self._images(parsed.sample, parsed.part_fields)
        tokenized = None
        if not has_errors(issues) and self.processor is not None:
            tokenized, length_issues = self._tokenize(self.processor, parsed.sample, parsed.message_fields)
            issues += length_issues
        return CheckedSample(record, parsed.sample, issues, tokenized)

    def _check_preference(self, record: Record) -> CheckedSample:
        """A preference pair: the SFT checks on both conversations (issues once each), images once, both tokenized
        (length issues name ``preferred_output`` / ``non_preferred_output``); the pair as a ``PreferenceSample``."""
        pair, issues = parse_preference(record.value, record.location, self.bundle.base_dir)
        if pair is None or has_errors(issues):
            return CheckedSample(record, None, issues)
        chosen, rejected = pair
        for issue in check_sample(chosen, self.options.rules) + check_sample(rejected, self.options.rules):
            if issue not in issues:
                issues.append(issue)
        issues += self._duplicate_id(record)
        if self.options.check_images:
            issues += self._images(chosen.sample, chosen.part_fields)  # the outputs' images are refused above
        assert chosen.sample is not None and rejected.sample is not None
        sample = PreferenceSample(chosen.sample.id, chosen.sample.messages, record.location,
                                  rejected=rejected.sample.messages)
        tokenized = None
        if not has_errors(issues) and self.processor is not None:
            tokenized, length_issues = self._tokenize(self.processor, chosen.sample, ["preferred_output"])
            issues += length_issues
            issues += self._tokenize(self.processor, rejected.sample, ["non_preferred_output"])[1]
        return CheckedSample(record, sample, issues, tokenized)

    def _format(self, record: Record) -> DataFormat | Issue:
        fmt = detect_format(record.value)
        loc = record.location
        if fmt is None:
            return Issue("schema", "expected an object with 'conversations' (Qwen-VL format) or 'messages' "
                         "(OpenAI format), or for DPO 'input' + 'preferred_output' + 'non_preferred_output' "
                         "(preference format)", loc)
        if self.format is None:
            self.format, self.format_line = fmt, loc.line if loc.line is not None else loc.index
        elif fmt is not self.format:
            where = "line" if loc.line is not None else "index"
            return Issue("mixed_formats", f"this record is in {fmt.value} format but the file is in "
                         f"{self.format.value} format (decided by the record at {where} {self.format_line})", loc)
        return fmt

    def _duplicate_id(self, record: Record) -> list[Issue]:
        raw = record.value.get("id")
        if raw is None:
            return []
        loc = record.location
        where = loc.line if loc.line is not None else loc.index
        first = self.ids.add(str(raw), where or 0)
        if first is None:
            return []
        what = "line" if loc.line is not None else "index"
        return [Issue("duplicate_id", f"duplicate id {str(raw)!r} (first seen at {what} {first})", loc, "id")]

    def _images(self, sample: Sample, part_fields: list[list[str]]) -> list[Issue]:
        issues: list[Issue] = []
        for msg, fields in zip(sample.messages, part_fields, strict=True):
            for part, path in zip(msg.parts, fields, strict=True):
                problem = self._image_problem(part) if isinstance(part, ImagePart) else None
                if problem is not None:
                    issues.append(Issue("image", problem, sample.location, path))
        return issues

    def _image_problem(self, part: ImagePart) -> str | None:
        source = part.source
        cacheable = isinstance(source, Path)
        if cacheable and source in self.image_results:
            self.image_results.move_to_end(source)
            return self.image_results[source]
        try:
            load_image(source, limits=self.options.image_limits)
            problem = None
        except ImageError as e:
            problem = str(e).replace(str(self.bundle.base_dir) + os.sep, "")
        if cacheable:
            self.image_results[source] = problem
            if len(self.image_results) > _IMAGE_CACHE:
                self.image_results.popitem(last=False)
        return problem

    def _tokenize(self, processor: FamilyProcessor, sample: Sample, fields: list[str]
                  ) -> tuple[TokenizedSample | None, list[Issue]]:
        top = fields[0].split("[", 1)[0] if fields else ""
        try:
            tokenized = tokenize_sample(sample, processor, self.options.encode)
        except LengthError as e:
            return None, [Issue("too_long", str(e), sample.location, top)]
        except PromptError as e:
            return None, [Issue("encoding", str(e), sample.location, top)]
        if not tokenized.truncated:
            return tokenized, []
        policy = LengthPolicy.TRUNCATE.value
        note = (f"truncated to its first {tokenized.turns_kept} of {tokenized.turns_total} turns "
                f"({len(tokenized.input_ids)} tokens; length policy: {policy})")
        return tokenized, [Issue("truncated", note, sample.location, top, Severity.WARNING)]


def read_samples(path: str | Path, processor: FamilyProcessor | None = None,
                 options: ValidationOptions = ValidationOptions()) -> list[Sample]:
    """All samples of a small file or bundle, checked (``DataError`` at the first problem).

    Image sources are resolved paths inside the bundle: for archives they point into a temporary directory
    that is removed on return, so use this for bare files, or ``open_bundle`` + ``iter_samples`` otherwise.
    """
    path = Path(path)
    with open_bundle(path, options.bundle_limits) as bundle:
        if bundle.data_file != path:
            raise DataError(f"{path.name}: read_samples needs a bare data file; open archives with open_bundle")
        return list(iter_samples(bundle, processor, options))
