"""Session state of the cai pytest plugin: the run under test, every invariant result seen
during the session, the gate verdict and the report JSON.

The gate: a session in which any error-severity invariant failed (recorded from the
run's manifests / live provenance checks, or by a test through the `cai_gate` fixture) is
VOID. pytest's exit status is then OR-ed with `VOID_EXIT_CODE` (8) — so 8 means "tests
passed but the run is void", 9 "tests failed and the run is void" (pytest's own codes are
0-5, the low three bits) — and `<run>/reports/invariants.json` says `"verdict": "VOID"`
naming the failing invariants.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

VOID_EXIT_CODE = 8
REPORT_NAME = "invariants.json"
REPORT_SCHEMA = "cai.invariants-report/1"


@dataclass
class RunContext:
    """A run directory as tests see it (the `cai_run` fixture)."""

    dir: Path
    config: Any = None  # RunConfig, when the run carries one (run.json "config" or config.yaml)
    config_hash: str | None = None
    run_json: dict[str, Any] | None = None
    artifacts: dict[str, Path] = field(default_factory=dict)  # relative path -> artifact dir
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def stages(self) -> dict[str, str]:
        """stage name -> relative artifact path (the last one, when a stage has several)."""
        return {m.get("stage"): rel for rel, m in self.manifests.items()}

    def artifact(self, stage: str) -> Path:
        if stage not in self.stages:
            raise KeyError(f"run {self.dir} has no {stage!r} artifact; stages: {sorted(self.stages)}")
        return self.artifacts[self.stages[stage]]

    @classmethod
    def load(cls, run_dir: str | Path) -> "RunContext":
        """The run as far as it can be read: an unreadable run.json or manifest leaves its
        field empty (the verification fails on it, naming it); a directory that is not a run
        at all is bad input."""
        from cai.errors import CaiError
        from cai.invariants.check import find_artifacts, require_run_dir, run_info
        from cai.pipeline.store import read_manifest

        run_dir = require_run_dir(run_dir)
        try:
            info = run_info(run_dir)
        except CaiError:
            info = {"config": None, "config_hash": None, "run_json": None}
        ctx = cls(run_dir, info["config"], info["config_hash"], info["run_json"])
        for a in find_artifacts(run_dir):
            rel = a.relative_to(run_dir).as_posix()
            ctx.artifacts[rel] = a
            try:
                ctx.manifests[rel] = read_manifest(a)
            except CaiError:
                ctx.manifests[rel] = {}
        return ctx


@dataclass
class Entry:
    """One invariant result seen in the session: about `subject`, recorded by `source`
    ("run" for the run's own checks, else the test's node id)."""

    subject: str
    source: str
    result: Any  # cai.invariants.base.Result

    def to_json(self) -> dict[str, Any]:
        r = self.result
        where = self.subject or ("run" if self.source == "run" else "evaluation")
        return {"subject": self.subject, "where": where, "source": self.source, "name": r.name,
                "status": r.status.value, "severity": r.severity.value, "evidence": r.evidence}

    @property
    def label(self) -> str:
        return f"{self.subject}::{self.result.name}" if self.subject else self.result.name


def _recorded(manifest: dict[str, Any]) -> list[Any]:
    """The invariant results a stage recorded in its manifest, named `<name>[recorded]` so
    they sit beside the harness's own live re-checks of the same artifact."""
    from cai.invariants.base import Result, Severity, Status

    out = []
    for d in manifest.get("invariants", []):
        if not isinstance(d, dict):
            out.append(Result("unreadable[recorded]", Status.FAIL, Severity.ERROR, f"recorded result {d!r} is not an object"))
            continue
        from cai.pipeline.store import VALID_OUTCOMES

        if (d.get("status"), d.get("severity")) in VALID_OUTCOMES:
            status, severity = Status(d["status"]), Severity(d["severity"])
        else:  # a failure, or an outcome cai never writes (a hand-edited "warn" on an error check)
            status, severity = Status.FAIL, Severity.ERROR
        out.append(Result(f"{d.get('name', '?')}[recorded]", status, severity, str(d.get("evidence", "")),
                          d.get("details")))
    return out


class CaiSession:
    """Stored in `config.stash[CAI_SESSION]`; one per pytest session."""

    def __init__(self, run_dir: str | Path | None, report_dir: str | Path | None = None, gate: bool = True):
        self.run_dir = Path(run_dir) if run_dir else None
        self.report_dir = Path(report_dir) if report_dir else (self.run_dir / "reports" if self.run_dir else None)
        self.gate = gate
        self.entries: list[Entry] = []
        self._run: RunContext | None = None
        self._run_results: list[tuple[str, Any]] | None = None
        self.report_path: Path | None = None
        self.exitstatus: int | None = None
        self.results: dict[str, Any] | None = None  # evaluation results computed in this session

    # -- the run ------------------------------------------------------------

    @property
    def run(self) -> RunContext | None:
        if self.run_dir is not None and self._run is None:
            self._run = RunContext.load(self.run_dir)
        return self._run

    def run_results(self) -> list[tuple[str, Any]]:
        """(subject, Result) for every invariant of the run: each artifact's provenance,
        recorded and content invariants, and the run-level checks (subject ""). Evaluated
        once, and recorded for the gate whether or not their test items are selected. Fails
        closed: if the verification itself raises, that is one failed result naming why."""
        if self._run_results is None and self.run_dir is not None:
            from cai.invariants.base import Result, Severity, Status
            from cai.invariants.check import check_run

            rows: list[tuple[str, Any]] = []
            try:
                report = check_run(self.run_dir)
                for r in report.results:
                    subject, _, name = r.name.rpartition("/")
                    recorded = self.run.manifests.get(subject, {}).get("invariants")
                    if name == "recorded_invariants_passed" and isinstance(recorded, list) and recorded:
                        rows.extend((subject, rec) for rec in _recorded(self.run.manifests[subject]))
                        if r.blocking:  # keep the aggregate too when it failed for a reason of its own
                            rows.append((subject, Result(name, r.status, r.severity, r.evidence, r.details)))
                        continue  # one item per recorded result instead of the aggregate
                    rows.append((subject, Result(name, r.status, r.severity, r.evidence, r.details)))
            except Exception as err:  # noqa: BLE001 - a verification that could not run is a failure
                first = str(err).splitlines()[0] if str(err) else ""
                rows = [("", Result("run_verification", Status.FAIL, Severity.ERROR,
                                    f"verifying {self.run_dir} raised {type(err).__name__}: {first}"))]
            self._run_results = rows
            self.entries.extend(Entry(subject, "run", res) for subject, res in rows)
        return self._run_results or []

    # -- the gate -----------------------------------------------------------

    def record(self, results, *, subject: str = "", source: str = "api") -> list[Any]:
        """Record one Result or several for the gate and the report; returns them as a list."""
        from cai.invariants.base import Result

        items = [results] if isinstance(results, Result) else list(results)
        for r in items:
            self.entries.append(Entry(subject, source, r))
        return items

    def failures(self) -> list[Entry]:
        return [e for e in self.entries if e.result.status.value == "fail"]

    @property
    def void(self) -> bool:
        return bool(self.failures())

    def counts(self) -> dict[str, int]:
        out = {"pass": 0, "fail": 0, "warn": 0}
        for e in self.entries:
            out[e.result.status.value] += 1
        return out

    def report(self, exitstatus: int | None) -> dict[str, Any]:
        failed = self.failures()
        return {
            "schema": REPORT_SCHEMA,
            "run": str(self.run_dir) if self.run_dir else None,
            "verdict": "VOID" if failed else "VALID",
            "void": bool(failed),
            "failed": [e.label for e in failed],
            "counts": self.counts(),
            "exitstatus": exitstatus,
            "void_exit_code": VOID_EXIT_CODE,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "results": [e.to_json() for e in self.entries],
            "artifacts": self.artifact_hashes(),
        }

    def artifact_hashes(self) -> dict[str, str]:
        """sha256 of every artifact manifest of the run, as this session saw it: ties the
        evaluation results recorded here to those exact artifacts (`cai report` compares)."""
        from cai.pipeline.store import MANIFEST, sha256_file

        if self.run_dir is None or self._run is None:
            return {}
        return {rel: sha256_file(d / MANIFEST) for rel, d in self._run.artifacts.items() if (d / MANIFEST).is_file()}

    def write_report(self, exitstatus: int | None) -> Path | None:
        """Write `<report_dir>/invariants.json` (default `<run>/reports/`); None without a place."""
        if self.report_dir is None:
            return None
        from cai.pipeline.store import write_json_atomic

        self.report_dir.mkdir(parents=True, exist_ok=True)
        path = self.report_dir / REPORT_NAME
        write_json_atomic(path, self.report(exitstatus))
        self.report_path = path
        return path


class GateRecorder:
    """What the `cai_gate` fixture hands a test: results it records count for the gate
    and are attached to the test's report (JUnit properties)."""

    def __init__(self, session: CaiSession, nodeid: str):
        self._session = session
        self.nodeid = nodeid

    def record(self, results, subject: str = "") -> list[Any]:
        return self._session.record(results, subject=subject, source=self.nodeid)

    def check(self, invariants: Iterable[Any], subject_value: Any, subject: str = "") -> list[Any]:
        """Evaluate invariants on a subject and record the results (no raise: the gate voids
        the run at the end; assert on the returned results to fail the test too)."""
        from cai.invariants.base import evaluate

        return self.record(evaluate(invariants, subject_value), subject=subject)

    @property
    def void(self) -> bool:
        return self._session.void
