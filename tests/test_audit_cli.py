"""`cai audit` as a linter: the `path:line:col: RULE message` text, --show-fixes, --statistics,
--exclude, --select/--ignore, --severity, inline suppression, --baseline, --exit-zero, the
pre-commit hook, and SARIF validated against the SARIF 2.1.0 JSON schema (vendored from the
sarif-om sdist: nothing is downloaded).

The fixture `tests/fixtures/audit/linter/` holds one suppressed remote-code load, one comment
naming another rule (which must not suppress), an unsuppressed load, a warning, and an
`archive/` file for --exclude."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import jsonschema
import pytest
import yaml

from cai.audit.findings import RULES
from cai.audit.static import audit, render, sarif
from cai.errors import BadInputError

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "audit"
LINTER = FIX / "linter"
SCHEMA = json.loads((FIX / "sarif-schema-2.1.0.json").read_text())
LINE = re.compile(r"^(?P<path>[^:\s]+):(?P<line>\d+):(?P<col>\d+): (?P<rule>[a-z0-9-]+) (?P<msg>\S.*)$")


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "cai.cli", "audit", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=60
    )


def keys(findings) -> set[tuple[str, str, int]]:
    return {(f.rule, f.path, f.line) for f in findings}


# ---------------------------------------------------------------------- text shape
def test_text_is_one_short_line_per_finding_with_a_path_that_opens():
    proc = run_cli(str(LINTER))
    assert proc.returncode == 1, proc.stderr
    *lines, summary = proc.stdout.strip().splitlines()
    result = audit([str(LINTER)])
    assert len(lines) == len(result.findings) == 4
    for line, f in zip(lines, result.findings):
        m = LINE.match(line)
        assert m, line
        assert (REPO / m["path"]).is_file()  # relative to the working directory, as ruff prints
        assert (m["rule"], int(m["line"]), int(m["col"])) == (f.rule, f.line, f.column)
        assert m["msg"] == f.short and len(f.short) < len(f.message) + 1 and "Fix:" not in line
    assert summary.startswith("cai audit: 4 finding(s)") and "1 suppressed" in summary


def test_show_fixes_prints_the_fix_which_json_and_sarif_carry():
    result = audit([str(FIX / "chat_template" / "bad")])
    text = render(result, show_fixes=True).splitlines()
    assert sum(line.startswith("    fix: ") for line in text) == len(result.findings)
    doc = json.loads(render(result, "json"))
    sar = sarif(result)["runs"][0]["results"]
    for f, d, s in zip(result.findings, doc["findings"], sar):
        assert f.fix and "Fix:" not in f.message  # the message's "Fix: ..." tail became the fix
        assert d["fix"] == f.fix == s["properties"]["fix"]
        assert f"    fix: {f.fix}" in text


def test_fix_defaults_to_the_rule_help_when_the_message_has_none():
    from cai.audit.findings import Finding

    f = Finding("unused-module", "a.py", 3, "a.py implements f but nothing imports it. It is dead.")
    assert f.fix == RULES["unused-module"].help and f.short == "a.py implements f but nothing imports it."
    g = Finding("unused-module", "a.py", 3, "what. why. Fix: do this.")
    assert (g.message, g.fix) == ("what. why.", "do this.")


def test_statistics_count_findings_per_rule():
    result = audit([str(FIX / "chat_template" / "bad"), str(FIX / "special_tokens" / "bad")])
    proc = run_cli(str(FIX / "chat_template" / "bad"), str(FIX / "special_tokens" / "bad"), "--statistics")
    counts = Counter(f.rule for f in result.findings)
    stats = [line.split() for line in proc.stdout.splitlines() if re.match(r"^\s*\d+\s+[a-z-]+\s+(error|warning)\s", line)]
    assert {s[1]: int(s[0]) for s in stats} == dict(counts) and len(counts) >= 3
    assert [int(s[0]) for s in stats] == sorted((int(s[0]) for s in stats), reverse=True)


# ---------------------------------------------------------------------- selection
def test_exclude_glob_drops_files_before_the_audit():
    everything = keys(audit([str(LINTER)]).findings)
    assert ("trust-remote-code", "archive/old_eval.py", 4) in everything
    for pattern in ("archive/**", "archive", "*/old_*.py"):
        got = keys(audit([str(LINTER)], exclude=[pattern]).findings)
        assert got == {k for k in everything if not k[1].startswith("archive/")}, pattern
    assert audit([str(LINTER)], exclude=["arch"]).files == audit([str(LINTER)]).files  # no partial-name match
    with pytest.raises(BadInputError, match="outside --exclude"):
        audit([str(LINTER)], exclude=["*"])


def test_select_ignore_and_severity():
    everything = audit([str(LINTER)]).findings
    assert {f.rule for f in everything} == {"trust-remote-code", "special-tokens-default"}
    only = audit([str(LINTER)], select=["special-tokens-default"]).findings
    assert {f.rule for f in only} == {"special-tokens-default"}
    by_category = audit([str(LINTER)], select=["remote-code"]).findings
    assert {f.rule for f in by_category} == {"trust-remote-code"}
    ignored = audit([str(LINTER)], ignore=["trust-remote-code"]).findings
    assert {f.rule for f in ignored} == {"special-tokens-default"}
    errors = audit([str(LINTER)], severity="error").findings
    assert errors and all(f.severity == "error" for f in errors) and len(errors) < len(everything)
    with pytest.raises(BadInputError, match="did you mean trust-remote-code"):
        audit([str(LINTER)], select=["trust-remote"])
    proc = run_cli(str(LINTER), "--ignore", "no-such-rule")
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1


def test_inline_suppression_names_the_rule_and_keeps_its_reason():
    result = audit([str(LINTER)])
    (sup,) = result.suppressed
    assert (sup.rule, sup.path, sup.line) == ("trust-remote-code", "scripts/load_judge.py", 11)
    assert sup.suppressed == "pinned revision, code reviewed"
    # a comment naming another rule suppresses nothing: line 14 is still reported
    assert ("trust-remote-code", "scripts/load_judge.py", 14) in keys(result.findings)
    assert ("trust-remote-code", "scripts/load_judge.py", 11) not in keys(result.findings)
    assert "load_judge.py:11:" not in render(result)
    doc = json.loads(render(result, "json"))
    assert doc["suppressed"] == [sup.to_dict()] and doc["suppressed"][0]["suppressed"]["reason"] == sup.suppressed
    assert doc["summary"]["suppressed"] == 1
    (res,) = [r for r in sarif(result)["runs"][0]["results"] if "suppressions" in r]
    assert res["suppressions"] == [{"kind": "inSource", "justification": "pinned revision, code reviewed"}]


def test_suppressing_every_error_exits_0(tmp_path):
    root = tmp_path / "p"
    root.mkdir()
    (root / "load.py").write_text(
        "from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained('m', trust_remote_code=True)  # cai: ignore[remote-code] reviewed\n"
    )
    assert run_cli(str(root)).returncode == 0
    (root / "load.py").write_text((root / "load.py").read_text().replace("# cai: ignore[remote-code] reviewed", ""))
    assert run_cli(str(root)).returncode == 1


def test_baseline_reports_only_new_findings(tmp_path):
    root = tmp_path / "linter"
    shutil.copytree(LINTER, root)
    base = tmp_path / "baseline.json"
    first = run_cli(str(root), "--format", "json")
    base.write_text(first.stdout)
    before = json.loads(first.stdout)["findings"]
    assert len(before) == 4 and all(f["fingerprint"] for f in before)
    # moving every line down does not resurface the known findings
    judge = root / "scripts" / "load_judge.py"
    judge.write_text("# a new header line\n\n" + judge.read_text())
    proc = run_cli(str(root), "--baseline", str(base), "--format", "json")
    doc = json.loads(proc.stdout)
    assert proc.returncode == 0 and doc["findings"] == [] and doc["summary"]["baselined"] == 4
    # a new hazard is reported, and only it
    judge.write_text(judge.read_text() + "\nEXTRA = AutoModelForCausalLM.from_pretrained('x', trust_remote_code=True)\n")
    proc = run_cli(str(root), "--baseline", str(base), "--format", "json")
    doc = json.loads(proc.stdout)
    assert proc.returncode == 1 and [(f["rule"], f["path"]) for f in doc["findings"]] == [
        ("trust-remote-code", "scripts/load_judge.py")
    ]
    assert doc["findings"][0]["line"] == judge.read_text().splitlines().index(
        "EXTRA = AutoModelForCausalLM.from_pretrained('x', trust_remote_code=True)"
    ) + 1
    sar = json.loads(run_cli(str(root), "--baseline", str(base), "--format", "sarif").stdout)
    assert [r.get("baselineState") for r in sar["runs"][0]["results"] if "suppressions" not in r] == ["new"]


def test_bad_baseline_is_bad_input(tmp_path):
    (tmp_path / "b.json").write_text('{"findings": [{"rule": "x"}]}')
    (tmp_path / "c.json").write_text("not json")
    for name in ("b.json", "c.json", "missing.json"):
        proc = run_cli(str(LINTER), "--baseline", str(tmp_path / name))
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--baseline" in proc.stderr


def test_exit_zero_reports_but_does_not_fail():
    proc = run_cli(str(LINTER), "--exit-zero")
    assert proc.returncode == 0 and "trust-remote-code" in proc.stdout
    assert run_cli("/nonexistent/cai/audit/path", "--exit-zero").returncode == 2


# ---------------------------------------------------------------------- SARIF and pre-commit
def test_sarif_validates_against_the_sarif_2_1_0_schema(tmp_path):
    validator = jsonschema.Draft4Validator(SCHEMA)
    base = tmp_path / "base.json"
    base.write_text(render(audit([str(LINTER)], select=["special-tokens"]), "json"))
    for result in (
        audit([str(LINTER)]),
        audit([str(LINTER)], baseline=base),
        audit([str(FIX / d / "bad") for d in ("chat_template", "config_drift", "memory_sequencing")]),
        audit([str(FIX / "parse_error")]),
    ):
        doc = json.loads(render(result, "sarif"))
        errors = sorted(validator.iter_errors(doc), key=str)
        assert errors == [], errors[0].message if errors else ""
    # the schema check can fail: a level SARIF does not define is refused
    doc["runs"][0]["results"][0]["level"] = "fatal"
    assert not validator.is_valid(doc)


def test_pre_commit_hook_runs_the_console_script_on_the_whole_repo():
    (hook,) = yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())
    assert hook["id"] == "cai-audit" and hook["pass_filenames"] is False and hook["language"] == "python"
    entry = hook["entry"].split()
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert entry[0] in scripts and entry[1:] == ["audit"]
    proc = run_cli(*hook["args"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
