"""Evaluation suites: `pytest suites/ --cai-run RUN_DIR`.

The run's `eval` artifact holds the responses of base, SFT and DPO (adapters switched on
one resident base) for every suite; these tests score them with the canonical metric,
check the comparison is fair, and write the report after the harness's gate has decided.
"""

import json

import pytest

from cai.harness.report import REPORT_DIR, build_report
from cai.pipeline.compare import load_eval_set, summarize
from cai.pipeline.store import read_artifact, write_json_atomic


@pytest.fixture(scope="session")
def eval_records(cai_run):
    if "eval" not in cai_run.artifacts:
        pytest.skip(f"{cai_run.dir}: no eval artifact (run `cai run` first)")
    return list(read_artifact(cai_run.artifact("eval")).records())


@pytest.fixture(scope="session")
def eval_items(cai_config, eval_records):
    wanted = {(r["eval_set"], r["key"]) for r in eval_records}
    return [it for name in cai_config.eval.sets for it in load_eval_set(name) if (name, it["key"]) in wanted]


@pytest.fixture(scope="session")
def results(cai_run, cai_config, eval_items, eval_records):
    summary = summarize(cai_config, eval_items, eval_records)
    out = cai_run.dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", summary)
    return summary


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    """After the gate wrote reports/invariants.json: the report, VOID or not."""
    run_dir = session.config.getoption("--cai-run")
    if run_dir:
        path = build_report(run_dir)
        verdict = json.loads((path.parent / "invariants.json").read_text())["verdict"] \
            if (path.parent / "invariants.json").is_file() else "?"
        session.config.get_terminal_writer().line(f"cai report ({verdict}): {path}")
