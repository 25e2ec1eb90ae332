"""The shipped demo (`reports/examples/demo/`): a real `cai run configs/demo.yaml`, copied
without its trainer checkpoints. An example that no longer verifies under the current code,
whose numbers the code no longer rebuilds, or whose config is not the one in `configs/`
would lend trust it has not earned: these tests fail on each."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from cai.config import load_config

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "reports" / "examples" / "demo"
RUN = DEMO / "run"


def test_the_demo_run_is_configs_demo_yaml():
    index = json.loads((RUN / "run.json").read_text())
    assert index["config_hash"] == load_config(REPO / "configs" / "demo.yaml").hash()
    assert index["status"] == "stages complete"


def test_the_shipped_report_is_the_runs_own():
    assert (DEMO / "report.md").read_bytes() == (RUN / "reports" / "report.md").read_bytes()
    assert (DEMO / "report.html").read_bytes() == (RUN / "reports" / "report.html").read_bytes()
    plots = sorted(p.name for p in (RUN / "reports" / "plots").glob("*.png"))
    assert plots and plots == sorted(p.name for p in (DEMO / "plots").glob("*.png"))
    assert (DEMO / "report.md").read_text().startswith("**VALID**")


def test_the_demo_run_verifies_and_rebuilds_its_numbers(tmp_path):
    """`cai report` re-verifies every artifact from its files and rescores the eval records:
    the run counts, and scores, comparisons and the verdict line come out as shipped."""
    run = Path(shutil.copytree(RUN, tmp_path / RUN.name))
    shutil.rmtree(run / "reports" / "plots")
    proc = subprocess.run([sys.executable, "-m", "cai", "report", str(run)], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rebuilt, shipped = (json.loads((d / "reports" / "results.json").read_text()) for d in (run, RUN))
    assert rebuilt == shipped
    first_line = lambda d: (d / "reports" / "report.md").read_text().splitlines()[0]  # noqa: E731
    assert first_line(run) == first_line(RUN)
    assert sorted(p.name for p in (run / "reports" / "plots").glob("*.png")) == sorted(
        p.name for p in (RUN / "reports" / "plots").glob("*.png"))
