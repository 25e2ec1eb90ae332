"""Responses (few-shot completion, best-of-N by the critic) and preference pairs."""

from __future__ import annotations

import hashlib
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from cai.config import ModelConfig, RunConfig  # noqa: E402
from cai.errors import BadInputError  # noqa: E402
from cai.invariants import (ChosenDiffersFromRejected, ChosenPassesVerifier, DuplicateRate, GatedChosenPasses, RecordSet,  # noqa: E402
                            Status, all_passed, data_invariants, evaluate)
from cai.pipeline import formats  # noqa: E402
from cai.pipeline.critic import Judgement  # noqa: E402
from cai.pipeline.evaluate import score_item  # noqa: E402
from cai.pipeline.generation import HFGenerator  # noqa: E402
from cai.pipeline.models import ModelSlot  # noqa: E402
from cai.pipeline.pairs import (RULES, _pair, build_pairs, ignore_constraint, over_verbose, pair_key,  # noqa: E402
                                run_pairs, truncate_midway)
from cai.pipeline.responses import (contender_indices, fewshot_for, fewshot_prompt, load_fewshot_examples,  # noqa: E402
                                    run_responses, select, shortfall_error, verifiable_constraint, verifier_passes)
from cai.pipeline.store import ArtifactWriter  # noqa: E402

INSTRUCTIONS = [
    {"id": "inst-a", "instruction": "List three fruits as bullet points.", "type": "bullets", "source": "model"},
    {"id": "inst-b", "instruction": "Describe the moon in one sentence.", "type": "sentences", "source": "model"},
    {"id": "inst-c", "instruction": "What is the capital of Italy? Answer in all capital letters.", "type": "uppercase",
     "source": "model"},
]


def _cfg(**over) -> RunConfig:
    base = {"name": "t", "seed": 1, "responses": {"shots": 3, "n_candidates": 3, "max_new_tokens": 48, "batch_size": 9},
            "pairs": {"min_margin": 0.0}}
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v}
    return RunConfig.model_validate(base)


@pytest.fixture(scope="module")
def gen():
    with ModelSlot(ModelConfig(source="embedded")) as slot:
        yield HFGenerator(slot.model, slot.tokenizer, batch_size=9)


@pytest.fixture(scope="module")
def sft(gen, tmp_path_factory):
    cfg = _cfg()
    w = ArtifactWriter(tmp_path_factory.mktemp("resp") / "a", "responses", config_hash=cfg.hash())
    stats = run_responses(cfg, gen, INSTRUCTIONS, w)
    return cfg, list(w.done), stats


def test_fewshot_examples_shipped():
    examples = load_fewshot_examples()
    assert len(examples) >= 8
    for instruction, response in examples:
        text = formats.render_example("instruction_response", instruction, response)
        assert not any(s in text for s in formats.stop_sequences("instruction_response"))


def test_responses_stop_at_the_example_boundary(sft):
    cfg, recs, stats = sft
    assert stats["written"] + stats["dropped"]["no_usable_candidate"] == len(INSTRUCTIONS)
    assert recs, stats
    for r in recs:
        texts = [r["completion"]] + [c["text"] for c in r["candidates"]]
        assert not any("\nInstruction:" in t or "Instruction:" in t for t in texts)
        assert r["prompt"] == formats.render(cfg.format, r["instruction"])
        assert r["completion"].startswith(formats.COMPLETION_PREFIX) and r["completion"].strip()
        assert r["completion"] == formats.COMPLETION_PREFIX + r["candidates"][r["chosen_index"]]["text"]
        assert r["candidates"][r["chosen_index"]]["usable"] and r["stop_reason"] in {"stop", "eos"}
        rounds = [c["round"] for c in r["candidates"]]  # N per round, a round only while none was usable
        assert rounds == sorted(rounds) and len(rounds) == cfg.responses.n_candidates * rounds[-1]
        assert {"id", "instruction", "format", "prompt", "completion", "stop_reason", "critic_margin",
                "candidates", "fewshot_context_sha256", "source"} <= set(r)


def test_unusable_samples_are_resampled_within_the_budget(gen, tmp_path):
    """At 20 new tokens most samples are cut by the length limit: one round of 3 leaves two of
    the three instructions without a usable response, and the stage refuses to hand on the
    smaller set; four rounds answer all three, the first round's samples unchanged."""
    def run(max_rounds):
        cfg = _cfg(responses={"max_new_tokens": 20, "max_rounds": max_rounds})
        writer = ArtifactWriter(tmp_path / str(max_rounds), "responses", config_hash=cfg.hash())
        return cfg, run_responses(cfg, gen, INSTRUCTIONS, writer), {r["id"]: r for r in writer.done}

    cfg1, stats1, one = run(1)
    err = shortfall_error(cfg1, stats1)
    assert len(one) < len(INSTRUCTIONS) and err is not None
    assert f"{len(INSTRUCTIONS) - len(one)} of 3 instructions got no usable candidate in 1 round(s)" in str(err)
    assert "'truncated'" in str(err) and "\n" not in str(err)

    cfg4, stats4, four = run(4)
    assert set(four) == {i["id"] for i in INSTRUCTIONS} and shortfall_error(cfg4, stats4) is None
    assert max(int(k.rsplit("_", 1)[1]) for k in stats4["rounds"] if k != "max") > 1
    for rid, rec in one.items():  # answered in round 1 either way: the same record
        assert four[rid] == rec


def test_fewshot_context_hash(sft):
    cfg, recs, _ = sft
    examples = load_fewshot_examples()
    for r in recs:
        shots = fewshot_for(cfg, r["id"], r["instruction"], examples)
        prompt, sha = fewshot_prompt(cfg, r["instruction"], shots)
        assert sha == r["fewshot_context_sha256"]
        context = prompt[: len(prompt) - len(r["prompt"])]
        assert hashlib.sha256(context.encode()).hexdigest() == sha and context.count("Instruction:") == cfg.responses.shots


def test_critic_choice_is_the_best_score(sft):
    _, recs, _ = sft
    for r in recs:
        judged = [c for c in r["candidates"] if "score" in c]
        if r["selection"] == "critic_round_robin":
            chosen = r["candidates"][r["chosen_index"]]
            assert chosen["score"] == max(c["score"] for c in judged) == r["critic_margin"]
            assert all(c["margin_vs_chosen"] is not None for c in judged if c is not chosen)


def test_responses_resume_equals_uninterrupted(gen, sft, tmp_path):
    cfg, recs, _ = sft
    w = ArtifactWriter(tmp_path / "r", "responses", config_hash=cfg.hash())
    w.append(recs[0])
    w.close()
    resumed = ArtifactWriter(tmp_path / "r", "responses", config_hash=cfg.hash(), resume=True)
    stats = run_responses(cfg, gen, INSTRUCTIONS, resumed)
    # the interrupted unit (all 3 instructions: one batch) is replayed whole, so its batch and
    # floats are the uninterrupted ones; only the 2 missing records are written
    assert stats["resumed_records"] == 1 and stats["units"] == [0] and stats["processed"] == len(INSTRUCTIONS)
    assert stats["written"] == len(INSTRUCTIONS) - 1
    assert resumed.done == recs


def test_pairs_from_model_records(sft, tmp_path):
    cfg, recs, _ = sft
    pairs, stats = build_pairs(cfg, recs)
    assert pairs and stats["pairs"] == len(pairs)
    for p in pairs:
        assert p["chosen"] != p["rejected"]
        assert p["prompt"] == formats.render(p["format"], p["instruction"])
        assert p["rejected"].startswith(formats.COMPLETION_PREFIX)
        if p["negative_type"] == "critic":
            assert p["margin"] >= cfg.pairs.min_margin
        else:
            assert p["margin"] is None
    assert {"truncated", "off_topic", "over_verbose"} <= {p["negative_type"] for p in pairs}
    w = ArtifactWriter(tmp_path / "p", "pairs", config_hash=cfg.hash())
    assert run_pairs(cfg, recs, w)["n_records"] == len(pairs)


def _record(rid, response, candidates, kind="open", instruction="Say hello."):
    return {"id": rid, "instruction": instruction, "type": kind, "format": "instruction_response",
            "prompt": formats.render("instruction_response", instruction), "completion": " " + response,
            "chosen_index": 0, "candidates": candidates}


def test_pairs_respect_min_margin_and_distinct_texts():
    cands = [{"text": "Hello there, friend, how are you today?", "usable": True},
             {"text": "hi", "usable": True, "margin_vs_chosen": 0.9},
             {"text": "Hello there, friend, how are you today?", "usable": True, "margin_vs_chosen": 2.0},
             {"text": "meh", "usable": True, "margin_vs_chosen": 0.2},
             {"text": "cut off mid", "usable": False, "margin_vs_chosen": None}]
    recs = [_record("r1", cands[0]["text"], cands), _record("r2", "Bonjour à tous, et bienvenue ici.", [
        {"text": "Bonjour à tous, et bienvenue ici.", "usable": True}], instruction="Greet in French.")]
    cfg = _cfg(pairs={"min_margin": 0.5, "synthetic_negatives": False})
    pairs, stats = build_pairs(cfg, recs)
    assert [(p["rejected"], p["margin"]) for p in pairs] == [(" hi", 0.9)]
    assert stats["skipped"] == {"critic_below_min_margin": 1, "critic_equals_chosen": 1}
    pairs, _ = build_pairs(_cfg(pairs={"min_margin": 0.5, "synthetic_negatives": True}), recs)
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    off = [p for p in pairs if p["negative_type"] == "off_topic"]
    assert {p["rejected"] for p in off} == {recs[1]["completion"], recs[0]["completion"]}


def test_synthetic_negative_builders():
    text = "The moon is bright tonight and the stars are out."
    cut = truncate_midway(text)
    assert text.startswith(cut) and len(cut) < len(text) / 2 + 1
    assert truncate_midway("too short") is None
    verbose = over_verbose(text, random.Random(0))
    assert verbose.startswith(text) and len(verbose) > 2 * len(text)
    assert ignore_constraint("the sea is calm. the sky is blue.", "lowercase", "") == "The sea is calm. The sky is blue."
    assert ignore_constraint("BE KIND.", "uppercase", "") == "be kind."
    assert ignore_constraint("* one\n* two", "bullets", "") == "one two"
    assert ignore_constraint("Done. Stay curious.", "ending", 'End with "Stay curious."') == "Done."
    assert ignore_constraint("<<Title>> Body", "title", "") == "Body"
    assert ignore_constraint("anything", "open", "") is None


# --------------------------------------------------------------------------- chosen != rejected, no duplicates


def test_chosen_equal_to_rejected_fails_naming_the_pair(sft):
    """Real pairs from the model's records pass; one whose rejected is its chosen (up to
    surrounding whitespace) fails, named by id."""
    cfg, recs, _ = sft
    pairs, _ = build_pairs(cfg, recs)
    assert ChosenDiffersFromRejected().check(RecordSet("preference", pairs)).status == Status.PASS
    bad = [dict(p) for p in pairs]
    bad[1]["rejected"] = bad[1]["chosen"] + "\n"
    res = ChosenDiffersFromRejected().check(RecordSet("preference", bad))
    assert res.status == Status.FAIL and repr(bad[1]["id"]) in res.evidence and "1/" in res.evidence
    assert "chosen_differs_from_rejected" in {i.name for i in data_invariants("preference")}


def _sft(rid, instruction, chosen, others, *, kind="open", source="templates", margin=0.5, **extra):
    """An SFT record as responses.py writes it: chosen candidate 0, the others judged against it."""
    cands = [{"text": chosen, "usable": True}] + [{"text": t, "usable": True, "margin_vs_chosen": margin} for t in others]
    return {"id": rid, "instruction": instruction, "type": kind, "format": "instruction_response",
            "prompt": formats.render("instruction_response", instruction), "completion": formats.COMPLETION_PREFIX + chosen,
            "chosen_index": 0, "candidates": cands, "critic_margin": margin, "stop_reason": "eos", "source": source,
            "verifier": None, **extra}


def test_typed_negative_equal_to_a_critic_pair_is_not_written(tmp_path):
    """The smoke-run collision (`tpl-00006-off_topic` == `tpl-00006-critic-0`, `source:
    templates`, default `synthetic_negatives`): a small model sampled, for tpl-00006, the
    response it chose for the instruction that lends tpl-00006 its off-topic negative. The
    typed pair repeats the critic pair; it is not written, the stats say why, and the
    artifact passes every preference invariant (duplicate_rate failed before: VOID run)."""
    shared = "It is a calm place where people can rest and enjoy the view."
    recs = [_sft("tpl-00006", "Write a slogan about honeybees in all capital letters.",
                 "Honeybees keep the flowers of the world alive.", [shared]),
            _sft("tpl-00001", "What makes coffee interesting?", shared, ["Coffee is a drink made from beans."]),
            _sft("tpl-00002", "Describe chess in exactly three sentences.", shared, ["Chess is a board game."])]
    cfg = _cfg(instructions={"source": "templates"}, pairs={"min_margin": 0.1})
    assert cfg.pairs.synthetic_negatives  # the default
    w = ArtifactWriter(tmp_path / "p", "pairs", config_hash=cfg.hash())
    stats = run_pairs(cfg, recs, w)
    keys = [pair_key(p) for p in w.done]
    assert len(keys) == len(set(keys)) and "tpl-00006-critic-1" in {p["id"] for p in w.done}
    assert "tpl-00006-off_topic" not in {p["id"] for p in w.done}
    assert stats["skipped"]["off_topic_duplicate_of_critic"] == 1
    assert stats["skipped"]["off_topic_equals_chosen"] == 1  # one of the other two lends the other its own chosen
    assert set(stats["by_negative_type"]) == set(RULES) and sum(stats["by_negative_type"].values()) == len(w.done)
    results = evaluate(data_invariants("preference", critic_enabled=True, train_format=cfg.format),
                       RecordSet("preference", list(w.done)))
    assert all_passed(results), [r.evidence for r in results if r.status != Status.PASS]


_TEXTS = st.sampled_from(["Yes.", "No.", "Yes. ", "Maybe so, maybe not at all today.", "It depends on the day and the hour."])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(_TEXTS, st.lists(st.tuples(_TEXTS, st.floats(-1, 2)), max_size=4)), min_size=1, max_size=5),
       st.booleans())
def test_pairs_never_repeat_and_never_prefer_a_text_over_itself(groups, synthetic):
    """Whatever texts a model repeats across candidates and instructions, no pair is
    written twice (duplicate_rate's key) and none has chosen == rejected."""
    recs = [_sft(f"r{i}", f"Instruction number {i} about topic {'abcdefgh'[i]}.", chosen, [t for t, _ in others])
            for i, (chosen, others) in enumerate(groups)]
    for rec, (_, others) in zip(recs, groups):
        for cand, (_, m) in zip(rec["candidates"][1:], others):
            cand["margin_vs_chosen"] = m
    pairs, stats = build_pairs(_cfg(pairs={"min_margin": 0.0, "synthetic_negatives": synthetic}), recs)
    rs = RecordSet("preference", pairs)
    assert ChosenDiffersFromRejected().check(rs).status == Status.PASS
    assert DuplicateRate(exact_max=0.0, near_max=None).check(rs).status == Status.PASS
    assert stats["pairs"] == len(pairs) == sum(stats["by_negative_type"].values())


# --------------------------------------------------------------------------- verifier gating


def test_verifiable_constraint_only_where_it_is_known_exactly():
    upper = {"id": "t1", "instruction": "Write a slogan about tea in all capital letters.", "type": "uppercase"}
    got = verifiable_constraint(dict(upper, source="templates"))
    assert got["instruction_id_list"] == ["change_case:english_capital"] and got["kwargs"] == [{}]
    assert got["source"] == "template type"
    assert verifiable_constraint(dict(upper, source="model")) is None  # type guessed by keyword rules
    bullets = {"id": "t2", "instruction": "Write three bullet points about tea.", "type": "bullets", "source": "templates"}
    assert verifiable_constraint(bullets) is None  # the checker needs num_bullets, which no record carries
    explicit = dict(bullets, instruction_id_list=["detectable_format:number_bullet_lists"], kwargs=[{"num_bullets": 3}])
    assert verifiable_constraint(explicit)["source"] == "record"
    with pytest.raises(BadInputError, match="t2.*num_bullets"):
        verifiable_constraint(dict(explicit, kwargs=[{}]))
    with pytest.raises(BadInputError, match="'t2'"):
        verifiable_constraint(dict(explicit, kwargs=[]))


def test_verifier_passes_is_the_canonical_strict_verdict():
    c = verifiable_constraint({"id": "t", "instruction": "Describe tea without using any commas.", "type": "no_commas",
                               "source": "templates"})
    assert verifier_passes(c, "Tea is warm and calm.") is True
    assert verifier_passes(c, "Tea is warm, calm and green.") is False
    assert score_item(c, "Tea is warm, calm and green.")["prompt_level_strict"] is False


def test_a_failing_candidate_is_never_a_contender_while_one_passes():
    """The critic would prefer candidate 0 (it beats both others), but it fails its checker:
    the contenders are the passing candidates, judged among themselves, so 0 can neither be
    chosen nor cost a judgement. With none passing, every usable candidate contends."""
    j = lambda m: Judgement(margin=m, margin_ab=m, margin_ba=m, disagree=False, mass=1.0, passes=2)  # noqa: E731
    table = {(0, 1): j(2.0), (0, 2): j(1.5), (1, 2): j(-0.3)}
    assert select(table, 3)[0] == 0
    constraint = {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    cands = [{"usable": True, "verifier_pass": False}, {"usable": True, "verifier_pass": True},
             {"usable": True, "verifier_pass": True}, {"usable": False}]
    contenders = contender_indices(cands, constraint)
    assert contenders == [1, 2]
    sub = {(0, 1): table[(1, 2)]}  # the round robin over the contenders only
    local, scores = select(sub, len(contenders))
    assert contenders[local] == 2 and scores == [-0.3, 0.3]
    for c in cands[:3]:
        c["verifier_pass"] = False
    assert contender_indices(cands, constraint) == [0, 1, 2] == contender_indices(cands, None)


def _gated(rid, instruction, kind, chosen, passes, others):
    """A gated SFT record: `others` are (text, verifier_pass, critic gap vs chosen)."""
    rec = _sft(rid, instruction, chosen, [t for t, _, _ in others], kind=kind)
    rec["candidates"][0]["verifier_pass"] = passes
    for cand, (_, ok, gap) in zip(rec["candidates"][1:], others):
        cand.update(verifier_pass=ok, margin_vs_chosen=gap)
    c = verifiable_constraint(rec)
    rec["verifier"] = {"instruction_id_list": c["instruction_id_list"], "kwargs": c["kwargs"], "source": c["source"],
                       "chosen_passes": passes, "passing_candidates": int(passes) + sum(ok for _, ok, _ in others)}
    return rec


def test_verifier_pairs_and_no_pair_for_a_failing_chosen(tmp_path):
    """A candidate failing the checker is a rejected against the passing chosen even when the
    critic ranked it above (negative gap, below min_margin); a gated record whose chosen
    fails (no candidate passed) gives no pair. The manifest stats count each rule."""
    ok = _gated("tpl-1", "Describe the sea without using any commas.", "no_commas", "The sea is wide and deep.", True,
                [("The sea is wide, deep and blue.", False, -0.4), ("The sea is big.", True, 0.6)])
    fails = _gated("tpl-2", "Write a slogan about trains in all capital letters.", "uppercase", "Trains run on time.",
                   False, [("Trains are fast.", False, 0.5)])
    cfg = _cfg(pairs={"min_margin": 0.1})
    w = ArtifactWriter(tmp_path / "p", "pairs", config_hash=cfg.hash())
    stats = run_pairs(cfg, [ok, fails], w)
    by_id = {p["id"]: p for p in w.done}
    v = by_id["tpl-1-verifier-1"]
    assert v["negative_type"] == "verifier" and v["margin"] is None and v["critic_margin_vs_chosen"] == -0.4
    assert by_id["tpl-1-critic-2"]["margin"] == 0.6
    assert not any(p["sft_id"] == "tpl-2" for p in w.done)
    assert stats["skipped"]["chosen_fails_verifier"] == 1 and stats["verifier_gated_records"] == 2
    assert stats["by_negative_type"]["verifier"] == 1 and stats["by_negative_type"]["critic"] == 1
    rs = RecordSet("preference", list(w.done))
    assert all_passed(evaluate(data_invariants("preference", critic_enabled=True), rs))


def test_chosen_failing_its_verifier_fails_naming_the_pair():
    """Pairs built the old way from a record whose chosen breaks its constraint (a comma
    where commas are forbidden; an explicit IFEval keyword missing) fail, named by id; the
    passing ones pass. The checker runs on the record, not on a stored flag."""
    sea = _sft("tpl-1", "Describe the sea without using any commas.", "The sea is wide, deep and blue.", [], kind="no_commas")
    owl = _sft("m-1", "Write one sentence about owls that mentions the word night.", "Owls hunt in the dark.", [],
               source="model", instruction_id_list=["keywords:existence"], kwargs=[{"keywords": ["night"]}])
    good = _sft("tpl-2", "Describe the moon without using any commas.", "The moon is pale and round.", [], kind="no_commas")
    pairs = [_pair(r, "Something else entirely.", "over_verbose", None, "x") for r in (sea, owl, good)]
    pairs.append(_pair(dict(good, id="m-2", source="model"), "Other.", "over_verbose", None, "x"))  # ungated
    res = ChosenPassesVerifier().check(RecordSet("preference", pairs))
    assert res.status == Status.FAIL, res.evidence
    assert "2/3" in res.evidence and "'tpl-1-x' (punctuation:no_comma)" in res.evidence
    assert "'m-1-x' (keywords:existence)" in res.evidence and "tpl-2" not in res.evidence
    assert ChosenPassesVerifier().check(RecordSet("preference", pairs[2:])).status == Status.PASS
    broken = dict(pairs[1], kwargs=[{}])  # the checker would draw a random keyword: cannot be checked
    res = ChosenPassesVerifier().check(RecordSet("preference", [broken]))
    assert res.status == Status.FAIL and "unverifiable" in res.evidence
    assert "chosen_passes_verifier" in {i.name for i in data_invariants("preference")}


GATED = [
    {"id": "tpl-a", "instruction": "Describe the moon without using any commas.", "type": "no_commas",
     "source": "templates"},
    {"id": "tpl-b", "instruction": "Write a slogan about coffee in all capital letters.", "type": "uppercase",
     "source": "templates"},
    # IFEval ids and kwargs on the record; with seed 1 one usable sample fails (15 words) and one passes
    {"id": "w15", "instruction": "Describe the sea. Answer with less than 15 words.", "type": "words", "source": "model",
     "instruction_id_list": ["length_constraints:number_words"], "kwargs": [{"relation": "less than", "num_words": 15}]},
]


def test_responses_gate_the_chosen_by_its_checker(gen, tmp_path):
    """Instructions with a checkable constraint (template types, IFEval kwargs on the record), on
    the real model (one round): every
    usable candidate carries the canonical scorer's strict verdict, the chosen passes
    whenever any candidate does, an instruction with none is marked (and counted), and the
    pairs built from the records pass every preference invariant."""
    cfg = _cfg(responses={"max_rounds": 1})
    w = ArtifactWriter(tmp_path / "r", "responses", config_hash=cfg.hash())
    stats = run_responses(cfg, gen, GATED, w)
    recs = list(w.done)
    assert stats["verifier"]["gated"] == len(recs) == 3
    mixed = 0
    for r in recs:
        gate, c = r["verifier"], verifiable_constraint(r)
        assert gate["instruction_id_list"] == c["instruction_id_list"] and gate["source"] == ("record" if "kwargs" in r else "template type")
        for cand in r["candidates"]:
            if cand["usable"]:
                assert cand["verifier_pass"] == score_item(c, cand["text"])["prompt_level_strict"]
        passing = [c for c in r["candidates"] if c["usable"] and c["verifier_pass"]]
        assert gate["passing_candidates"] == len(passing)
        assert gate["chosen_passes"] == bool(passing) == r["candidates"][r["chosen_index"]]["verifier_pass"]
        failing = [c for c in r["candidates"] if c["usable"] and not c["verifier_pass"]]
        if passing:  # a failing candidate is a verifier pair, never judged
            assert not any("score" in c or "margin_vs_chosen" in c for c in failing)
            mixed += bool(failing)
    assert mixed, "no record had passing and failing candidates: the contender check above never ran"
    assert stats["verifier"]["chosen_passes"] + stats["verifier"]["none_passes"] == 3
    assert stats["verifier"]["none_passes"] == sum(not r["verifier"]["chosen_passes"] for r in recs)
    _gated_chosen_check_fails_on_damaged_records(recs)
    pairs, pstats = build_pairs(cfg, recs)
    assert pstats["skipped"].get("chosen_fails_verifier", 0) == stats["verifier"]["none_passes"]
    results = evaluate(data_invariants("preference", critic_enabled=True), RecordSet("preference", pairs))
    assert all_passed(results), [r.evidence for r in results if r.status != Status.PASS]


def _gated_chosen_check_fails_on_damaged_records(recs):
    """`gated_chosen_passes_when_one_could` passes on the stage's real records and fails on each
    way one could be damaged: the chosen swapped for a failing candidate while another passes
    (with its flag set to match), a forged `chosen_passes`, the passing candidate hidden by
    flagging it unusable, the constraint fields removed, the candidates removed."""
    check = GatedChosenPasses()
    assert "gated_chosen_passes_when_one_could" in {i.name for i in data_invariants("sft")}
    assert check.check(RecordSet("sft", recs)).status == Status.PASS
    rec = next(r for r in recs if {c["verifier_pass"] for c in r["candidates"] if c["usable"]} == {True, False})
    failing = next(c for c in rec["candidates"] if c["usable"] and not c["verifier_pass"])
    swapped = dict(rec, completion=formats.COMPLETION_PREFIX + failing["text"],
                   verifier=dict(rec["verifier"], chosen_passes=False))
    res = check.check(RecordSet("sft", [swapped]))
    assert res.status == Status.FAIL and "passes)" in res.evidence, res.evidence
    forged = dict(rec, verifier=dict(rec["verifier"], chosen_passes=False))
    res = check.check(RecordSet("sft", [forged]))
    assert res.status == Status.FAIL and "re-scored True" in res.evidence, res.evidence
    hidden = dict(swapped, candidates=[dict(c, usable=c is failing) for c in rec["candidates"]])
    assert check.check(RecordSet("sft", [hidden])).status == Status.FAIL
    stripped = {k: v for k, v in swapped.items() if k not in ("instruction_id_list", "kwargs", "type")}
    res = check.check(RecordSet("sft", [stripped]))  # constraint fields removed: the check must not skip it
    assert res.status == Status.FAIL and "carries no constraint" in res.evidence, res.evidence
    gone = {k: v for k, v in swapped.items() if k != "candidates"}
    res = check.check(RecordSet("sft", [gone]))
    assert res.status == Status.FAIL and "candidates are gone" in res.evidence
