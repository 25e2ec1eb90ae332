"""Responses (few-shot completion, best-of-N by the critic) and preference pairs."""

from __future__ import annotations

import hashlib
import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from cai.config import ModelConfig, RunConfig  # noqa: E402
from cai.pipeline import formats  # noqa: E402
from cai.pipeline.generation import HFGenerator  # noqa: E402
from cai.pipeline.models import ModelSlot  # noqa: E402
from cai.pipeline.pairs import build_pairs, ignore_constraint, over_verbose, run_pairs, truncate_midway  # noqa: E402
from cai.pipeline.responses import (fewshot_for, fewshot_prompt, load_fewshot_examples, run_responses,  # noqa: E402
                                    shortfall_error)
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
    assert stats["skipped"] == {"critic_below_min_margin": 1, "critic_identical": 1}
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
