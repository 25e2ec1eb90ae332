"""The #16 rules beyond the fixtures' exact-match tests: documentation of every rule id, recall
and precision measured over every fixture, cross-file format parity naming the training site,
and the decisions of the scoring / sampling / orchestration rules on small variations."""

from __future__ import annotations

import textwrap
from pathlib import Path

from cai.audit.findings import RULES
from cai.audit.static import audit, render
from test_audit import CATEGORY_DIRS, FIX, REPO, expected, got


def measure() -> dict:
    """Recall and precision of `cai audit` over every fixture codebase (bad: the marked findings;
    good: none expected); run `python tests/test_audit_rules.py` to print them."""
    tp = fp = fn = 0
    for d in [*CATEGORY_DIRS.values(), "precision"]:
        for side in ("bad", "good"):
            root = FIX / d / side
            want, have = expected(root), got(audit([str(root)]))
            tp, fp, fn = tp + len(want & have), fp + len(have - want), fn + len(want - have)
    return {"expected": tp + fn, "found": tp + fp, "recall": tp / (tp + fn), "precision": tp / (tp + fp)}


def test_recall_and_precision_over_all_fixtures():
    m = measure()
    assert m["expected"] >= 60 and m["recall"] == 1.0 and m["precision"] == 1.0, m


def test_precision_cases():
    """Retry loops returning after a successful load, except-branch fallbacks, an explicit
    add_special_tokens=True, tokenizers that add no BOS/EOS: no finding (good); the same shapes
    where the hazard is real, and a template left set with no renderer (a latent warning): found."""
    for side in ("bad", "good"):
        root = FIX / "precision" / side
        result = audit([str(root)])
        assert got(result) == expected(root), render(result)


def test_one_finding_per_site_and_category():
    result = audit([str(FIX)])
    sites = [(f.path, f.line, f.column, f.category) for f in result.findings]
    assert len(sites) == len(set(sites))


def test_every_rule_id_is_documented_once():
    doc = (REPO / "docs" / "audit.md").read_text()
    for rule in RULES:
        assert doc.count(f"| `{rule}` |") == 1, rule


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(text))
    return root


def test_format_parity_across_files_names_the_training_site():
    result = audit([str(FIX / "format_parity" / "bad")])
    raw = [f for f in result.findings if f.path == "evaluate.py" and "raw instruction" in f.message]
    assert raw and all("data.py:5" in f.message for f in raw)


def test_scorer_reading_the_instruction_is_not_heuristic(tmp_path):
    root = write(
        tmp_path,
        {
            "judge.py": """
                def score(response, limit=500):
                    return len(response) < limit
                def score_checked(response, kwargs):
                    return len(response.split()) <= kwargs["num_words"]
                def score_refusal(output):
                    return not any(w in output.lower() for w in ["sorry", "i cannot"])
                def helper(response):
                    return len(response) > 500
                """
        },
    )
    found = {(f.rule, f.line) for f in audit([str(root)], select=["scoring"]).findings}
    # the default threshold is a length cut-off; a kwargs-driven count checks the instruction;
    # a function not named as a scorer is not judged
    assert found == {("heuristic-scoring", 2), ("heuristic-scoring", 6)}


def test_heuristic_scorer_becomes_an_error_only_when_tested(tmp_path):
    files = {
        "judge.py": "def is_correct(response):\n    return len(response) <= 500\n",
        "compare.py": "from judge import is_correct\nprint([is_correct(r) for r in ['a']])\n",
    }
    assert {f.rule for f in audit([str(write(tmp_path / "a", files))]).findings} == {"heuristic-scoring"}
    files["compare.py"] = (
        "from scipy.stats import binomtest\nfrom judge import is_correct\n"
        "v = [is_correct(r) for r in ['a']]\nprint(binomtest(sum(v), len(v)))\n"
    )
    assert {f.rule for f in audit([str(write(tmp_path / "b", files))]).findings} == {"heuristic-scoring-decides"}


def test_sampling_outside_evaluation_and_seeded_through_an_import(tmp_path):
    root = write(
        tmp_path,
        {
            "gen_data.py": "def sample(m, ids):\n    return m.generate(**ids, do_sample=True)\n",
            "eval_a.py": "import seeds\ndef run(m, ids):\n    return m.generate(**ids, do_sample=True)\n",
            "seeds.py": "import torch\ndef setup():\n    torch.manual_seed(0)\n",
            "eval_b.py": "def run(m, ids):\n    return m.generate(**ids, temperature=0.7)\n",
        },
    )
    found = {(f.rule, f.path) for f in audit([str(root)], select=["reproducibility"]).findings}
    assert found == {("unseeded-sampling", "eval_b.py")}


def test_duplicates_are_one_finding_per_group_and_renaming_does_not_hide_them(tmp_path):
    body = (FIX / "orchestration" / "bad" / "train_dpo.py").read_text().replace("  # expect: duplicate-entry-points", "")
    files = {
        "train_a.py": body,
        "train_b.py": body.replace("def main", "def run").replace("main(sys", "run(sys").replace("0.1", "0.2"),
        "train_c.py": body.replace("tok", "tokenizer"),
    }
    (f,) = audit([str(write(tmp_path, files))], select=["duplicate-entry-points"]).findings
    assert f.path == "train_a.py" and "train_b.py" in f.message and "train_c.py" in f.message
    (tmp_path / "train_b.py").write_text('"""Ablation: beta 0.2."""\n' + files["train_b.py"])
    (f,) = audit([str(tmp_path)], select=["duplicate-entry-points"]).findings
    assert "train_b.py" not in f.message


def test_dangling_script_in_a_makefile(tmp_path):
    root = write(
        tmp_path,
        {"train.py": "print('x')\n", "Makefile": "all:\n\tpython train.py\n\tpython eval.py --n 3\n"},
    )
    (f,) = audit([str(root)]).findings
    assert (f.rule, f.path, f.line) == ("dangling-reference", "Makefile", 3) and f.fingerprint


if __name__ == "__main__":
    import time

    print(measure())
    t = time.perf_counter()
    result = audit([str(FIX)])
    print(f"cai audit tests/fixtures/audit: {len(result.findings)} findings in {result.files} files, "
          f"{time.perf_counter() - t:.2f} s")
    print(render(result, statistics=True).splitlines()[-1])
