"""Data invariants fail on the data bug each exists for, pass on clean data."""

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cai.errors import BadInputError
from cai.invariants.base import Status, all_passed, evaluate
from cai.invariants.data import (
    CriticMarginsPresent, DuplicateRate, NonEmptyCompletions, NoTrainEvalOverlap, NoTruncatedCompletions,
    RecordSchema, RecordSet, data_invariants, detect_kind, encoding_invariants, eval_response_invariants,
    load_records, near_duplicate_pairs, words)
from cai.invariants.leakage import prompt_tokenizer_subject
from cai.pipeline import formats

IFEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "ifeval" / "input_data.jsonl"
SHIPPED_SEEDS = Path(__file__).resolve().parents[1] / "cai" / "data" / "seeds" / "instructions.jsonl"

INSTRUCTIONS = [
    "Name three colours of the rainbow.",
    "Write one sentence about the sea in lowercase.",
    "Give a synonym for happy.",
    "Count from one to five in words.",
    "Explain photosynthesis to a child in two sentences.",
]


def pref(i, instruction, chosen=" Good answer.", rejected=" Bad.", margin=1.2, **extra):
    return {"id": f"p{i}", "instruction": instruction, "format": "instruction_response",
            "prompt": formats.render("instruction_response", instruction), "chosen": chosen,
            "rejected": rejected, "margin": margin, **extra}


def eval_item(key, prompt, **extra):
    return {"key": key, "prompt": prompt, "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}], **extra}


@pytest.fixture
def sft_set(sft_record):
    return RecordSet("sft", [sft_record(i, ins, f" Answer {i}.") for i, ins in enumerate(INSTRUCTIONS)])


def test_clean_sets_pass_every_data_invariant(sft_set):
    evals = {"ifeval": [eval_item(1, "Write a limerick about a cat that hates Mondays and loves lasagna.")]}
    results = evaluate(data_invariants("sft", eval_sets=evals, critic_enabled=True, train_format="instruction_response"),
                       sft_set)
    assert all(r.status == Status.PASS for r in results), [r.evidence for r in results if r.status != Status.PASS]
    prefs = RecordSet("preference", [pref(i, ins) for i, ins in enumerate(INSTRUCTIONS)])
    assert all_passed(evaluate(data_invariants("preference", critic_enabled=True), prefs))
    items = RecordSet("eval", [eval_item(i, f"Task number {i}: {ins}") for i, ins in enumerate(INSTRUCTIONS)])
    assert all_passed(evaluate(data_invariants("eval"), items))


# --------------------------------------------------------------------------- kinds and schema


def test_detect_kind():
    assert detect_kind([{"completion": "x"}]) == "sft"
    assert detect_kind([{"chosen": "x", "rejected": "y"}]) == "preference"
    assert detect_kind([eval_item(1, "x")]) == "eval"
    assert detect_kind([{"text": "x"}]) is None


def test_load_records_detects_kind_and_refuses_unknown(tmp_path, sft_record):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(sft_record(0, "Hi there.", " Hello.")) + "\n")
    assert load_records(p).kind == "sft"
    q = tmp_path / "u.jsonl"
    q.write_text('{"text": "x"}\n')
    with pytest.raises(BadInputError, match="cannot tell the record kind"):
        load_records(q)


def test_schema_names_each_broken_record(sft_set):
    recs = [dict(r) for r in sft_set.records]
    del recs[1]["format"]
    recs[2]["completion"] = 7
    recs[3]["format"] = "chatml"
    recs[4]["id"] = recs[0]["id"]
    r = RecordSchema().check(RecordSet("sft", recs))
    assert r.status == Status.FAIL and "4/5" in r.evidence
    problems = "\n".join(r.details["problems"])
    assert "missing format" in problems and "completion is int" in problems
    assert "unknown format 'chatml'" in problems and "duplicate id" in problems


def test_schema_checks_preference_and_eval_specifics():
    bad_margin = pref(0, "Hi.", margin="1.0")
    bool_margin = pref(1, "Hey.", margin=True)
    r = RecordSchema().check(RecordSet("preference", [bad_margin, bool_margin]))
    assert r.status == Status.FAIL and "margin is str" in r.evidence and "margin is bool" in "\n".join(r.details["problems"])
    mismatch = eval_item(5, "Write a poem.", kwargs=[{}, {}])
    r = RecordSchema().check(RecordSet("eval", [mismatch]))
    assert r.status == Status.FAIL and "1 instruction ids but 2 kwargs" in r.evidence


@pytest.mark.skipif(not IFEVAL.is_file(), reason="shared IFEval data not present")
def test_real_ifeval_prompts_pass_the_eval_data_invariants():
    rs = load_records(IFEVAL)
    assert rs.kind == "eval" and len(rs) == 541
    results = {r.name: r for r in evaluate(data_invariants("eval"), rs)}
    assert all_passed(results.values()), {k: r.evidence for k, r in results.items() if r.status != Status.PASS}


# --------------------------------------------------------------------------- completions


def test_empty_completion_fails(sft_set):
    recs = [dict(r) for r in sft_set.records]
    recs[2]["completion"] = "   "
    r = NonEmptyCompletions().check(RecordSet("sft", recs))
    assert r.status == Status.FAIL and "'sft-2' completion" in r.evidence
    assert NonEmptyCompletions().check(sft_set).status == Status.PASS


def test_truncated_completion_fails_but_truncated_rejected_is_a_negative(sft_set):
    recs = [dict(r) for r in sft_set.records]
    recs[0]["stop_reason"] = "length"
    r = NoTruncatedCompletions().check(RecordSet("sft", recs))
    assert r.status == Status.FAIL and "'sft-0'" in r.evidence
    negative = pref(0, "Hi.", rejected=" Hel", rejected_stop_reason="length", negative_type="truncated")
    assert NoTruncatedCompletions().check(RecordSet("preference", [negative])).status == Status.PASS
    cut_chosen = pref(1, "Hey.", chosen_stop_reason="length")
    assert NoTruncatedCompletions().check(RecordSet("preference", [cut_chosen])).status == Status.FAIL


# --------------------------------------------------------------------------- duplicates


def test_exact_duplicates_fail(sft_set, sft_record):
    dup = sft_record(99, "give a synonym for HAPPY!", " Glad.")  # same words after normalising
    r = DuplicateRate().check(RecordSet("sft", sft_set.records + [dup]))
    assert r.status == Status.FAIL and "exact duplicates 1/6" in r.evidence and "'sft-99'" in r.evidence


def test_near_duplicates_fail(sft_set, sft_record):
    near = sft_record(98, "Explain photosynthesis to a child in two short sentences.", " Plants eat light.")
    r = DuplicateRate(near_max=0.05).check(RecordSet("sft", sft_set.records + [near]))
    assert r.status == Status.FAIL and "near-duplicates 1/6" in r.evidence
    assert DuplicateRate(near_max=0.5).check(RecordSet("sft", sft_set.records + [near])).status == Status.PASS


def test_preference_pairs_sharing_an_instruction_are_not_duplicates():
    recs = [pref(i, "Give a synonym for happy.", rejected=f" Wrong {i}.") for i in range(3)]
    assert DuplicateRate().check(RecordSet("preference", recs)).status == Status.PASS
    recs.append(pref(9, "Give a synonym for happy.", rejected=" Wrong 0."))
    assert DuplicateRate().check(RecordSet("preference", recs)).status == Status.FAIL


_word = st.text("abcdefghij", min_size=2, max_size=6)


@settings(max_examples=60, deadline=None)
@given(st.lists(_word, min_size=12, max_size=30), st.sampled_from(["extra", "also", "please"]))
def test_one_word_appended_is_a_near_duplicate(ws, extra):
    a = " ".join(ws)
    assert near_duplicate_pairs([a, a + " " + extra], 0.7)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text("abc", min_size=3, max_size=5), min_size=3, max_size=10),
       st.lists(st.text("xyz", min_size=3, max_size=5), min_size=3, max_size=10))
def test_disjoint_vocabularies_are_never_near_duplicates(a, b):
    assert near_duplicate_pairs([" ".join(a), " ".join(b)], 0.7) == []


# --------------------------------------------------------------------------- decontamination


@pytest.mark.skipif(not IFEVAL.is_file(), reason="shared IFEval data not present")
def test_training_instruction_copied_from_ifeval_fails(sft_set, sft_record):
    ifeval = load_records(IFEVAL)
    leaked = ifeval.records[3]
    copied = sft_record(50, "Please do this for me. " + leaked["prompt"].strip(), " ok")  # reworded lead-in, item copied
    r = NoTrainEvalOverlap({"ifeval": ifeval}).check(RecordSet("sft", sft_set.records + [copied]))
    assert r.status == Status.FAIL
    assert "'sft-50'" in r.evidence and f"ifeval item {leaked['key']!r}" in r.evidence and "13-gram" in r.evidence
    assert NoTrainEvalOverlap({"ifeval": ifeval}).check(sft_set).status == Status.PASS


def test_short_instruction_inside_an_eval_item_fails():
    inv = NoTrainEvalOverlap({"stage1": [eval_item(
        "k9", "Write one sentence about rain in all lowercase letters. No capital letters are allowed.")]})
    copied = {"id": "a", "instruction": "Write one sentence about rain in all lowercase letters."}
    r = inv.check(RecordSet("sft", [copied]))
    assert r.status == Status.FAIL and "appears whole (9 words) in stage1 item 'k9'" in r.evidence
    other = {"id": "b", "instruction": "Write one sentence about snow in all lowercase letters."}
    assert inv.check(RecordSet("sft", [other])).status == Status.PASS


@pytest.mark.skipif(not SHIPPED_SEEDS.is_file() or not IFEVAL.is_file(), reason="seed / IFEval data not present")
def test_constraint_boilerplate_in_seeds_is_not_contamination():
    """The shipped seeds share constraint phrases with IFEval ("wrap your title in double angular
    brackets, i.e. <<title>>"): Stage 1 trains on these families on purpose."""
    from cai.pipeline.store import read_jsonl

    seeds = RecordSet("sft", [{"id": i, "instruction": r["instruction"]} for i, r in enumerate(read_jsonl(SHIPPED_SEEDS))])
    assert NoTrainEvalOverlap({"ifeval": load_records(IFEVAL)}).check(seeds).status == Status.PASS
    assert NoTrainEvalOverlap({"ifeval": load_records(IFEVAL)}, n=8).check(seeds).status == Status.FAIL


def test_short_texts_match_whole():
    inv = NoTrainEvalOverlap({"stage1": [eval_item("k1", "Give a synonym for happy.")]})
    assert inv.check(RecordSet("sft", [{"id": "a", "instruction": "give a synonym for happy"}])).status == Status.FAIL
    assert inv.check(RecordSet("sft", [{"id": "a", "instruction": "Give a synonym for sad."}])).status == Status.PASS


@settings(max_examples=80, deadline=None)
@given(st.lists(_word, min_size=8, max_size=40), st.data())
def test_any_shared_8_gram_is_found(eval_words, data):
    start = data.draw(st.integers(0, len(eval_words) - 8))
    window = eval_words[start:start + 8]
    train = "Prefix words here " + " ".join(window).upper() + " and more."
    inv = NoTrainEvalOverlap({"e": [" ".join(eval_words)]}, n=8)
    assert inv.check(RecordSet("sft", [{"id": "t", "instruction": train}])).status == Status.FAIL


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text("abc", min_size=2, max_size=4), min_size=8, max_size=20),
       st.lists(st.text("xyz", min_size=2, max_size=4), min_size=8, max_size=20))
def test_no_shared_words_no_overlap(eval_words, train_words):
    inv = NoTrainEvalOverlap({"e": [" ".join(eval_words)]}, n=8)
    assert inv.check(RecordSet("sft", [{"id": "t", "instruction": " ".join(train_words)}])).status == Status.PASS


def test_words_normalise_case_and_punctuation():
    assert words("Hello, WORLD! It's 3pm.") == ["hello", "world", "it", "s", "3pm"]


# --------------------------------------------------------------------------- critic


def test_critic_margins_required_when_the_critic_is_on(sft_set):
    recs = [dict(r) for r in sft_set.records]
    del recs[1]["critic_margin"]  # the audit's bug: a critic that never ran on this data
    r = CriticMarginsPresent(True).check(RecordSet("sft", recs))
    assert r.status == Status.FAIL and "'sft-1'" in r.evidence and "wired" in r.evidence
    assert CriticMarginsPresent(False).check(RecordSet("sft", recs)).status == Status.PASS
    assert CriticMarginsPresent(True).check(sft_set).status == Status.PASS
    recs = [dict(r) for r in sft_set.records]
    recs[2]["critic_margin"] = float("nan")
    r = CriticMarginsPresent(True).check(RecordSet("sft", recs))
    assert r.status == Status.FAIL and "'sft-2'" in r.evidence


def test_unjudged_margins_are_counted_but_all_null_fails(sft_set):
    recs = [dict(r) for r in sft_set.records]
    recs[0]["critic_margin"] = None  # a single usable candidate: nothing to judge
    r = CriticMarginsPresent(True).check(RecordSet("sft", recs))
    assert r.status == Status.PASS and "1 marked not judged" in r.evidence
    for rec in recs:
        rec["critic_margin"] = None
    assert CriticMarginsPresent(True).check(RecordSet("sft", recs)).status == Status.FAIL
    synthetic = pref(1, "Hey.", margin=None, negative_type="truncated")
    judged = pref(2, "Hello.", margin=0.8, negative_type="critic")
    assert CriticMarginsPresent(True).check(RecordSet("preference", [synthetic, judged])).status == Status.PASS
    assert RecordSchema().check(RecordSet("preference", [synthetic, judged])).status == Status.PASS


# --------------------------------------------------------------------------- prompts through the tokenizer


def test_encoding_invariants_on_run_prompts(smol_tokenizer, sft_set):
    assert all_passed(evaluate(encoding_invariants(), prompt_tokenizer_subject(sft_set, smol_tokenizer)))
    bad = [dict(r) for r in sft_set.records]
    bad[1]["prompt"] = "<|im_start|>user\n" + bad[1]["prompt"]
    results = {r.name: r for r in evaluate(encoding_invariants(), prompt_tokenizer_subject(bad, smol_tokenizer))}
    assert results["no_special_token_ids"].status == Status.FAIL
    assert "record 'sft-1'" in results["no_special_token_ids"].evidence


def eval_responses(responses: dict[str, str], instruction: str = "Name a colour.") -> list[dict]:
    """Evaluation outputs as the eval stage writes them: one record per model for one item."""
    prompt = formats.render("instruction_response", instruction)
    return [{"id": f"primary/{m}/7", "suite": "primary", "model": m, "key": 7, "eval_set": "stage1",
             "instruction": instruction, "format": "instruction_response", "prompt": prompt, "response": text,
             "stop_reason": "eos", "n_new_tokens": 4} for m, text in responses.items()]


def test_eval_response_with_a_chat_marker_fails():
    clean = eval_responses({"base": "Blue.", "sft": "Blue.", "dpo": "Red."})
    assert all_passed(evaluate(eval_response_invariants("instruction_response"), clean))
    leaked = eval_responses({"base": "Blue.", "sft": "Blue.<|im_end|>\n<|im_start|>assistant\nRed", "dpo": "Red."})
    results = {r.name: r for r in evaluate(eval_response_invariants("instruction_response"), leaked)}
    assert results["no_chat_markers"].status == Status.FAIL
    assert "'primary/sft/7' response" in results["no_chat_markers"].evidence
    assert [n for n, r in results.items() if r.status == Status.FAIL] == ["no_chat_markers"]


def test_eval_prompts_get_encoding_checks_given_the_tokenizer(smol_tokenizer):
    clean = eval_responses({"base": "Blue.", "sft": "Blue."})
    names = [i.name for i in eval_response_invariants("instruction_response", tokenizer=smol_tokenizer)]
    assert {"no_special_token_ids", "decode_encode_roundtrip"} <= set(names)
    assert "no_special_token_ids" not in [i.name for i in eval_response_invariants("instruction_response")]
    assert all_passed(evaluate(eval_response_invariants("instruction_response", tokenizer=smol_tokenizer), clean))
    bad = eval_responses({"base": "Blue.", "sft": "Blue."}, instruction="Repeat <|im_start|> once.")
    results = {r.name: r for r in evaluate(eval_response_invariants("instruction_response", tokenizer=smol_tokenizer),
                                           bad)}
    special = results["no_special_token_ids"]
    assert special.status == Status.FAIL
    assert "record 'primary/base/7' -> ids [1] ['<|im_start|>']" in special.evidence


SHIPPED_EVAL = Path(__file__).resolve().parents[1] / "cai" / "data" / "eval" / "stage1_eval.jsonl"


@pytest.mark.skipif(not SHIPPED_EVAL.is_file(), reason="shipped Stage-1 eval set not present")
def test_templated_eval_set_reports_near_duplicates_without_failing():
    rs = load_records(SHIPPED_EVAL)
    results = {r.name: r for r in evaluate(data_invariants("eval"), rs)}
    assert all_passed(results.values()), {k: r.evidence for k, r in results.items() if r.status != Status.PASS}
    assert "reported, not gated" in results["duplicate_rate"].evidence
    # the same templated texts as *training* instructions are near-duplicates and fail
    as_training = RecordSet("sft", [{"id": r["key"], "instruction": r["prompt"]} for r in rs.records])
    assert DuplicateRate().check(as_training).status == Status.FAIL
