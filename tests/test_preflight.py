"""`cai preflight` fails on a methodology violation before any model work, naming the row."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


def violating_config(tmp_path, overrides) -> Path:
    cfg = yaml.safe_load(open("configs/smoke.yaml"))
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        cfg[section][key] = value
    path = tmp_path / "violating.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("overrides, row", [
    ({"critic.enabled": False}, "critic filtering on"),
    ({"eval.format": "raw"}, "evaluation in the training format"),
    ({"responses.shots": 0}, "few-shot completion prompting"),
    ({"dpo.beta": 0.5}, "DPO beta in the documented range"),
    ({"instructions.source": "templates"}, "instructions are model-generated"),
    ({"model.trust_remote_code": True}, "remote code off"),
])
def test_methodology_violation_fails_with_the_row_named(tmp_path, overrides, row, capsys):
    """In process (the CLI's own `main`); the console exit status is the next test's."""
    from cai.cli import main

    assert main(["preflight", str(violating_config(tmp_path, overrides)), "--out", str(tmp_path / "pf")]) == 1
    report = json.loads((tmp_path / "pf" / "violating.json").read_text())
    failed = [r["requirement"] for r in report["compliance"] if not r["passed"]]
    assert len(failed) == 1 and failed[0].startswith(row)
    assert f"FAIL  {row}" in capsys.readouterr().err
    assert report["rehearsal_error"].startswith("skipped")


def test_violation_exits_1_from_the_console(tmp_path):
    path = violating_config(tmp_path, {"critic.enabled": False})
    proc = subprocess.run([sys.executable, "-m", "cai.cli", "preflight", str(path), "--out", str(tmp_path / "pf")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "FAIL  critic filtering on" in proc.stderr and "Traceback" not in proc.stderr


def test_smoke_config_complies():
    from cai.audit.preflight import compliance
    from cai.config import load_config

    rows = compliance(load_config("configs/smoke.yaml"))
    assert all(r.passed for r in rows), [r for r in rows if not r.passed]


def test_weights_row_reads_the_rehearsal_artifacts(make_run_dir):
    """The row after the rehearsal passes on artifacts whose loaded weights match the config
    and fails, naming the mismatch, when a manifest says the model was quantized but its
    weights were not."""
    import json as _json

    from cai.audit.preflight import weights_row
    from cai.config import RunConfig

    run = make_run_dir()
    cfg = RunConfig.model_validate(_json.loads((run / "run.json").read_text())["config"])
    assert weights_row(cfg, run).passed
    manifest = run / "responses" / "manifest.json"
    data = _json.loads(manifest.read_text())
    data["model"]["quantization"] = "4bit"
    manifest.write_text(_json.dumps(data))
    row = weights_row(cfg, run)
    assert not row.passed and "quantization declared '4bit', loaded 'none'" in row.observed
