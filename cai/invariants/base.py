"""Invariants are small objects: a name, a severity, a docstring saying which failure
they prevent, and `check(subject) -> Result`. Results serialise to JSON so manifests and
reports carry them. Evaluate every invariant of a stage, then fail once with all
failures listed (pandera's lazy validation)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, ClassVar, Iterable

from cai.errors import InvariantError


class Severity(str, Enum):
    ERROR = "error"  # blocks: the artifact is not certified, the run does not count
    WARN = "warning"  # reported beside the results


class Status(str, Enum):
    PASS = "pass"
    FAIL = "fail"  # an error-severity invariant failed
    WARN = "warn"  # a warning-severity invariant failed


@dataclass
class Result:
    name: str
    status: Status
    severity: Severity
    evidence: str
    details: Any = field(default=None)

    @property
    def blocking(self) -> bool:
        return self.status == Status.FAIL

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status.value
        d["severity"] = self.severity.value
        if d["details"] is None:
            del d["details"]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Result":
        return cls(d["name"], Status(d["status"]), Severity(d["severity"]), d["evidence"], d.get("details"))


class Invariant:
    """Subclasses set `name`, `severity`, write a docstring (the failure it prevents), and
    implement `_check(subject) -> (ok, evidence[, details])`."""

    name: ClassVar[str]
    severity: ClassVar[Severity] = Severity.ERROR

    def _check(self, subject) -> tuple:
        raise NotImplementedError

    def check(self, subject) -> Result:
        ok, evidence, *rest = self._check(subject)
        details = rest[0] if rest else None
        if ok:
            status = Status.PASS
        else:
            status = Status.FAIL if self.severity == Severity.ERROR else Status.WARN
        return Result(self.name, status, self.severity, evidence, details)


def evaluate(invariants: Iterable[Invariant], subject) -> list[Result]:
    return [inv.check(subject) for inv in invariants]


def raise_on_failures(results: Iterable[Result]) -> None:
    """Raise one InvariantError listing every blocking failure (none: return)."""
    failed = [r for r in results if r.blocking]
    if failed:
        raise InvariantError(failed)


def all_passed(results: Iterable[Result | dict]) -> bool:
    """True when no error-severity result failed (warnings do not void a run)."""
    for r in results:
        status = r["status"] if isinstance(r, dict) else r.status.value
        if status == Status.FAIL.value:
            return False
    return True
