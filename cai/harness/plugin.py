"""The cai pytest plugin (entry point `pytest11: cai`): runs count only when invariants pass.

Options (group "cai"):
  --cai-run DIR         the run under test: its artifacts' invariants become test items,
                        `cai_run` / `cai_config` fixtures point at it, and the report goes to
                        DIR/reports/invariants.json
  --cai-report-dir DIR  where invariants.json goes (default: <run>/reports)
  --cai-no-gate         report, but leave the exit status alone

Markers: `invariant` (an invariant check; the run's invariant items carry it),
`stage(name)` (needs the run's `name` artifact; skipped when the run lacks it),
`gpu` (skipped without CUDA), `slow`.

Fixtures: `cai_run` (RunContext: dir, config, config_hash, run_json, artifacts, manifests;
skips without --cai-run), `cai_config` (the run's RunConfig), `cai_gate` (record results
for the gate: `cai_gate.record(result)` / `cai_gate.check(invariants, subject)`),
`cai_invariant_results` (the run's (subject, Result) list), `cai_session`.

Gate: if any error-severity invariant failed in the session, the exit status is OR-ed with
8 (`VOID_EXIT_CODE`: 8 = tests passed but the run is VOID, 9 = tests failed too) and the
report says `"verdict": "VOID"` with the failing invariants. The terminal summary prints
a table of every invariant result.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from cai.harness.session import VOID_EXIT_CODE, CaiSession, GateRecorder  # noqa: F401 - re-exported

CAI_SESSION = pytest.StashKey[CaiSession]()
MARKERS = (
    "invariant: an invariant check; a failing error-severity invariant voids the run",
    "stage(name): needs the run's artifact of stage `name` (skipped when the run has none)",
    "gpu: needs a CUDA GPU (skipped without one)",
    "slow: takes more than a few seconds",
)


class CaiInvariantWarning(UserWarning):
    """A warning-severity invariant did not hold (reported, does not void the run)."""


class InvariantFailed(Exception):
    def __init__(self, subject: str, result):
        self.subject = subject
        self.result = result
        super().__init__(f"{result.name}: {result.evidence}")


# --------------------------------------------------------------------------- configuration


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("cai", "cai: invariants decide whether a run counts")
    group.addoption("--cai-run", metavar="DIR", default=None,
                    help="run directory under test: its invariants become test items and gate the session")
    group.addoption("--cai-report-dir", metavar="DIR", default=None,
                    help="where to write invariants.json (default: <run>/reports)")
    group.addoption("--cai-no-gate", action="store_true", default=False,
                    help=f"report failing invariants without OR-ing {VOID_EXIT_CODE} into the exit status")


def pytest_configure(config: pytest.Config) -> None:
    for line in MARKERS:
        config.addinivalue_line("markers", line)
    run_dir = config.getoption("--cai-run", default=None)
    if run_dir is not None:
        from cai.errors import CaiError
        from cai.invariants.check import require_run_dir

        try:
            require_run_dir(run_dir)  # nothing is written into a directory that is not a run
        except CaiError as err:
            raise pytest.UsageError(f"--cai-run {err}") from None
    config.stash[CAI_SESSION] = CaiSession(run_dir, config.getoption("--cai-report-dir", default=None),
                                           gate=not config.getoption("--cai-no-gate", default=False))


def _session(config: pytest.Config) -> CaiSession:
    return config.stash[CAI_SESSION]


# --------------------------------------------------------------------------- invariant items


class RunCollector(pytest.Collector):
    """The run's invariants, grouped per artifact (nodeids `cai-run[<name>]::<artifact>::<invariant>`)."""

    def collect(self):
        return []


class InvariantItem(pytest.Item):
    """One invariant of one artifact (or of the run): passes, warns (CaiInvariantWarning) or fails."""

    def __init__(self, *, subject: str, result, **kwargs):
        super().__init__(**kwargs)
        self.subject = subject
        self.result = result
        self.add_marker(pytest.mark.invariant)
        self.user_properties += [("cai_invariant", result.name), ("cai_subject", subject or "run"),
                                 ("cai_status", result.status.value), ("cai_severity", result.severity.value),
                                 ("cai_evidence", result.evidence)]

    def runtest(self) -> None:
        status = self.result.status.value
        if status == "fail":
            raise InvariantFailed(self.subject, self.result)
        if status == "warn":
            warnings.warn(CaiInvariantWarning(f"{self.subject or 'run'}: {self.result.name}: {self.result.evidence}"))

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, InvariantFailed):
            r = excinfo.value.result
            return (f"invariant {r.name} [{r.severity.value}] failed on {self.subject or 'the run'}:\n"
                    f"  {r.evidence}\n(a failing error-severity invariant voids the run)")
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return self.path, None, f"cai invariant {self.subject + '::' if self.subject else ''}{self.result.name}"


def _invariant_items(session: pytest.Session, cai: CaiSession) -> list[pytest.Item]:
    run = cai.run
    results = cai.run_results()
    run_node = RunCollector.from_parent(session, name=f"cai-run[{run.dir.name}]", path=run.dir,
                                        nodeid=f"cai-run[{run.dir.name}]")
    groups: dict[str, pytest.Collector] = {}
    items = []
    for subject, result in results:
        key = subject or "run"
        if key not in groups:
            path = run.artifacts.get(subject, run.dir)
            groups[key] = RunCollector.from_parent(run_node, name=key, path=path, nodeid=f"{run_node.nodeid}::{key}")
        parent = groups[key]
        item = InvariantItem.from_parent(parent, name=result.name, subject=subject, result=result,
                                         nodeid=f"{parent.nodeid}::{result.name}")
        stage = run.manifests.get(subject, {}).get("stage")
        if stage:
            item.add_marker(pytest.mark.stage(stage))
        items.append(item)
    return items


@pytest.hookimpl(tryfirst=True)  # before -k / -m deselection, so `-m invariant` selects them
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    cai = _session(config)
    if cai.run_dir is not None:
        items.extend(_invariant_items(session, cai))  # run_results() turns any failure into a failed result
        stages = set(cai.run.stages)
        for item in items:
            for mark in item.iter_markers("stage"):
                if mark.args and mark.args[0] not in stages:
                    item.add_marker(pytest.mark.skip(reason=f"run has no {mark.args[0]!r} artifact (stages: {sorted(stages)})"))
    if any(item.get_closest_marker("gpu") for item in items):
        import torch

        if not torch.cuda.is_available():
            for item in items:
                if item.get_closest_marker("gpu"):
                    item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (none available)"))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def cai_session(request) -> CaiSession:
    return _session(request.config)


@pytest.fixture(scope="session")
def cai_run(cai_session):
    """The run under test (RunContext); skips unless pytest got --cai-run DIR."""
    if cai_session.run_dir is None:
        pytest.skip("no run under test: pass --cai-run DIR (a directory written by `cai run`)")
    return cai_session.run


@pytest.fixture(scope="session")
def cai_config(cai_run):
    """The run's RunConfig; skips when the run carries none (run.json 'config' or config.yaml)."""
    if cai_run.config is None:
        pytest.skip(f"run {cai_run.dir} carries no config (run.json 'config' or config.yaml)")
    return cai_run.config


@pytest.fixture(scope="session")
def cai_invariant_results(cai_session, cai_run):
    """(subject, Result) for every invariant of the run (subject "" = run-level)."""
    return cai_session.run_results()


@pytest.fixture
def cai_gate(cai_session, request) -> GateRecorder:
    """Record invariant results for the gate: `cai_gate.check(invariants, subject)`."""
    return GateRecorder(cai_session, request.node.nodeid)


# --------------------------------------------------------------------------- reporting and gate


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    """Attach the invariant results a test recorded (cai_gate) to it: they reach JUnit as
    properties (junitxml reads item.user_properties from the teardown report)."""
    report = yield
    if call.when == "call" and not isinstance(item, InvariantItem):
        cai = _session(item.config)
        for e in cai.entries:
            if e.source == item.nodeid:
                prop = (f"cai_invariant:{e.label}", f"{e.result.status.value}: {e.result.evidence[:200]}")
                item.user_properties.append(prop)
                if report.user_properties is not item.user_properties:
                    report.user_properties.append(prop)
    return report


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus) -> None:
    cai = _session(session.config)
    cai.run_results()  # the run's invariants gate the session even if collection stopped early (never raises)
    if cai.gate and cai.void:
        session.exitstatus = int(session.exitstatus) | VOID_EXIT_CODE
    cai.exitstatus = int(session.exitstatus)
    if cai.entries or cai.run_dir is not None:
        cai.write_report(cai.exitstatus)


def _oneline(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    cai = _session(config)
    if not cai.entries:
        return
    tr = terminalreporter
    tr.section("cai invariants")
    width = min(60, max(len(e.label) for e in cai.entries))
    for e in cai.entries:
        status = e.result.status.value.upper()
        markup = {"PASS": {"green": True}, "FAIL": {"red": True, "bold": True}, "WARN": {"yellow": True}}[status]
        tr.write(f"{status:4}", **markup)
        tr.write_line(f"  {e.result.severity.value:7}  {e.label:<{width}}  {_oneline(e.result.evidence, 100)}")
    c = cai.counts()
    if cai.void:
        names = ", ".join(e.label for e in cai.failures())
        gate = f"exit status |= {VOID_EXIT_CODE}" if cai.gate else "gate disabled (--cai-no-gate)"
        tr.write_line(f"cai: run VOID: {c['fail']} invariant(s) failed: {names} ({gate})", red=True, bold=True)
    else:
        tr.write_line(f"cai: all {c['pass'] + c['warn']} invariant(s) hold ({c['warn']} warning(s))", green=True)
    if cai.report_path is not None:
        tr.write_line(f"cai: report written to {cai.report_path}")
