"""The Stage-1 comparison: base vs SFT vs DPO on identical prompts, one canonical metric."""

import pytest

from cai.invariants import FormatMatchesTraining, PromptFormatParity, PromptsIdenticalAcrossModels, Result, Severity, Status
from cai.invariants.artifacts import expected_eval_keys
from cai.pipeline.compare import ARTIFACT_RATE, CEILING

pytestmark = pytest.mark.stage("eval")


def _passed(results):
    return [r for r in results if r.status == Status.FAIL] == []


def test_models_get_byte_identical_prompts(eval_records, cai_gate):
    assert _passed(cai_gate.check([PromptsIdenticalAcrossModels()], eval_records, subject="eval"))


def test_primary_suite_uses_the_training_format(eval_records, cai_config, cai_gate):
    checks = [PromptFormatParity(), FormatMatchesTraining(cai_config.format)]
    assert _passed(cai_gate.check(checks, eval_records, subject="eval"))
    assert {r["format"] for r in eval_records if r["suite"] == "primary"} == {cai_config.eval.format or cai_config.format}


def test_every_score_and_comparison_covers_every_configured_item(results, cai_config):
    """Coverage of the records is an invariant (eval_coverage); this checks the scoring kept
    all of them: an item lost or merged between records and scores (two eval sets sharing
    keys, a response that failed to parse) would shrink N."""
    expected = sum(len(keys) for keys in expected_eval_keys(cai_config).values())
    for suite, models in results["scores"].items():
        for model, s in models.items():
            assert s["n"] == expected, f"{suite}/{model}: scored {s['n']} of {expected} configured items"
    assert results["comparisons"], "no model pairs were compared"
    for c in results["comparisons"]:
        assert c["n"] == expected, f"{c['suite']} {c['a']} vs {c['b']}: compared on {c['n']} of {expected} items"


def test_scoring_artifact_diagnostics(results, cai_gate):
    """Warnings, not failures: a base model at the ceiling in any suite, pass/fail tracking
    length, responses cut at the token cap or empty, few-shot prompting beating training."""
    for suite, models in results["scores"].items():
        base = models.get("base")
        if base is not None:
            at_ceiling = base["prompt_level_strict"] >= CEILING
            cai_gate.record(Result("base_below_ceiling", Status.WARN if at_ceiling else Status.PASS, Severity.WARN,
                                   f"{suite}: base scores {base['prompt_level_strict']:.3f} "
                                   f"(ceiling warning at {CEILING})"), subject=f"eval/{suite}/base")
    for c in results["comparisons"]:
        if c["kind"] == "prompting":
            worse = c["diff_b_minus_a"] < 0
            cai_gate.record(Result("training_beats_prompting", Status.WARN if worse else Status.PASS, Severity.WARN,
                                   c["sentence"]), subject=f"eval/{c['b_suite']}/{c['b']}")
    for suite, models in results["scores"].items():
        for model, s in models.items():
            over = s["truncated_rate"] > ARTIFACT_RATE or s["empty_rate"] > ARTIFACT_RATE
            cai_gate.record(Result("responses_not_cut", Status.WARN if over else Status.PASS, Severity.WARN,
                                   f"{suite}/{model}: {s['n_truncated']} of {s['n']} hit max_new_tokens, {s['n_empty']} "
                                   f"empty (warning above {ARTIFACT_RATE:.0%})"), subject=f"eval/{suite}/{model}")
            lr = s["length_rule"]
            cai_gate.record(Result("length_does_not_decide", Status.WARN if lr["warning"] else Status.PASS, Severity.WARN,
                                   f"{suite}/{model}: best length rule ({lr.get('rule', 'n/a')}) matches {lr['accuracy']} "
                                   f"of {lr['n']} verdicts, majority guess {lr['majority']}"), subject=f"eval/{suite}/{model}")
            rr = s["refusal_rule"]
            cai_gate.record(Result("refusal_does_not_decide", Status.WARN if rr["warning"] else Status.PASS, Severity.WARN,
                                   f"{suite}/{model}: 'empty or refusal' ({rr['n_flagged']} of {rr['n']}) rule "
                                   f"({rr.get('rule', 'n/a')}) matches {rr['accuracy']}, majority guess {rr['majority']}"),
                            subject=f"eval/{suite}/{model}")
            lc = s["length_confound"]
            cai_gate.record(Result("no_length_confound", Status.WARN if lc["warning"] else Status.PASS, Severity.WARN,
                                   f"{suite}/{model}: corr(pass, chars) = {lc['corr']} over {lc['n']} items "
                                   "without a length constraint"), subject=f"eval/{suite}/{model}")
