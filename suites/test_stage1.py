"""The Stage-1 comparison: base vs SFT vs DPO on identical prompts, one canonical metric."""

import pytest

from cai.invariants import FormatMatchesTraining, PromptFormatParity, PromptsIdenticalAcrossModels, Result, Severity, Status
from cai.pipeline.compare import CEILING, SUITE_MODELS

pytestmark = pytest.mark.stage("eval")


def _passed(results):
    return [r for r in results if r.status == Status.FAIL] == []


def test_models_get_byte_identical_prompts(eval_records, cai_gate):
    assert _passed(cai_gate.check([PromptsIdenticalAcrossModels()], eval_records, subject="eval"))


def test_primary_suite_uses_the_training_format(eval_records, cai_config, cai_gate):
    checks = [PromptFormatParity(), FormatMatchesTraining(cai_config.format)]
    assert _passed(cai_gate.check(checks, eval_records, subject="eval"))
    assert {r["format"] for r in eval_records if r["suite"] == "primary"} == {cai_config.eval.format or cai_config.format}


def test_every_model_answered_every_item(eval_records, eval_items):
    keys = {it["key"] for it in eval_items}
    for suite in {r["suite"] for r in eval_records}:
        for model in SUITE_MODELS[suite]:
            got = {r["key"] for r in eval_records if r["suite"] == suite and r["model"] == model}
            assert got == keys, f"{suite}/{model}: {len(keys - got)} item(s) without a response"


def test_scores_and_intervals_are_consistent(results):
    for suite, models in results["scores"].items():
        for model, s in models.items():
            lo, hi = s["prompt_level_strict_ci"]
            assert 0 <= lo <= s["prompt_level_strict"] <= hi <= 1, (suite, model)
            assert s["prompt_level_strict"] <= s["prompt_level_loose"] + 1e-12


def test_paired_comparisons_account_for_every_discordant_item(results):
    assert results["comparisons"], "no model pairs to compare"
    for c in results["comparisons"]:
        assert len(c["discordant"]) == c["a_only_pass"] + c["b_only_pass"]
        assert c["ci95"][0] <= c["diff_b_minus_a"] <= c["ci95"][1]
        assert 0.0 <= c["mcnemar_p"] <= 1.0
        assert c["diff_b_minus_a"] == pytest.approx((c["b_only_pass"] - c["a_only_pass"]) / c["n"])


def test_scoring_artifact_diagnostics(results, cai_gate):
    """Warnings, not failures: a base model at the ceiling, or pass/fail tracking length."""
    base = results["scores"].get("primary", {}).get("base")
    if base is not None:
        at_ceiling = base["prompt_level_strict"] >= CEILING
        cai_gate.record(Result("base_below_ceiling", Status.WARN if at_ceiling else Status.PASS, Severity.WARN,
                               f"base scores {base['prompt_level_strict']:.3f} under the training format "
                               f"(ceiling warning at {CEILING})"), subject="eval")
    for suite, models in results["scores"].items():
        for model, s in models.items():
            lc = s["length_confound"]
            cai_gate.record(Result("no_length_confound", Status.WARN if lc["warning"] else Status.PASS, Severity.WARN,
                                   f"{suite}/{model}: corr(pass, chars) = {lc['corr']} over {lc['n']} items "
                                   "without a length constraint"), subject=f"eval/{suite}/{model}")
