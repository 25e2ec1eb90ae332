"""`cai audit`: every rule against its good and bad fixture codebases, output formats, exit
codes through the real CLI, resilience to unparsable and generated code.

Expected findings live in the fixtures themselves: a `# expect: RULE[, RULE]` comment on the
line where the finding must be reported. A bad fixture must yield exactly its marked findings
(recall and precision), a good fixture none at all.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cai.audit.findings import CATEGORIES, RULES
from cai.audit.static import audit, render, sarif
from cai.errors import BadInputError

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "audit"
CATEGORY_DIRS = {
    "chat-template": "chat_template",
    "special-tokens": "special_tokens",
    "memory-sequencing": "memory_sequencing",
    "format-parity": "format_parity",
    "unused-implementation": "unused_implementation",
    "remote-code": "remote_code",
    "config-drift": "config_drift",
    "scoring": "scoring",
    "data-overlap": "data_overlap",
    "orchestration": "orchestration",
    "reproducibility": "reproducibility",
}
MARK = re.compile(r"#\s*expect:\s*([a-z0-9\-, ]+)")


def expected(root: Path) -> set[tuple[str, str, int]]:
    out = set()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".sh")):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            m = MARK.search(line)
            if m:
                for rule in filter(None, (r.strip() for r in m.group(1).split(","))):
                    out.add((rule, path.relative_to(root).as_posix(), lineno))
    return out


def got(result) -> set[tuple[str, str, int]]:
    return {(f.rule, f.path, f.line) for f in result.findings}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "cai.cli", "audit", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=60
    )


# ---------------------------------------------------------------------- rules on fixtures
@pytest.mark.parametrize("category", CATEGORY_DIRS)
def test_bad_fixture_yields_exactly_the_marked_findings(category):
    root = FIX / CATEGORY_DIRS[category] / "bad"
    want = expected(root)
    assert want, f"{root} has no `# expect:` markers"
    assert {RULES[r].category for r, _, _ in want} == {category}
    result = audit([str(root)])
    assert got(result) == want, render(result)
    for f in result.findings:
        assert f.category == category and f.severity == RULES[f.rule].severity
        assert len(f.message) > 80  # what, why, how to fix


@pytest.mark.parametrize("category", CATEGORY_DIRS)
def test_good_fixture_yields_no_finding(category):
    result = audit([str(FIX / CATEGORY_DIRS[category] / "good")])
    assert result.findings == [], render(result)
    assert result.exit_code == 0


def test_every_rule_has_a_bad_fixture():
    marked = set()
    for d in CATEGORY_DIRS.values():
        marked |= {r for r, _, _ in expected(FIX / d / "bad")}
    marked |= {r for r, _, _ in expected(FIX / "precision" / "bad")}
    assert marked == set(RULES) - {"parse-error"}


def test_severities():
    by_category = {}
    for r in RULES.values():
        by_category.setdefault(r.category, set()).add(r.severity)
    assert by_category == {
        "chat-template": {"error", "warning"},  # a template left set with no renderer reachable is latent
        "memory-sequencing": {"error"},
        "format-parity": {"error"},
        "remote-code": {"error"},
        "special-tokens": {"warning"},
        "config-drift": {"warning"},
        "unused-implementation": {"warning"},
        "scoring": {"warning", "error"},  # an error only when the verdicts feed a test or a gate
        "data-overlap": {"error"},
        "orchestration": {"error", "warning"},  # a missing script fails; a duplicate may be deliberate
        "reproducibility": {"warning"},
        "audit": {"warning"},
    }
    assert set(by_category) == set(CATEGORIES)


def test_unparsable_file_is_a_warning_and_the_audit_goes_on():
    result = audit([str(FIX / "parse_error")])
    assert got(result) == {("parse-error", "broken.py", 1)} | expected(FIX / "parse_error")
    (pe,) = [f for f in result.findings if f.rule == "parse-error"]
    assert pe.severity == "warning" and pe.category == "audit" and "SyntaxError" in pe.message
    assert result.summary()["unparsed"] == 1 and result.summary()["files"] == 2


# ---------------------------------------------------------------------- resolution details
def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    return root


def test_safe_loader_reached_through_relative_import_and_reexport(tmp_path):
    write(tmp_path, {
        "proj/__init__.py": "from .loading import load_tokenizer\n",
        "proj/loading.py": """
            from transformers import AutoTokenizer

            def _disable(tok):
                tok.chat_template = None

            def load_tokenizer(path):
                tok = AutoTokenizer.from_pretrained(path)
                _disable(tok)
                return tok, {"chat_template": None}
        """,
        "proj/stage.py": """
            from proj import load_tokenizer

            def run(path, prompt):
                tok, _meta = load_tokenizer(path)
                return tok(prompt, add_special_tokens=False)
        """,
        "main.py": "from proj.stage import run\n\nif __name__ == '__main__':\n    run('m', 'p')\n",
    })
    assert audit([str(tmp_path)]).findings == []


def test_unsafe_loader_without_callers_and_module_level_tokenizer(tmp_path):
    write(tmp_path, {
        "lib.py": """
            from transformers import AutoTokenizer

            def load(path):
                return AutoTokenizer.from_pretrained(path)
        """,
        "script.py": """
            from transformers import AutoTokenizer
            import lib

            TOK = AutoTokenizer.from_pretrained("m")

            def encode(text):
                return TOK(text, add_special_tokens=False)

            if __name__ == "__main__":
                print(lib, encode("x"))
        """,
    })
    # nothing renders templates: the hazard is latent, a warning that says so
    result = audit([str(tmp_path)])
    assert got(result) == {("chat-template-latent", "lib.py", 5), ("chat-template-latent", "script.py", 5)}
    for f in result.findings:
        assert "latent" in f.message and "`tokenizer(text)` itself never applies one" in f.message
    # once something renders templates (lm-eval with apply_chat_template) it is an error naming it
    (tmp_path / "bench.py").write_text(
        "import lm_eval\n\nif __name__ == '__main__':\n"
        "    lm_eval.simple_evaluate(model='hf', tasks=['ifeval'], apply_chat_template=True)\n"
    )
    result = audit([str(tmp_path)])
    assert got(result) == {("chat-template-not-disabled", "lib.py", 5), ("chat-template-not-disabled", "script.py", 5)}
    assert all("bench.py:4" in f.message for f in result.findings)


# ---------------------------------------------------------------------- recall patterns (#16)
def test_project_loader_class_is_a_load_kept_on_self_and_in_dicts():
    """`ModelLoader(name).load()`, `self.loader.load()` and `loader.load()` return from_pretrained
    results: three loads in one method with nothing released are two findings, named by the wrapper."""
    result = audit([str(FIX / "memory_sequencing" / "bad" / "judge_compare.py")])
    assert got(result) == {
        ("model-load-while-resident", "judge_compare.py", 36),
        ("model-load-while-resident", "judge_compare.py", 39),
    }
    assert all("ModelLoader.load()" in f.message for f in result.findings)
    assert "self.base" in result.findings[0].message
    assert audit([str(FIX / "memory_sequencing" / "good" / "judge_compare.py")]).findings == []


def test_tokenizer_attribute_set_in_another_method_is_encoding():
    result = audit([str(FIX / "special_tokens" / "bad" / "scorer.py")])
    assert got(result) == {
        ("special-tokens-default", "scorer.py", 20),  # self.tokenizer(...) set in __init__
        ("special-tokens-default", "scorer.py", 25),  # self.enc(...) set in setup()
        ("special-tokens-default", "scorer.py", 26),  # self.enc.encode(...)
    }
    assert audit([str(FIX / "special_tokens" / "good" / "scorer.py")]).findings == []


def test_prompt_traced_through_reassignment_and_wrapper_arguments():
    result = audit([str(FIX / "format_parity" / "bad")])
    wrapper = {f.line: f for f in result.findings if f.path == "eval_wrapper.py"}
    assert set(wrapper) == {29, 36}
    assert "`self.loader.generate(...)`" in wrapper[29].message and "the `instruction` field" in wrapper[29].message
    assert "(`instruction`)" in wrapper[36].message  # inputs = tok(instruction); inputs = inputs.to(device)


def test_conditional_reformat_leaves_the_prompt_undecided(tmp_path):
    """Only a definite mismatch is reported: a reassignment on one branch keeps both values reaching."""
    write(tmp_path, {
        "data.py": "def build(x):\n    return {'prompt': f'Instruction: {x}\\nResponse:'}\n",
        "evaluate.py": """
            from data import build

            def run(model, tok, instruction, formatted):
                prompt = instruction
                if formatted:
                    prompt = build(instruction)["prompt"]
                inputs = tok(prompt, return_tensors="pt", add_special_tokens=False)
                inputs = inputs.to("cuda")
                return model.generate(**inputs)

            def run_raw(model, tok, instruction):
                prompt = build(instruction)["prompt"]
                prompt = instruction
                return model.generate(**tok(prompt, return_tensors="pt", add_special_tokens=False))

            if __name__ == "__main__":
                run(None, None, "x", True)
        """,
    })
    assert got(audit([str(tmp_path)])) == {("eval-format-mismatch", "evaluate.py", 15)}


def test_values_resolved_through_defaults_name_their_source():
    """The wrapper's `load_in_4bit=True` default wins over the caller's `load_in_8bit=True`; the call
    counts as 4-bit for drift, so the 8-bit literal elsewhere is the odd one out."""
    result = audit([str(FIX / "config_drift" / "bad")])
    (override,) = [f for f in result.findings if f.rule == "quantization-default-override"]
    assert (override.path, override.line) == ("eval_judge.py", 6)
    assert "`load_in_4bit=True` (loaders.py:6)" in override.message and "gets 4-bit, not the 8-bit" in override.message
    (drift,) = [f for f in result.findings if f.rule == "quantization-drift"]
    assert drift.path == "train_dpo.py" and "4-bit at eval_judge.py:6" in drift.message
    remote = {f.line: f.message for f in audit([str(FIX / "remote_code" / "bad" / "wrapper.py")]).findings}
    assert set(remote) == {17, 24}
    assert "default `trust_remote_code=True` of HFLoader.__init__() (wrapper.py:6)" in remote[17]
    assert "1 call(s) leave in place (wrapper.py:28)" in remote[17]
    assert "nothing in the audited code calls it" in remote[24]


def test_several_paths_are_one_codebase(tmp_path):
    write(tmp_path, {
        "a/train.py": "from peft import LoraConfig\nif __name__ == '__main__':\n    LoraConfig(r=8)\n",
        "b/train2.py": "from peft import LoraConfig\nif __name__ == '__main__':\n    LoraConfig(r=8)\n",
        "b/train3.py": "from peft import LoraConfig\nif __name__ == '__main__':\n    LoraConfig(r=32)\n",
    })
    result = audit([str(tmp_path / "a"), str(tmp_path / "b" / "train2.py"), str(tmp_path / "b" / "train3.py")])
    assert result.root == tmp_path.resolve()
    assert got(result) == {("lora-rank-drift", "b/train3.py", 3)}


def test_default_excludes_skip_fixtures_and_venvs_below_the_root(tmp_path):
    write(tmp_path, {
        "tests/fixtures/bad.py": "import x\nx.load(trust_remote_code=True)\n",
        ".venv/lib/bad.py": "import x\nx.load(trust_remote_code=True)\n",
        "build/bad.py": "import x\nx.load(trust_remote_code=True)\n",
        "ok.py": "print('ok')\n",
    })
    result = audit([str(tmp_path)])
    assert result.files == 1 and result.findings == []
    assert len(audit([str(tmp_path / "tests" / "fixtures")]).findings) == 1  # explicit path: audited


def test_bad_input():
    with pytest.raises(BadInputError):
        audit(["/nonexistent/path/for/cai/audit"])
    with pytest.raises(BadInputError):
        audit([str(FIX / "README.md")])


def test_cai_itself_has_no_error_findings():
    result = audit([str(REPO)])
    errors = [f for f in result.findings if f.severity == "error"]
    assert errors == [], render(result)
    assert not any(f.path.startswith("tests/fixtures/") for f in result.findings)


# ---------------------------------------------------------------------- output formats
def test_json_shape():
    result = audit([str(FIX / "chat_template" / "bad")])
    doc = json.loads(render(result, "json"))
    assert set(doc) == {"findings", "suppressed", "summary"} and doc["suppressed"] == []
    assert len(doc["findings"]) == len(result.findings) > 0
    for f in doc["findings"]:
        assert {"rule", "category", "severity", "path", "line", "message", "fix", "fingerprint"} <= set(f)
        assert f["severity"] in ("error", "warning") and f["category"] in CATEGORIES
        assert isinstance(f["line"], int) and f["line"] >= 1 and not f["path"].startswith("/")
    s = doc["summary"]
    assert s["findings"] == len(doc["findings"]) == s["errors"] + s["warnings"]
    assert s["by_category"] == {"chat-template": len(doc["findings"])}
    assert s["exit_code"] == 1


def test_sarif_shape():
    result = audit([str(FIX / "config_drift" / "bad")])
    doc = sarif(result)
    assert doc["version"] == "2.1.0" and "sarif-2.1.0" in doc["$schema"]
    (run,) = doc["runs"]
    rules = run["tool"]["driver"]["rules"]
    assert [r["id"] for r in rules] == list(RULES)
    for r in rules:
        assert r["shortDescription"]["text"] and r["defaultConfiguration"]["level"] in ("error", "warning")
    assert len(run["results"]) == len(result.findings) == len(expected(FIX / "config_drift" / "bad"))
    for res, f in zip(run["results"], result.findings):
        assert res["ruleId"] == f.rule and rules[res["ruleIndex"]]["id"] == f.rule
        assert res["level"] == "warning" and res["message"]["text"] == f.message
        (loc,) = res["locations"]
        assert loc["physicalLocation"]["artifactLocation"]["uri"] == f.path
        assert loc["physicalLocation"]["region"]["startLine"] == f.line
    assert run["originalUriBaseIds"]["SRCROOT"]["uri"].startswith("file://")


# ---------------------------------------------------------------------- the real CLI
@pytest.mark.parametrize("category", CATEGORY_DIRS)
def test_cli_exit_code_on_bad_fixture(category):
    """1 when the fixture has an error-severity finding; warnings alone (special-tokens,
    config-drift, unused-implementation) exit 0."""
    bad = FIX / CATEGORY_DIRS[category] / "bad"
    has_error = any(RULES[r].severity == "error" for r, _, _ in expected(bad))
    proc = run_cli(str(bad))
    assert proc.returncode == (1 if has_error else 0), proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(expected(bad)) + 1 and lines[-1].startswith("cai audit:")


def test_cli_exit_code_0_on_all_good_fixtures_audited_together():
    proc = run_cli(*(str(FIX / d / "good") for d in CATEGORY_DIRS.values()), "--format", "json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["findings"] == [] and doc["summary"]["files"] >= 20


def test_cli_formats_and_bad_input():
    proc = run_cli(str(FIX / "remote_code" / "bad"), "--format", "sarif")
    assert proc.returncode == 1
    assert len(json.loads(proc.stdout)["runs"][0]["results"]) == len(expected(FIX / "remote_code" / "bad"))
    proc = run_cli("/nonexistent/path/for/cai/audit")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "no such file or directory" in proc.stderr
    proc = run_cli(str(FIX / "README.md"))
    assert proc.returncode == 2 and "no Python files" in proc.stderr


# ---------------------------------------------------------------------- never crashes
SNIPPETS = [
    "{v} = AutoTokenizer.from_pretrained('m')",
    "{v} = AutoModelForCausalLM.from_pretrained('m', trust_remote_code={b})",
    "{v}.chat_template = None",
    "del {v}",
    "{v} = None",
    "{v} = {w}",
    "{v}({w}, add_special_tokens={b})",
    "{v}.encode({w})",
    "{v}.apply_chat_template([{{'role': 'user', 'content': {w}}}])",
    "{v}[{w}] = load_model({w})",
    "{v}.append(AutoModelForCausalLM.from_pretrained({w}))",
    "{v} = [AutoModelForCausalLM.from_pretrained(n) for n in {w}]",
    "{v} = f'Instruction: {{{w}}}\\nResponse:'",
    "{v}.generate(**{w}({v}, return_tensors='pt'))",
    "{v} = pipeline('text-generation', model={w})",
    "{v} = {w}(instruction)",
    "return {v}, {w}",
    "{v}, {w} = load_model({v})",
    "{v} = LoraConfig(r={n})",
    "{v} = DPOConfig(beta={n})",
    "{v} = BitsAndBytesConfig(load_in_{n}bit=True)",
    "self.{v} = AutoModelForCausalLM.from_pretrained({w})",
    "setattr({v}, 'chat_template', None)",
    "{v} = {w}.to('cpu')",
]
NAMES = st.sampled_from(["tok", "tokenizer", "model", "base", "sft", "models", "pipe", "instruction", "x", "self.tok"])


@st.composite
def programs(draw):
    def stmt(depth):
        kind = draw(st.integers(0, 9 if depth < 3 else 5))
        if kind <= 5:
            s = draw(st.sampled_from(SNIPPETS)).format(
                v=draw(NAMES), w=draw(NAMES), b=draw(st.booleans()), n=draw(st.sampled_from([4, 8, 16, 0.1]))
            )
            return [s]
        head = {6: "for n in names:", 7: "if cond:", 8: "def f(tok, model, instruction):", 9: "class C:\n    def m(self, x):"}[kind]
        pad = "    " if kind != 9 else "        "
        body = [line for _ in range(draw(st.integers(1, 4))) for line in stmt(depth + 1)]
        return [head] + [pad + line for line in body]

    header = "from transformers import AutoTokenizer, AutoModelForCausalLM, pipeline\nfrom peft import LoraConfig\n"
    files = {}
    for i in range(draw(st.integers(1, 3))):
        lines = [line for _ in range(draw(st.integers(1, 8))) for line in stmt(0)]
        files[f"m{i}.py"] = header + f"from m{(i + 1) % 3} import load_model\n" + "\n".join(lines) + "\n"
    return files


def check_never_crashes(files: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory() as d:
        for name, text in files.items():
            Path(d, name).write_text(text)
        result = audit([d])
        json.loads(render(result, "json"))
        json.dumps(sarif(result))
        for f in result.findings:
            assert f.rule in RULES and f.line >= 1 and f.path in files


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs())
def test_audit_never_crashes_on_generated_programs(files):
    check_never_crashes(files)


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=300))
def test_audit_never_crashes_on_arbitrary_text(text):
    check_never_crashes({"any.py": text})
