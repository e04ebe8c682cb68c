"""Where a data problem is and what it is: locations, issues, the issue collector and the data error types.

Every user-facing data problem is an ``Issue`` carrying a ``Location`` (file, line, JSON element index, field
path) so the CLI and the REST API can print ``train.jsonl:12: messages[2].content[1].image_url.url: image not
found: imgs/a.png`` without knowing how it was found. ``IssueCollector`` keeps the first ``cap`` issues of
each severity and counts all of them, so a million bad lines cost constant memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from qwenvl_core.errors import QwenVLError


class DataError(QwenVLError):
    """A data file or sample is unusable (the message names file, line or index, and field)."""


class BundleError(DataError):
    """An upload bundle (.zip / .tar.gz) is unsafe or over a limit."""


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True)
class Location:
    """A place in a data file. ``line`` is 1-based; ``index`` is the 0-based record (JSON list element)."""

    file: str
    line: int | None = None
    index: int | None = None

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.file}:{self.line}"
        if self.index is not None:
            return f"{self.file}[{self.index}]"
        return self.file


@dataclass(frozen=True)
class Issue:
    """One problem found in the data. ``field`` is a path such as ``messages[2].content[1].image_url.url``."""

    code: str
    message: str
    location: Location
    field: str = ""
    severity: Severity = Severity.ERROR

    def __str__(self) -> str:
        where = f"{self.location}: {self.field}" if self.field else str(self.location)
        return f"{where}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "severity": self.severity.value,
            "code": self.code,
            "file": self.location.file,
            "line": self.location.line,
            "index": self.location.index,
            "field": self.field,
            "message": self.message,
            "text": str(self),
        }


@dataclass
class IssueCollector:
    """Keeps up to ``cap`` errors and ``cap`` warnings, and counts every one."""

    cap: int = 100
    errors: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)
    error_count: int = 0
    warning_count: int = 0

    def add(self, issue: Issue) -> None:
        if issue.severity is Severity.ERROR:
            self.error_count += 1
            if len(self.errors) < self.cap:
                self.errors.append(issue)
        else:
            self.warning_count += 1
            if len(self.warnings) < self.cap:
                self.warnings.append(issue)

    def extend(self, issues: list[Issue]) -> None:
        for issue in issues:
            self.add(issue)


def has_errors(issues: list[Issue]) -> bool:
    """True if any issue in ``issues`` is an error (not just a warning)."""
    return any(i.severity is Severity.ERROR for i in issues)


def raise_first_error(issues: list[Issue]) -> None:
    """Raise ``DataError`` with the first error in ``issues``, if there is one."""
    for issue in issues:
        if issue.severity is Severity.ERROR:
            raise DataError(str(issue))
