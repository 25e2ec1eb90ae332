"""Evaluation suites: `pytest suites/ --cai-run RUN_DIR`.

The run's `eval` artifact holds the responses of base, SFT and DPO (adapters switched on
one resident base) for every suite; these tests score them with the canonical metric,
check the comparison is fair, and write the report after the harness's gate has decided,
from what this session verified and computed (never from a stored results file).
"""

import pytest

from cai.harness.plugin import CAI_SESSION
from cai.harness.report import build_report, compute_results
from cai.pipeline.store import read_artifact


@pytest.fixture(scope="session")
def eval_records(cai_run):
    if "eval" not in cai_run.artifacts:
        pytest.skip(f"{cai_run.dir}: no eval artifact (run `cai run` first)")
    return list(read_artifact(cai_run.artifact("eval")).records())


@pytest.fixture(scope="session")
def results(cai_run, cai_session, eval_records):
    cai_session.results = compute_results(cai_run.dir)
    return cai_session.results


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    """After the gate wrote reports/invariants.json: the report, VOID or not."""
    cai = session.config.stash.get(CAI_SESSION, None)
    if cai is None or cai.run_dir is None:
        return
    report = cai.report(cai.exitstatus)
    path = build_report(cai.run_dir, report["results"], cai.results)
    session.config.get_terminal_writer().line(f"cai report ({report['verdict']}): {path}")
