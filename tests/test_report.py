"""Evaluation results and the run report: clustered CIs, Holm over every comparison,
training vs prompting, truncation rates, and a report that leads with the verdict.

Responses are scored by the real IFEval checkers on items of the shipped Stage-1 set;
the report is built from real artifact directories written by the store."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from cai.config import RunConfig
from cai.harness.report import established, _clip, build_report
from cai.pipeline.compare import cluster_of, load_eval_set, summarize
from cai.pipeline.stats import holm, paired_bootstrap_ci

PASS, FAIL = "a calm day by the sea.", "A Calm, Grey Day."  # pass / fail both lowercase and no-comma items


@pytest.fixture(scope="module")
def items():
    wanted = {("change_case:english_lowercase",), ("punctuation:no_comma",)}
    return [it for it in load_eval_set("stage1") if tuple(it["instruction_id_list"]) in wanted]


@pytest.fixture(scope="module")
def cfg():
    return RunConfig.model_validate({"name": "t", "model": {"source": "tiny-random"}, "eval": {"bootstrap_resamples": 2000}})


def _responses(items, suite, model, passes, stop=lambda i, ok: "eos"):
    return [{"suite": suite, "model": model, "eval_set": it["eval_set"], "key": it["key"], "response": PASS if passes(i) else FAIL,
             "stop_reason": stop(i, passes(i))} for i, it in enumerate(items)]


def _run(items, cfg, *, fewshot_passes, sft_stop=lambda i, ok: "eos", sft_empty=False):
    rows = (_responses(items, "primary", "base", lambda i: i % 4 == 0)
            + _responses(items, "primary", "sft", lambda i: i % 2 == 0, sft_stop)
            + _responses(items, "primary", "dpo", lambda i: i % 2 == 0)
            + _responses(items, "fewshot_baseline", "base", fewshot_passes))
    if sft_empty:
        for r in rows:
            if r["model"] == "sft" and r["response"] == FAIL:
                r["response"] = ""
    return summarize(cfg, items, rows)


def test_scores_carry_n_clusters_and_clustered_cis(items, cfg):
    res = _run(items, cfg, fewshot_passes=lambda i: False)
    assert res["clustering"]["n_clusters"] == 2
    sft = res["scores"]["primary"]["sft"]
    assert sft["n"] == 20 and sft["n_clusters"] == 2 and sft["n_instructions"] == 20
    assert sft["prompt_level_strict"] == 0.5
    lo, hi = sft["prompt_level_strict_ci"]
    assert lo <= 0.5 <= hi
    assert all("strict_ci" in v and v["n"] == 10 for v in sft["per_instruction"].values())
    c = next(c for c in res["comparisons"] if (c["suite"], c["a"], c["b"]) == ("primary", "base", "sft"))
    keys = sorted((it["key"] for it in items), key=str)
    by_key = {it["key"]: it for it in items}
    order = {it["key"]: i for i, it in enumerate(items)}
    xa = [int(order[k] % 4 == 0) for k in keys]
    xb = [int(order[k] % 2 == 0) for k in keys]
    expected = paired_bootstrap_ci(xb, xa, n_resamples=2000, seed=cfg.seed, clusters=[cluster_of(by_key[k]) for k in keys])
    assert (c["diff_b_minus_a"], *c["ci95"]) == pytest.approx(expected)
    assert c["n_clusters"] == 2


def test_holm_covers_every_comparison_and_training_vs_prompting_is_asked(items, cfg):
    res = _run(items, cfg, fewshot_passes=lambda i: False)
    kinds = [(c["a_suite"], c["a"], c["b_suite"], c["b"]) for c in res["comparisons"]]
    assert ("fewshot_baseline", "base", "primary", "sft") in kinds
    assert ("fewshot_baseline", "base", "primary", "dpo") in kinds
    assert [c["mcnemar_p_holm"] for c in res["comparisons"]] == holm([c["mcnemar_p"] for c in res["comparisons"]])
    assert str(len(res["comparisons"])) in res["multiplicity"]
    assert all(c["sentence"].endswith(".") for c in res["comparisons"])
    assert not any("prompting beats training" in w for w in res["warnings"])  # control: few-shot base fails all


def test_warns_when_few_shot_base_beats_a_trained_model(items, cfg):
    res = _run(items, cfg, fewshot_passes=lambda i: i % 5 != 0)  # 16 of 20 vs SFT / DPO 10 of 20
    hits = [w for w in res["warnings"] if w.startswith("prompting beats training")]
    assert len(hits) == 2 and any("sft" in w for w in hits) and any("dpo" in w for w in hits)


def test_truncation_and_empty_rates_warn_above_ten_percent(items, cfg):
    quiet = _run(items, cfg, fewshot_passes=lambda i: False)
    s = quiet["scores"]["primary"]["sft"]
    assert (s["n_truncated"], s["truncated_rate"], s["n_empty"], s["empty_rate"]) == (0, 0.0, 0, 0.0)
    assert not any(w.startswith(("truncated", "empty", "truncation-driven")) for w in quiet["warnings"])

    cut = _run(items, cfg, fewshot_passes=lambda i: False, sft_stop=lambda i, ok: "eos" if ok else "length", sft_empty=True)
    s = cut["scores"]["primary"]["sft"]
    assert (s["n_truncated"], s["truncated_rate"], s["n_empty"], s["empty_rate"]) == (10, 0.5, 10, 0.5)
    assert any(w.startswith("truncated (primary/sft)") for w in cut["warnings"])
    assert any(w.startswith("empty (primary/sft)") for w in cut["warnings"])
    # SFT's cut failures are on items base fails too: they decide no comparison
    c = next(c for c in cut["comparisons"] if (c["suite"], c["a"], c["b"]) == ("primary", "base", "sft"))
    assert c["discordant_truncated_or_empty"] == 0  # base fails where SFT passes: nothing cut
    assert not any(w.startswith("truncation-driven (primary base vs sft)") for w in cut["warnings"])
    c = next(c for c in cut["comparisons"] if (c["suite"], c["a"], c["b"]) == ("primary", "sft", "dpo"))
    assert c["discordant"] == []


def test_truncation_driven_discordance_is_warned(items, cfg):
    rows = (_responses(items, "primary", "base", lambda i: True, lambda i, ok: "eos")
            + _responses(items, "primary", "sft", lambda i: i % 2 == 0, lambda i, ok: "eos" if ok else "length"))
    res = summarize(cfg, items, rows)
    c = next(c for c in res["comparisons"] if (c["a"], c["b"]) == ("base", "sft"))
    assert c["discordant_truncated_or_empty"] == len(c["discordant"]) == 10
    assert any(w.startswith("truncation-driven (primary base vs sft)") for w in res["warnings"])


def _write_set(path: Path, prompt: str, iid: str) -> str:
    import json

    path.write_text("".join(json.dumps({"key": k, "prompt": f"{prompt} (item {k})", "instruction_id_list": [iid],
                                        "kwargs": [{}]}) + "\n" for k in range(6)))
    return str(path)


def test_two_eval_sets_sharing_keys_are_scored_separately(tmp_path, cfg):
    """Keys are unique within a set only: items are (set, key). Both sets use keys 0-5; a
    response that passes the lowercase set and fails the no-comma set scores 6 of 12."""
    lower = _write_set(tmp_path / "lower.jsonl", "Describe the sea in one sentence, in lowercase.",
                       "change_case:english_lowercase")
    nocomma = _write_set(tmp_path / "nocomma.jsonl", "Describe the sea in one sentence without commas.",
                         "punctuation:no_comma")
    items = load_eval_set(lower) + load_eval_set(nocomma)
    said = {"base": "a calm, grey day by the sea.", "sft": "A calm grey day by the sea."}  # lowercase only / no comma only
    rows = [{"suite": "primary", "model": m, "eval_set": it["eval_set"], "key": it["key"], "response": text,
             "stop_reason": "eos"} for m, text in said.items() for it in items]
    res = summarize(cfg, items, rows)
    assert res["n_items"] == 12
    base, sft = res["scores"]["primary"]["base"], res["scores"]["primary"]["sft"]
    assert base["n"] == sft["n"] == 12 and base["prompt_level_strict"] == sft["prompt_level_strict"] == 0.5
    per = {m: {iid: (v["n"], v["strict"]) for iid, v in s["per_instruction"].items()} for m, s in (("base", base), ("sft", sft))}
    assert per["base"] == {"change_case:english_lowercase": (6, 1.0), "punctuation:no_comma": (6, 0.0)}
    assert per["sft"] == {"change_case:english_lowercase": (6, 0.0), "punctuation:no_comma": (6, 1.0)}
    c = next(c for c in res["comparisons"] if (c["a"], c["b"]) == ("base", "sft"))
    assert c["n"] == 12 and (c["a_only_pass"], c["b_only_pass"]) == (6, 6)
    assert sorted((d["eval_set"], d["key"]) for d in c["discordant"]) == sorted((s, k) for s in (lower, nocomma) for k in range(6))
    assert all(d["base_pass"] == (d["eval_set"] == lower) for d in c["discordant"])


@pytest.mark.parametrize("text,limit", [("word " * 100, 42), ("a" * 50 + " tail", 30), ("short | cell\nline", 300)])
def test_clip_never_cuts_mid_word(text, limit):
    out = _clip(text, limit)
    flat = " ".join(text.split()).replace("|", "\\|")
    if len(flat) <= limit:
        assert out == flat
    else:
        body = out.removesuffix(" …")
        assert out.endswith(" …") and len(body) <= limit
        assert flat.startswith(body) and (flat[len(body)] == " " or " " not in flat[:limit])


def _artifact(run: Path, stage: str, invariants, extra=None):
    from cai.invariants.base import Result, Severity, Status
    from cai.pipeline.store import ArtifactWriter

    w = ArtifactWriter(run / stage, stage, config_hash="x", seed=0, inputs=[])
    w.extend([{"id": "r0"}])
    w.finalize(invariants=[Result(n, Status(s), Severity(sev), ev) for n, s, sev, ev in invariants],
               model={"source": "tiny-random"}, extra=extra)


def _png(path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([1, 0.5])
    fig.savefig(path)
    plt.close(fig)


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    dpo_warn = ("training_truncation", "warn", "warning", "5 of 58 records exceed max_length=128")
    _artifact(run, "dpo", [("record_schema", "pass", "error", "ok"), dpo_warn])
    _png(run / "dpo" / "loss_curve.png")
    lm = {m: {"tasks": {"cai_stage1_gen": {"metrics": {"prompt_level_strict_acc": acc}, "n": 8}},
              "invariants": [{"name": "lmeval_prompt_parity", "status": "pass", "severity": "error", "evidence": "same"}]}
          for m, acc in (("base", 0.375), ("sft", 0.25), ("dpo", 0.5))}
    _artifact(run, "eval", [("lmeval_prompt_parity", "pass", "error", "same")] * 3, extra={"lm_eval": lm})
    return run


def _invariants(failing=False):
    rows = [{"where": "run", "name": "run_index_consistent", "status": "pass", "severity": "error", "evidence": "ok"},
            {"where": "eval/primary/sft", "name": "no_length_confound", "status": "pass", "severity": "warning", "evidence": "r=0.1"}]
    rows += [{"where": "eval", "name": "lmeval_prompt_parity[recorded]", "status": "pass", "severity": "error", "evidence": "same"}] * 3
    if failing:
        rows.append({"where": "sft", "name": "weights_as_declared", "status": "fail", "severity": "error", "evidence": "bad weights"})
    return rows


def test_report_leads_with_verdict_and_results_then_invariants(run_dir, items, cfg):
    results = _run(items, cfg, fewshot_passes=lambda i: i % 5 != 0)
    md = build_report(run_dir, _invariants(), results).read_text()
    lines = md.splitlines()
    assert lines[0].startswith("**VALID**") and "sft 0.500" in lines[0] and "N = 20" in lines[0]
    pos = {h: md.index(h) for h in ("## Results", "### Paired comparisons", "Holm", "### Did training beat prompting?",
                                    "## Warnings", "## Invariants", "## Provenance")}
    assert pos["## Results"] < pos["## Warnings"] < pos["## Invariants"] < pos["## Provenance"]
    # few-shot 0.8 vs sft 0.5 on 20 items: 8 vs 2 discordant, McNemar p = 0.11: a higher
    # point estimate, never called a win
    assert not any(established(c) for c in results["comparisons"] if c["kind"] == "prompting")
    assert "Few-shot base scores above sft and dpo, but no difference is established at this N" in md
    assert "**Few-shot base beats" not in md
    # per-type rows carry N and their cluster count; a one-cluster type is marked as item-resampled
    assert "| instruction | N | clusters | base | dpo | sft |" in md and "| punctuation:no_comma | 10 | 1 † | " in md
    # the training warning recorded in the dpo manifest reaches the Warnings section
    warnings = md[pos["## Warnings"]:md.index("\n## ", pos["## Warnings"] + 1)]
    assert "training_truncation" in warnings and "prompting beats training" in warnings
    # per-model rows name their model; the lm-eval table shows N and a sentence on direction
    inv = md[pos["## Invariants"]:]
    assert [m for m in ("base", "sft", "dpo") if f"| eval | {m} | `lmeval_prompt_parity[recorded]`" in inv] == ["base", "sft", "dpo"]
    assert "| eval | primary/sft | `no_length_confound`" in inv
    assert "| base | cai_stage1_gen | 8 | prompt_level_strict_acc | 0.375 |" in md
    assert "base → sft: lm-eval -0.125 on 8 items, cai +0.250 on 20 (OPPOSITE direction)" in md
    # images resolve relative to report.md
    report_dir = run_dir / "reports"
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert "../dpo/loss_curve.png" in links
    assert all(not os.path.isabs(link) and (report_dir / link).is_file() for link in links)
    html = (report_dir / "report.html").read_text()
    assert "<details open><summary>Failures and warnings" in html and "<details><summary>eval:" in html
    assert html.count("data:image/png;base64,") == len(links)
    assert (report_dir / "results.json").is_file()


def test_void_report_first_line_is_the_verdict_and_shows_no_results(run_dir, items, cfg):
    results = _run(items, cfg, fewshot_passes=lambda i: False)
    md = build_report(run_dir, _invariants(failing=True), results).read_text()
    assert md.splitlines()[0].startswith("**VOID**") and "weights_as_declared (sft)" in md.splitlines()[0]
    assert "## Results" not in md and not (run_dir / "reports" / "results.json").exists()
    inv = md[md.index("## Invariants"):]
    assert inv.index("weights_as_declared") < inv.index("run_index_consistent")  # failures first


def test_preflight_projection_prints_as_a_table(run_dir, cfg):
    from cai.audit.preflight import projection, projection_table

    p = projection(cfg, run_dir, sample=4, target=400)
    lines = projection_table(p)
    assert lines[0] == "| stage | items (rehearsal) | measured rate | projected hours at 400 |"
    assert all(line.startswith("|") and line.endswith("|") for line in lines)
    assert any(line.startswith("| dpo | 1 | ") and "s/step" in line for line in lines)
    assert any(line.startswith("| eval | 1 | ") and "not projected" in line for line in lines)
    assert lines[-1] == f"| **total** | | | **{p['projected_hours']['total']:.2f}** |"
    assert not any("{" in line for line in lines)


LONG_OK = "a calm day by the sea where the waves roll in and the gulls call over the quiet sand all morning."


def test_length_rule_fires_when_a_length_heuristic_decides_and_stays_quiet_otherwise(items, cfg):
    """The 81% -> 99.3% failure: every long correct answer of the base model failed (here:
    long answers carry a comma, short ones none). Length alone then predicts every verdict."""
    def rows(model, long_fails):
        out = []
        for i, it in enumerate(items):
            long = i % 2 == 0
            text = (LONG_OK.replace("waves", "Waves,") if long_fails else LONG_OK) if long else PASS
            out.append({"suite": "primary", "model": model, "eval_set": it["eval_set"], "key": it["key"], "response": text, "stop_reason": "eos"})
        return out

    bad = summarize(cfg, items, rows("base", long_fails=True))["scores"]["primary"]["base"]["length_rule"]
    assert bad["accuracy"] == 1.0 and bad["majority"] == 0.5 and bad["warning"]
    assert bad["rule"].startswith("pass iff < ")

    def failing(text):  # same length, fails both checks: a capital and a comma
        return text[0].upper() + text[1:-1] + ","

    mixed = [{"suite": "primary", "model": "base", "eval_set": it["eval_set"], "key": it["key"], "stop_reason": "eos",
              "response": [PASS, failing(PASS), LONG_OK, failing(LONG_OK)][i % 4]} for i, it in enumerate(items)]
    res = summarize(cfg, items, mixed)
    quiet = res["scores"]["primary"]["base"]["length_rule"]
    assert quiet["accuracy"] - quiet["majority"] < 0.25 and not quiet["warning"]
    assert not any(w.startswith("length predicts the verdict") for w in res["warnings"])


def _warnings_section(md: str) -> str:
    start = md.index("## Warnings")
    return md[start:md.index("\n## ", start + 1)]


def test_each_warning_is_listed_once(run_dir, items, cfg):
    """The suite's warning rows restate the results' warnings (truncation, prompting beats
    training): the Warnings section shows the results' sentence once, and keeps warning
    rows the results do not state. In a VOID report (no results shown) the rows remain."""
    results = _run(items, cfg, fewshot_passes=lambda i: i % 5 != 0, sft_stop=lambda i, ok: "eos" if ok else "length")
    assert sum(w.startswith("truncated (primary/sft)") for w in results["warnings"]) == 1
    rows = _invariants() + [
        {"where": "eval/primary/sft", "name": "responses_not_cut", "status": "warn", "severity": "warning",
         "evidence": "primary/sft: 10 of 20 hit max_new_tokens, 0 empty (warning above 10%)"},
        {"where": "eval/primary/sft", "name": "training_beats_prompting[recorded]", "status": "warn", "severity": "warning",
         "evidence": "sft (primary) vs base (fewshot_baseline) sft is worse"},
        {"where": "instructions", "name": "near_duplicates", "status": "warn", "severity": "warning", "evidence": "3 pairs"}]
    warnings = _warnings_section(build_report(run_dir, rows, results).read_text())
    lines = [ln for ln in warnings.splitlines() if ln.startswith("- ")]
    assert len(lines) == len(set(lines))
    assert sum("truncated (primary/sft)" in ln for ln in lines) == 1 and "responses_not_cut" not in warnings
    assert sum(ln.startswith("- prompting beats training") for ln in lines) == 2 and "training_beats_prompting" not in warnings
    assert "`near_duplicates` — 3 pairs" in warnings and "training_truncation" in warnings

    void = _warnings_section(build_report(run_dir, _invariants(failing=True) + rows[-3:], results).read_text())
    assert "responses_not_cut" in void and "training_beats_prompting" in void and "truncated (primary/sft)" not in void


def test_prompting_is_said_to_beat_training_only_when_established(run_dir, items, cfg):
    """Few-shot base passes all 20 items where sft and dpo pass 10: 10 vs 0 discordant, Holm p
    < 0.05, and both clusters agree, so the report says prompting won."""
    results = _run(items, cfg, fewshot_passes=lambda i: True)
    assert all(established(c) for c in results["comparisons"] if c["kind"] == "prompting")
    md = build_report(run_dir, _invariants(), results).read_text()
    assert "**Few-shot base beats sft and dpo** (Holm-adjusted p < 0.05" in md
    assert "no difference is established at this N" not in md
