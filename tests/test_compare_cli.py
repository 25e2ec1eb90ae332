"""`cai compare A B` end to end through the CLI (`python -m cai compare ...`) on files the
tests write: an artifact pair that --strict refuses, a clean control, bad inputs (exit 2,
one line), the json and md formats, and cai eval records scored by the canonical scorer
giving the very numbers a run's report gives."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cai.config import RunConfig
from cai.pipeline.compare import load_eval_set, summarize

ROOT = Path(__file__).resolve().parent.parent
SHORT, LONG = "a calm day by the sea.", "a calm day by the sea where the waves roll in and the gulls call all morning long."


def cai_compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cai", "compare", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _verdicts(n=20, *, long_fails_cut: bool):
    """System A: with long_fails_cut, every odd item's answer is long, hit the token cap and
    failed (the length/truncation artifact); else A fails odd items with ordinary answers."""
    rows = []
    for k in range(n):
        bad = k % 2 == 1
        rows.append({"key": f"item-{k}", "passed": not bad, "instruction": f"Describe the sea ({k}).",
                     "response": LONG if bad and long_fails_cut else (SHORT if not bad else SHORT.capitalize()),
                     "stop_reason": "length" if bad and long_fails_cut else "eos"})
    return rows


@pytest.fixture
def pair(tmp_path):
    def make(long_fails_cut: bool):
        b = [{**r, "passed": True, "response": SHORT, "stop_reason": "eos"} for r in _verdicts(long_fails_cut=False)]
        return (write(tmp_path / "a.jsonl", _verdicts(long_fails_cut=long_fails_cut)), write(tmp_path / "b.jsonl", b))
    return make


def test_a_truncation_and_length_artifact_fails_under_strict(pair):
    a, b = pair(long_fails_cut=True)
    out = cai_compare(a, b, "--strict")
    assert out.returncode == 1, out.stderr
    for what in ("length predicts the verdict (A)", "truncated (A): 10 of 20", "truncation-driven (A vs B): in 10 of 10"):
        assert what in out.stdout
    assert cai_compare(a, b).returncode == 0  # reported, not refused, without --strict


def test_a_clean_pair_passes_under_strict(pair):
    a, b = pair(long_fails_cut=False)
    out = cai_compare(a, b, "--strict")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "no artifact diagnostic fired" in out.stdout and "B is better: +0.500" in out.stdout


def test_strict_fails_closed_when_the_diagnostics_cannot_run(tmp_path):
    a = write(tmp_path / "a.jsonl", [{"key": k, "passed": k % 2 == 0} for k in range(12)])
    b = write(tmp_path / "b.jsonl", [{"key": k, "passed": True} for k in range(12)])
    out = cai_compare(a, b, "--strict")
    assert out.returncode == 1 and "not run: length rule" in out.stdout and "not run: truncation rate (A)" in out.stdout


def test_json_and_md_carry_the_paired_statistics(pair):
    a, b = pair(long_fails_cut=True)
    out = cai_compare(a, b, "--format", "json")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    c = res["comparison"]
    assert (c["n"], c["a_only_pass"], c["b_only_pass"], c["diff_b_minus_a"]) == (20, 0, 10, 0.5)
    assert c["ci95"][0] <= 0.5 <= c["ci95"][1] and c["mcnemar_p"] == pytest.approx(2 / 2**10)
    assert c["mcnemar_p_holm"] == c["mcnemar_p"] and c["discordant_truncated_or_empty"] == 10
    assert res["scores"]["A"]["length_rule"]["warning"] and res["scores"]["A"]["n_truncated"] == 10
    assert res["clustering"]["n_clusters"] == 20 and res["warnings"]
    md = cai_compare(a, b, "--format", "md")
    assert md.returncode == 0
    assert "| diff (B − A) | 95% cluster CI | McNemar p | Holm p | A only | B only | N |" in md.stdout
    assert f"| +0.500 | [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] | {c['mcnemar_p']:.3g} |" in md.stdout
    assert "## Warnings" in md.stdout and "- warning: truncated (A)" in md.stdout


def test_items_give_the_template_clusters(pair, tmp_path):
    a, b = pair(long_fails_cut=False)
    items = write(tmp_path / "items.jsonl", [
        {"key": f"item-{k}", "prompt": f"Describe the sea ({k}).", "instruction_id_list": [iid], "kwargs": [{}]}
        for k, iid in enumerate(["punctuation:no_comma", "change_case:english_lowercase"] * 10)])
    res = json.loads(cai_compare(a, b, "--items", items, "--format", "json").stdout)
    assert res["clustering"]["n_clusters"] == 2 and res["scores"]["A"]["n_clusters"] == 2
    assert str(items) in res["clustering"]["by"]


BAD = {
    "missing key": ([{"passed": True}], "a.jsonl:1: missing field 'key'"),
    "non-boolean passed": ([{"key": 1, "passed": "yes"}], "a.jsonl:1: 'passed' must be true or false, got \"yes\""),
    "malformed JSON": (['{"key": 1, "passed": true}', '{"key": 2, "passed": tr'], "a.jsonl:2: invalid JSON"),
    "mixed verdicts and responses": ([{"key": 1, "passed": True}, {"key": 2, "response": "x"}],
                                     "a.jsonl:2: lacks 'passed', unlike line 1"),
    "duplicate key": ([{"key": 1, "passed": True}, {"key": 1, "passed": False}], "a.jsonl:2: duplicate key 1"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_exit_2_with_one_line(case, tmp_path):
    rows, message = BAD[case]
    a = write(tmp_path / "a.jsonl", rows)
    b = write(tmp_path / "b.jsonl", [{"key": 1, "passed": True}, {"key": 2, "passed": True}])
    out = cai_compare(a, b)
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("cai compare: error: ") and message in out.stderr


def test_unmatched_keys_and_unknown_items_are_bad_input(tmp_path):
    a = write(tmp_path / "a.jsonl", [{"key": k, "passed": True} for k in (1, 2, 3)])
    b = write(tmp_path / "b.jsonl", [{"key": k, "passed": True} for k in (1, 2, 4)])
    out = cai_compare(a, b)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "do not cover the same keys: 1 only in" in out.stderr and "(e.g. 3)" in out.stderr and "(e.g. 4)" in out.stderr
    items = write(tmp_path / "items.jsonl", [{"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"],
                                             "kwargs": [{}]}])
    out = cai_compare(a, a, "--items", items)
    assert out.returncode == 2 and "a.jsonl:2: key 2 is not among the items" in out.stderr
    assert cai_compare(a, tmp_path / "nope.jsonl").returncode == 2


def test_cai_eval_records_are_scored_and_match_the_run_report(tmp_path):
    """Eval records (no `passed`) are scored by the canonical scorer against the shipped
    stage1 set; the comparison is the one `summarize` computes for a run: same functions,
    same numbers."""
    wanted = {("change_case:english_lowercase",), ("punctuation:no_comma",)}
    items = [it for it in load_eval_set("stage1") if tuple(it["instruction_id_list"]) in wanted]
    said = {"base": lambda i: SHORT if i % 4 == 0 else "A Calm, Grey Day.", "sft": lambda i: SHORT if i % 2 == 0 else ""}
    rows = [{"id": f"primary/{m}/stage1/{it['key']}", "suite": "primary", "model": m, "eval_set": "stage1",
             "key": it["key"], "instruction": it["instruction"], "response": f(i), "stop_reason": "eos"}
            for m, f in said.items() for i, it in enumerate(items)]
    a = write(tmp_path / "base.jsonl", [r for r in rows if r["model"] == "base"])
    b = write(tmp_path / "sft.jsonl", [r for r in rows if r["model"] == "sft"])
    out = cai_compare(a, b, "--format", "json")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert "scored by the canonical scorer" in res["how"]["A"]
    run = summarize(RunConfig.model_validate({"name": "t", "model": {"source": "tiny-random"}}), items, rows)
    want = next(c for c in run["comparisons"] if (c["a"], c["b"]) == ("base", "sft"))
    got = res["comparison"]
    for field in ("n", "n_clusters", "diff_b_minus_a", "ci95", "mcnemar_p", "a_only_pass", "b_only_pass",
                  "discordant_truncated_or_empty"):
        assert got[field] == want[field], field
    for field in ("prompt_level_strict", "prompt_level_strict_ci", "instruction_level_strict_ci", "n_empty", "refusal_rule"):
        assert res["scores"]["B"][field] == run["scores"]["primary"]["sft"][field], field
    assert res["scores"]["B"]["n_empty"] == 10 and any(w.startswith("empty (B)") for w in res["warnings"])
    assert cai_compare(a, b, "--strict").returncode == 1
