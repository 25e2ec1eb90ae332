"""Prompt-format parity: hand-built prompts, raw evaluation while training used
instruction_response, and models scored on different prompts all fail."""

import pytest

from cai.invariants.base import Status
from cai.invariants.data import RecordSet
from cai.invariants.parity import FormatMatchesTraining, PromptFormatParity, PromptsIdenticalAcrossModels
from cai.pipeline import formats

TRAIN = "instruction_response"
INSTRUCTIONS = ["Name three colours.", "Write a haiku about rain.", "List two even numbers."]


def eval_rec(key, instruction, fmt, **extra):
    return {"key": key, "prompt": formats.render(fmt, instruction), "instruction": instruction, "format": fmt,
            "instruction_id_list": [], "kwargs": [], **extra}


def test_canonical_prompts_pass(sft_record):
    rs = RecordSet("sft", [sft_record(i, ins, " ok") for i, ins in enumerate(INSTRUCTIONS)])
    r = PromptFormatParity().check(rs)
    assert r.status == Status.PASS and "3/3" in r.evidence


@pytest.mark.parametrize("prompt", [
    "Instruction: Write a haiku about rain.\nResponse: ",      # trailing space
    "Instruction: Write a haiku about rain.\n\nResponse:",     # extra newline
    "### Instruction: Write a haiku about rain.\nResponse:",   # another family's header
    "Write a haiku about rain.",                                # raw, format still says instruction_response
])
def test_hand_built_prompt_fails(sft_record, prompt):
    recs = [sft_record(i, ins, " ok") for i, ins in enumerate(INSTRUCTIONS)]
    recs[1]["prompt"] = prompt
    r = PromptFormatParity().check(RecordSet("sft", recs))
    assert r.status == Status.FAIL and "'sft-1'" in r.evidence


def test_missing_format_fails_for_training_records(sft_record):
    rec = sft_record(0, "Hi.", " Hello.")
    del rec["format"]
    r = PromptFormatParity().check(RecordSet("sft", [rec]))
    assert r.status == Status.FAIL and "no format field" in r.evidence


def test_eval_source_set_without_format_is_counted_not_failed():
    items = [{"key": 1, "prompt": "Write a poem.", "instruction_id_list": [], "kwargs": []}]
    r = PromptFormatParity().check(RecordSet("eval", items))
    assert r.status == Status.PASS and "source set" in r.evidence


def test_raw_eval_while_training_used_instruction_response_fails():
    evals = RecordSet("eval", [eval_rec(i, ins, "raw") for i, ins in enumerate(INSTRUCTIONS)])
    assert PromptFormatParity().check(evals).status == Status.PASS  # prompts are canonical raw renderings...
    r = FormatMatchesTraining(TRAIN).check(evals)  # ...but not the training format
    assert r.status == Status.FAIL
    assert "format 'raw' outside any probe suite" in r.evidence and "0:" in r.evidence


def test_raw_format_allowed_only_in_a_probe_suite():
    evals = [eval_rec(i, ins, TRAIN, suite="primary") for i, ins in enumerate(INSTRUCTIONS)]
    evals += [eval_rec(10 + i, ins, "raw", suite="raw_probe") for i, ins in enumerate(INSTRUCTIONS)]
    r = FormatMatchesTraining(TRAIN).check(RecordSet("eval", evals))
    assert r.status == Status.PASS and "3 in probe suites" in r.evidence
    evals.append(eval_rec(99, "Say hi.", "raw", suite="primary"))
    r = FormatMatchesTraining(TRAIN).check(RecordSet("eval", evals))
    assert r.status == Status.FAIL and "99: format 'raw' in suite 'primary'" in r.evidence


def test_training_records_in_another_format_fail(sft_record):
    rec = sft_record(0, "Hi.", " Hello.")
    rec["format"], rec["prompt"] = "raw", "Hi."
    r = FormatMatchesTraining(TRAIN).check(RecordSet("sft", [rec]))
    assert r.status == Status.FAIL and "'sft-0'" in r.evidence


def test_fewshot_baseline_prompt_ends_with_the_canonical_prompt():
    prompt = formats.render_fewshot(TRAIN, [("Say one.", "One.")], "Say two.")
    rec = eval_rec(1, "Say two.", TRAIN, suite="fewshot_baseline", prompt=prompt)
    assert PromptFormatParity().check(RecordSet("eval", [rec])).status == Status.PASS
    rec["prompt"] = prompt.replace("Say two.", "Say three.")
    assert PromptFormatParity().check(RecordSet("eval", [rec])).status == Status.FAIL


# --------------------------------------------------------------------------- base vs trained


def test_identical_prompts_pass_and_hashes_are_reported():
    prompts = [formats.render(TRAIN, i) for i in INSTRUCTIONS]
    r = PromptsIdenticalAcrossModels().check({"base": prompts, "sft": list(prompts), "dpo": list(prompts)})
    assert r.status == Status.PASS and "base" in r.evidence and "dpo" in r.evidence


def test_model_given_different_prompts_fails():
    prompts = [formats.render(TRAIN, i) for i in INSTRUCTIONS]
    raw_for_base = list(prompts)
    raw_for_base[2] = INSTRUCTIONS[2]  # the audit's bug: base scored on raw instructions
    r = PromptsIdenticalAcrossModels().check({"sft": prompts, "base": raw_for_base})
    assert r.status == Status.FAIL and "base differs from sft at item 2" in r.evidence


def test_records_compared_per_suite_by_key():
    recs = []
    for model in ("base", "sft"):
        for suite, fmt in (("primary", TRAIN), ("raw_probe", "raw")):
            for k, ins in enumerate(INSTRUCTIONS):
                recs.append({"model": model, "suite": suite, "key": k, "prompt": formats.render(fmt, ins)})
    recs.reverse()  # order does not matter, keys do
    assert PromptsIdenticalAcrossModels().check(recs).status == Status.PASS
    recs[0] = dict(recs[0], prompt=recs[0]["prompt"] + " ")
    r = PromptsIdenticalAcrossModels().check(recs)
    assert r.status == Status.FAIL and "raw_probe" in r.evidence


def test_a_single_model_cannot_prove_parity():
    assert PromptsIdenticalAcrossModels().check({"base": ["x"]}).status == Status.FAIL


# --------------------------------------------------------------------------- evaluation outputs


def eval_outputs(models=("base", "sft", "dpo")):
    """Records shaped like the eval stage's: one per suite x model x item."""
    recs = []
    for suite, fmt in (("primary", TRAIN), ("raw_probe", "raw")):
        for model in models:
            for k, ins in enumerate(INSTRUCTIONS):
                recs.append({"id": f"{suite}/{model}/{k}", "suite": suite, "model": model, "key": k,
                             "eval_set": "stage1", "instruction": ins, "format": fmt,
                             "prompt": formats.render(fmt, ins), "response": "ok", "stop_reason": "eos"})
    return recs


def test_eval_outputs_group_passes_and_catches_raw_primary():
    from cai.invariants.base import all_passed, evaluate
    from cai.invariants.data import eval_response_invariants

    recs = eval_outputs()
    assert all_passed(evaluate(eval_response_invariants(TRAIN), recs))  # a plain list works (kind detected)
    for r in recs:
        if r["suite"] == "primary" and r["model"] == "base":
            r["format"], r["prompt"] = "raw", r["instruction"]  # the audit's bug, in the base model's primary suite
    results = {r.name: r for r in evaluate(eval_response_invariants(TRAIN), recs)}
    assert results["format_matches_training"].status == Status.FAIL
    assert "'primary/base/0': format 'raw' in suite 'primary'" in results["format_matches_training"].evidence
    assert results["prompts_identical_across_models"].status == Status.FAIL
    assert results["prompt_format_parity"].status == Status.PASS  # each prompt is a faithful raw rendering
