"""Instruction generation: list parser, ROUGE-L and dedup (hypothesis), type tags, seed pool,
templates, and a real run on the embedded model (deduplicated, parseable, resumable)."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from cai.config import ModelConfig, RunConfig  # noqa: E402
from cai.errors import CaiError  # noqa: E402
from cai.pipeline import formats  # noqa: E402
from cai.pipeline.generation import HFGenerator  # noqa: E402
from cai.pipeline.instructions import (  # noqa: E402
    CONSTRAINT_FAMILIES,
    FILTERS,
    TEMPLATES,
    TYPES,
    CandidateFilter,
    NearDupIndex,
    add_constraints,
    decontamination_index,
    generate_instructions,
    infer_type,
    lcs_length,
    load_seeds,
    normalise,
    parse_numbered_continuation,
    rouge_l,
    rouge_tokens,
    target_count,
)
from cai.pipeline.models import ModelSlot  # noqa: E402
from cai.pipeline.store import ArtifactWriter  # noqa: E402

words = st.text(alphabet="abcdeABCDE xyz,.!?'", min_size=0, max_size=30)
line_items = st.text(alphabet=st.characters(blacklist_characters="\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029",
                                            blacklist_categories=("Cs",)), max_size=40)


# ---------------------------------------------------------------------------- parser


@settings(max_examples=300, deadline=None)
@given(st.lists(line_items, min_size=1, max_size=5), st.integers(1, 20), st.booleans(), st.booleans())
def test_parser_recovers_items(items, first, ended, trailing_newline):
    text = " " + items[0] + "".join(f"\n{first + i}. {x}" for i, x in enumerate(items[1:], start=1))
    if trailing_newline:
        text += "\n"
    parsed = parse_numbered_continuation(text, first, ended=ended)
    assert [p for p, _ in parsed] == [normalise(x) for x in items]
    # every item but the last is followed by a line break; the last is complete iff it ended or has one
    assert all(c for _, c in parsed[:-1])
    assert parsed[-1][1] == (ended or trailing_newline)


@settings(max_examples=200, deadline=None)
@given(st.lists(line_items, min_size=2, max_size=5), st.integers(1, 20), st.integers(0, 3))
def test_parser_stops_at_a_break_in_numbering(items, first, gap_at):
    gap_at = min(gap_at, len(items) - 2) + 1
    lines = [" " + items[0]]
    for i, x in enumerate(items[1:], start=1):
        number = first + i + (5 if i >= gap_at else 0)
        lines.append(f"{number}. {x}")
    parsed = parse_numbered_continuation("\n".join(lines), first, ended=True)
    assert [p for p, _ in parsed] == [normalise(x) for x in items[:gap_at]]


def test_parser_examples():
    assert parse_numbered_continuation(" Write a poem.\n8. Name two cats.\n9. Tru", 7, ended=False) == [
        ("Write a poem.", True), ("Name two cats.", True), ("Tru", False)]
    assert parse_numbered_continuation(" A\n\nSomething else", 7, ended=True) == [("A", True)]
    assert parse_numbered_continuation(" A  b\tc\n8.", 7, ended=True) == [("A b c", True), ("", True)]


# ---------------------------------------------------------------------------- ROUGE-L / dedup


@settings(max_examples=300, deadline=None)
@given(words, words)
def test_rouge_l_symmetric_and_bounded(a, b):
    assert rouge_l(a, b) == rouge_l(b, a)
    assert 0.0 <= rouge_l(a, b) <= 1.0


@settings(max_examples=200, deadline=None)
@given(words)
def test_rouge_l_identity(a):
    assert rouge_l(a, a) == (1.0 if rouge_tokens(a) else 0.0)
    assert rouge_l(a, a.upper() + " ") == rouge_l(a, a)  # lowercase tokens, punctuation ignored


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from("abcd"), max_size=8), st.lists(st.sampled_from("abcd"), max_size=8))
def test_lcs_bounds(a, b):
    n = lcs_length(a, b)
    assert 0 <= n <= min(len(a), len(b))
    assert n <= sum((Counter(a) & Counter(b)).values())


def test_rouge_l_matches_rouge_score_package():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer", reason="rouge-score not installed")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pairs = [("Write a poem about the sea.", "Write a short poem about the ocean."),
             ("List three fruits", "Name 3 vegetables, please!"), ("a b c d", "d c b a"), ("Hello", "")]
    for a, b in pairs:
        assert rouge_l(a, b) == pytest.approx(scorer.score(a, b)["rougeL"].fmeasure)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["write", "a", "poem", "about", "the", "sea", "list", "three"]),
                         min_size=1, max_size=6).map(" ".join), min_size=1, max_size=6),
       st.sampled_from([0.5, 0.7, 0.9]))
def test_near_dup_index_equals_brute_force(texts, threshold):
    index = NearDupIndex(threshold)
    for t in texts[:-1]:
        index.add(t)
    query = texts[-1]
    found = index.match(query)
    brute = [t for t in texts[:-1] if rouge_l(query, t) >= threshold]
    assert (found is not None) == bool(brute)
    if found is not None:
        assert found[1] >= threshold and found[0] in brute


# ---------------------------------------------------------------------------- seeds, types, templates


def test_seed_pool():
    seeds = load_seeds()
    assert len(seeds) >= 60
    assert len({s["instruction"] for s in seeds}) == len(seeds)
    kinds = Counter(s["type"] for s in seeds)
    assert set(kinds) <= set(TYPES) and len(kinds) >= 12
    assert sum(v for k, v in kinds.items() if k != "open") >= 0.8 * len(seeds)  # mostly verifiable
    for s in seeds:
        formats.render("instruction_response", s["instruction"])


def test_type_tagger_agrees_with_seed_labels():
    wrong = [(s["type"], infer_type(s["instruction"]), s["instruction"]) for s in load_seeds()
             if infer_type(s["instruction"]) != s["type"]]
    assert not wrong


def test_type_tagger_examples():
    assert infer_type("Answer in under 20 words: what is rain?") == "words"
    assert infer_type("Write a poem in all lowercase letters.") == "lowercase"
    assert infer_type("Tell me a joke.") == "open"


def _cfg(**instructions) -> RunConfig:
    return RunConfig.model_validate({"name": "test", "seed": 3, "instructions": instructions})


def test_templates_source(tmp_path):
    cfg = _cfg(source="templates", n=10, overgenerate=2.0)
    w = ArtifactWriter(tmp_path / "a", "instructions", config_hash=cfg.hash())
    stats = generate_instructions(cfg, None, w)
    recs = w.done
    assert len(recs) == target_count(cfg) == 20 == stats["n_written"]
    assert all(r["source"] == "templates" for r in recs)
    assert len({r["id"] for r in recs}) == len({r["instruction"] for r in recs}) == 20
    assert all(infer_type(r["instruction"]) == r["type"] for r in recs)
    # resume after a crash that kept 7 records gives the same artifact
    w2 = ArtifactWriter(tmp_path / "b", "instructions", config_hash=cfg.hash())
    w2.extend(recs[:7])
    w2.close()
    w3 = ArtifactWriter(tmp_path / "b", "instructions", config_hash=cfg.hash(), resume=True)
    generate_instructions(cfg, None, w3)
    assert w3.done == recs
    assert len(TEMPLATES) * 30 >= 300


# ---------------------------------------------------------------------------- embedded model

MODEL_CFG = dict(n=2, overgenerate=1.5, seeds_per_prompt=3, max_new_tokens=28, batch_size=4, max_rounds=3)


@pytest.fixture(scope="module")
def gen():
    with ModelSlot(ModelConfig(source="embedded")) as slot:
        yield HFGenerator(slot.model, slot.tokenizer, batch_size=4)


@pytest.fixture(scope="module")
def generated(gen, tmp_path_factory):
    cfg = _cfg(**MODEL_CFG)
    w = ArtifactWriter(tmp_path_factory.mktemp("inst") / "a", "instructions", config_hash=cfg.hash())
    stats = generate_instructions(cfg, gen, w)
    return cfg, list(w.done), stats


def test_model_instructions_are_parseable_and_deduplicated(generated):
    cfg, recs, stats = generated
    assert len(recs) == target_count(cfg) == stats["n_written"]
    assert len({r["id"] for r in recs}) == len(recs)
    seeds = [s["instruction"] for s in load_seeds()]
    for i, r in enumerate(recs):
        assert r["source"] == "model" and r["type"] in TYPES and r["type"] == infer_type(r["instruction"])
        assert r["instruction"] == normalise(r["instruction"])
        assert cfg.instructions.min_words <= len(r["instruction"].split()) <= cfg.instructions.max_words
        formats.render(cfg.format, r["instruction"])
        assert set(r["generation"]) >= {"stop_reason", "round"}
        others = seeds + [o["instruction"] for o in recs[:i]]
        assert max(rouge_l(r["instruction"], o) for o in others) < cfg.instructions.dedup_threshold
    counts = stats["counts"]
    assert counts["kept"] == len(recs)
    assert counts["parsed"] == counts["kept"] + sum(counts[f] for f in FILTERS)


def test_model_instructions_resume_equals_uninterrupted(gen, generated, tmp_path):
    cfg, recs, _ = generated
    w = ArtifactWriter(tmp_path / "r", "instructions", config_hash=cfg.hash())
    w.extend(recs[:1])  # "crash" after the first record
    w.close()
    resumed = ArtifactWriter(tmp_path / "r", "instructions", config_hash=cfg.hash(), resume=True)
    generate_instructions(cfg, gen, resumed)
    assert resumed.done == recs


def test_candidate_copying_an_eval_item_is_dropped_as_contaminated():
    """Decontamination where instructions are made: a continuation that copies a Stage-1 item
    (behind its own lead-in) loses that item, keeps its clean neighbour, and is counted."""
    from cai.pipeline.compare import load_eval_set

    cfg = _cfg(n=4, seeds_per_prompt=3)
    stage1 = load_eval_set("stage1")[7]["instruction"]
    clean = "Write a short haiku about a lighthouse in winter."
    filt = CandidateFilter(cfg, load_seeds())
    raw = {"round": 0, "prompt_index": 0, "seed_ids": [0, 1, 2], "stop_reason": "stop",
           "text": f" Please help: {stage1}\n5. {clean}\n"}
    kept = filt.feed([raw])
    assert [r["instruction"] for r in kept] == [clean]
    assert filt.counts["contaminated"] == 1 and filt.counts["parsed"] == 2
    # the run's own invariant agrees with the filter on both items
    index = decontamination_index(cfg)
    assert index.match(f"Please help: {stage1}") is not None and index.match(clean) is None


def _open_records(n: int) -> list[dict]:
    tasks = ["Describe a quiet morning in a small fishing village.", "Explain how a bicycle gear works.",
             "Tell a short story about a lost umbrella.", "Suggest a weekend plan for a rainy city."]
    return [{"id": f"inst-r000-p{i:04d}-i0", "instruction": tasks[i % len(tasks)], "type": "open", "source": "model",
             "critic": {"margin": 0.2}} for i in range(n)]


def test_constraints_come_from_the_checker_and_gate_responses():
    from cai.pipeline.responses import verifiable_constraint

    cfg = _cfg(n=4, constraints=1.0)
    recs = _open_records(12) + [{"id": "x", "instruction": "Write a poem in all capital letters.", "type": "uppercase",
                                  "source": "model", "critic": {"margin": 0.3}}]
    out, stats = add_constraints(cfg, recs)
    assert out == add_constraints(cfg, recs)[0]  # seeded per record
    assert out[-1] == recs[-1]  # a stated constraint is not stacked with another
    assert stats["added"] == 12 and sum(stats["families"].values()) == 12 and len(stats["families"]) > 3
    for before, after in zip(recs, out[:-1]):
        assert after["task"] == before["instruction"] and after["instruction"].startswith(before["instruction"] + " ")
        assert after["critic"] == before["critic"] and after["type"] == CONSTRAINT_FAMILIES[after["instruction_id_list"][0]]
        gate = verifiable_constraint(after)  # the kwargs are complete: the checker draws nothing
        assert gate["source"] == "record" and gate["instruction_id_list"] == after["instruction_id_list"]
    assert add_constraints(_cfg(n=4), recs) == (recs, {"share": 0.0, "added": 0})


def test_a_constraint_that_would_copy_an_eval_item_is_not_added(tmp_path):
    """Decontamination covers the constrained text too: a 12-word task, and an eval set
    holding that task followed by the first word of every family's constraint, so each
    constrained text shares a 13-gram with an item: the task is left as it was, and counted."""
    from cai.pipeline.evaluate import describe_constraint

    task = "Describe a quiet morning in a small fishing village near the sea."
    rec = dict(_open_records(1)[0], instruction=task)
    firsts = {describe_constraint(iid, 0)[0].split()[0] for iid in CONSTRAINT_FAMILIES}
    items = [{"key": k, "prompt": f"{task} {word} now.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
             for k, word in enumerate(sorted(firsts), start=1)]
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    cfg = RunConfig.model_validate({"name": "t", "instructions": {"n": 1, "constraints": 1.0},
                                    "eval": {"sets": [str(path)]}})
    out, stats = add_constraints(cfg, [rec])
    assert out == [rec] and stats["left_contaminated"] == 1 and stats["added"] == 0
    clean = RunConfig.model_validate({"name": "t", "instructions": {"n": 1, "constraints": 1.0}})
    assert add_constraints(clean, [rec])[1]["added"] == 1


def test_shortfall_is_an_error_with_counts(gen, tmp_path):
    cfg = _cfg(**dict(MODEL_CFG, max_new_tokens=3, max_rounds=1))  # every item is cut by the token limit
    w = ArtifactWriter(tmp_path / "s", "instructions", config_hash=cfg.hash())
    with pytest.raises(CaiError, match=r"0 of 3 candidates after 1 rounds.*truncated \d+"):
        generate_instructions(cfg, gen, w)
