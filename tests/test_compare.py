"""The shared verdict statistics (cai.pipeline.compare): the empty/refusal rule, per-type
CIs over the type's clusters, and the one-feature rule fit behind both rules.

Run-level fixtures score real responses with the IFEval checkers on items of the shipped
Stage-1 set; the per-type CI checks use `verdict_scores` on verdict lists as `cai compare`
builds them."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cai.config import RunConfig
from cai.pipeline.compare import (REFUSAL_PHRASES, _rule_fit, is_empty_or_refusal, load_eval_set, summarize,
                                  verdict_scores)
from cai.pipeline.stats import bootstrap_mean_ci

PASS, LONG_OK = "a calm day by the sea.", "a calm day by the sea where the waves roll in and the gulls call all morning."
REFUSAL = "I'm sorry, but I cannot help with that request."  # a capital and a comma: fails lowercase and no-comma


@pytest.fixture(scope="module")
def items():
    wanted = {("change_case:english_lowercase",), ("punctuation:no_comma",)}
    return [it for it in load_eval_set("stage1") if tuple(it["instruction_id_list"]) in wanted]


@pytest.fixture(scope="module")
def cfg():
    return RunConfig.model_validate({"name": "t", "model": {"source": "tiny-random"}, "eval": {"bootstrap_resamples": 2000}})


def _rows(items, texts):
    return [{"suite": "primary", "model": "sft", "eval_set": it["eval_set"], "key": it["key"], "response": texts(i),
             "stop_reason": "eos"} for i, it in enumerate(items)]


def test_empty_or_refusal_rule_fires_when_refusals_decide_and_stays_quiet_otherwise(items, cfg):
    """Half the answers are refusals, and exactly those fail: "fail iff empty or a refusal"
    matches every verdict. Passes come in two lengths around the refusals' length, so no
    length threshold matches them all."""
    res = summarize(cfg, items, _rows(items, lambda i: [PASS, REFUSAL, LONG_OK, REFUSAL][i % 4]))
    rr = res["scores"]["primary"]["sft"]["refusal_rule"]
    assert res["scores"]["primary"]["sft"]["length_rule"]["accuracy"] == 0.75
    assert (rr["n"], rr["n_flagged"], rr["flagged_passed"]) == (20, 10, 0)
    assert rr["accuracy"] == 1.0 and rr["majority"] == 0.5 and rr["rule"] == "fail iff empty or a refusal" and rr["warning"]
    assert any(w.startswith("empty/refusal predicts the verdict (primary/sft)") for w in res["warnings"])

    def failing(text):  # a non-refusal that fails both checks
        return text[0].upper() + text[1:-1] + ","

    control = summarize(cfg, items, _rows(items, lambda i: REFUSAL if i in (0, 1) else [PASS, failing(LONG_OK)][i % 2]))
    quiet = control["scores"]["primary"]["sft"]["refusal_rule"]
    assert quiet["n_flagged"] == 2 and quiet["accuracy"] - quiet["majority"] < 0.25 and not quiet["warning"]
    assert not any(w.startswith("empty/refusal") for w in control["warnings"])


def test_empty_answers_count_as_flagged(items, cfg):
    """The checkers fail every empty answer: a model that answers half the items with
    nothing and passes the rest is decided by emptiness alone, and the rule says so."""
    res = summarize(cfg, items, _rows(items, lambda i: "" if i % 2 else PASS))
    rr = res["scores"]["primary"]["sft"]["refusal_rule"]
    assert rr["n_flagged"] == 10 and rr["rule"] == "fail iff empty or a refusal" and rr["warning"]


@pytest.mark.parametrize("text", ["", "   \n", "I'm sorry, I can't do that.", "I cannot write that.",
                                  "\"I won't\" — no.", "Sure. As an AI language model I have no opinion.",
                                  "I\u2019m unable to comply."])
def test_refusal_openings_are_flagged(text):
    assert is_empty_or_refusal(text)


@pytest.mark.parametrize("text", ["a calm day by the sea.", "The sea is calm; I cannot see a wave.",
                                  "Sorry seems to be the hardest word (a song title)."])
def test_answers_are_not_flagged(text):
    assert not is_empty_or_refusal(text)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(REFUSAL_PHRASES), st.text(max_size=80), st.sampled_from(["", " ", "\n", '"', "**"]))
def test_any_listed_opening_is_a_refusal_whatever_follows(phrase, rest, lead):
    assert is_empty_or_refusal(lead + phrase.upper() + " " + rest)


@settings(max_examples=80, deadline=None)
@given(st.integers(2, 40).flatmap(lambda n: st.tuples(st.lists(st.integers(0, 1), min_size=n, max_size=n),
                                                       st.lists(st.lists(st.integers(0, 1), min_size=n, max_size=n),
                                                                min_size=1, max_size=5))))
def test_rule_fit_is_at_least_the_majority_and_exact_on_the_verdicts(data):
    """The best one-feature rule, either direction, is never worse than the majority guess
    (a constant feature is that guess) and is perfect when a feature equals the verdicts
    or their negation."""
    passed, features = data
    _, acc, _, majority = _rule_fit(passed, features + [[0] * len(passed)])
    assert majority <= acc <= 1.0
    best, acc, positive, _ = _rule_fit(passed, features + [[1 - p for p in passed]])
    assert acc == 1.0
    f = np.asarray((features + [[1 - p for p in passed]])[best])
    assert ((f if positive else 1 - f) == np.asarray(passed)).all()


def _verdict(passed: bool, cluster: str, iid: str = "punctuation:no_comma") -> dict:
    return {"passed": passed, "cluster": cluster, "instruction_id_list": [iid], "follow_instruction_list_strict": [passed],
            "follow_instruction_list_loose": [passed], "prompt_level_strict": passed, "prompt_level_loose": passed,
            "response": "x", "stop_reason": "eos"}


def test_per_type_ci_resamples_the_clusters_carrying_the_type():
    """no_comma items from two templates: one all pass, one all fail. Resampling the two
    clusters gives [0, 1]; resampling the ten items as independent (the old per-type CI)
    is far narrower and is refused here."""
    verdicts = [_verdict(True, "punctuation:no_comma") for _ in range(5)]
    verdicts += [_verdict(False, "change_case:english_lowercase+punctuation:no_comma") for _ in range(5)]
    per = verdict_scores(verdicts, n_resamples=2000, seed=0)["per_instruction"]["punctuation:no_comma"]
    values, clusters = [int(v["passed"]) for v in verdicts], [v["cluster"] for v in verdicts]
    assert per["n"] == 10 and per["n_clusters"] == 2 and per["ci_resamples"] == "clusters"
    assert per["strict_ci"] == list(bootstrap_mean_ci(values, n_resamples=2000, seed=0, clusters=clusters)[1:])
    iid_lo, iid_hi = bootstrap_mean_ci(values, n_resamples=2000, seed=0)[1:]
    assert per["strict_ci"] == [0.0, 1.0] and iid_hi - iid_lo < 0.8


def test_a_type_from_one_cluster_resamples_its_items_and_says_so():
    verdicts = [_verdict(i % 3 == 0, "startend:quotation", "startend:quotation") for i in range(9)]
    s = verdict_scores(verdicts, n_resamples=1000, seed=0)
    per = s["per_instruction"]["startend:quotation"]
    assert per["n_clusters"] == 1 and per["ci_resamples"] == "items (one cluster)"
    assert per["strict_ci"] == list(bootstrap_mean_ci([int(v["passed"]) for v in verdicts], n_resamples=1000, seed=0)[1:])
    assert per["strict_ci"][0] < per["strict"] < per["strict_ci"][1]
    assert s["n_instructions"] == 9 and s["instruction_level_strict_ci"] == [s["instruction_level_strict"]] * 2


def test_verdicts_without_responses_leave_the_response_diagnostics_unrun():
    s = verdict_scores([{"passed": i % 2 == 0, "cluster": str(i)} for i in range(12)], n_resamples=500, seed=0)
    assert s["n"] == 12 and s["n_clusters"] == 12 and "per_instruction" not in s
    assert s["length_rule"] is s["refusal_rule"] is s["n_truncated"] is s["n_empty"] is None


@settings(max_examples=30, deadline=None)
@given(passed=st.lists(st.booleans(), min_size=4, max_size=30), n_clusters=st.integers(2, 6), seed=st.integers(0, 2**16))
def test_scores_do_not_depend_on_the_order_verdicts_come_in(passed, n_clusters, seed):
    """The same verdicts in another order (eval records written by length-sorted batches, a
    resume, a merge of shards) get the same point estimates and the same intervals."""
    import random

    verdicts = [{**_verdict(p, f"c{i % n_clusters}"), "key": i, "eval_set": "stage1"} for i, p in enumerate(passed)]
    shuffled = verdicts[:]
    random.Random(seed).shuffle(shuffled)
    assert verdict_scores(shuffled, n_resamples=300, seed=0) == verdict_scores(verdicts, n_resamples=300, seed=0)
