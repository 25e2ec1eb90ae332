"""The shipped Stage-1 evaluation set: schema, coverage, checker-valid kwargs, and that
hand-written correct answers pass (and wrong ones fail) the canonical scorer."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from cai.pipeline import evaluate as ev

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def items() -> list[dict]:
    return ev.load_ifeval_prompts(ev.STAGE1_EVAL_SET)


@pytest.fixture(scope="module")
def by_key(items) -> dict:
    return {it["key"]: it for it in items}


def test_schema_size_and_coverage(items):
    assert len(items) >= 150
    keys = [it["key"] for it in items]
    assert len(set(keys)) == len(keys)
    for it in items:
        assert set(it) == {"key", "prompt", "instruction_id_list", "kwargs", "instruction", "source"}
        assert it["instruction"] == it["prompt"] and it["prompt"].strip()
        assert it["source"] == "cai-handwritten-stage1-v1"
        assert len(it["kwargs"]) == len(it["instruction_id_list"])
    types = Counter(i for it in items for i in it["instruction_id_list"])
    assert len(types) >= 10
    assert min(types.values()) >= 5, types


def test_every_instruction_is_supported_and_fully_specified(items):
    from lm_eval.tasks.ifeval import instructions_registry

    supported = set(ev.supported_instruction_ids())
    for it in items:
        for iid, kwargs in zip(it["instruction_id_list"], it["kwargs"]):
            assert iid in supported, (it["key"], iid)
            checker = instructions_registry.INSTRUCTION_DICT[iid](iid)
            checker.build_description(**kwargs)  # accepted as given, no TypeError/ValueError
            assert all(v for v in kwargs.values()), (it["key"], kwargs)  # lm-eval drops falsy values
            assert set(checker.get_instruction_args_keys()) == set(kwargs), (it["key"], iid)
        # no argument missing, none replaced by a random value
        assert ev.validate_item(it) == [], it["key"]


def test_committed_file_matches_generator():
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_eval_set.py"), "--check"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# Hand-written answers for a few items (keys are stable: the generator is deterministic).
GOOD = {
    1: "the rain tapped softly on the window all night while the town slept.",
    11: "THE THUNDER ROLLED ACROSS THE VALLEY. WE STAYED INSIDE AND WATCHED THE LIGHTNING.",
    20: "My favourite meal is a warm bowl of soup with fresh bread. I eat it slowly on cold evenings.",
    30: "* apple\n* banana\n* cherry",
    40: "Sunlight scatters off air molecules, and blue light scatters most.",
}
BAD = {
    1: "The rain tapped softly on the window all night.",  # capital letter
    11: "The thunder rolled across the valley.",  # not capitals
    20: "My favourite meal is soup, bread, and cheese.",  # commas
    30: "* apple\n* banana",  # two bullets, not three
    40: "Sunlight is made of many colors, and when it passes through the air the small molecules "
        "scatter the short blue waves much more than the long red ones, so we see blue everywhere.",
}


def test_hand_written_answers(by_key):
    for key, text in GOOD.items():
        assert ev.score_item(by_key[key], text)["prompt_level_strict"], (key, by_key[key]["prompt"])
    for key, text in BAD.items():
        assert not ev.score_item(by_key[key], text)["prompt_level_loose"], (key, by_key[key]["prompt"])


def _first(items, iid):
    return next(it for it in items if it["instruction_id_list"] == [iid])


def test_hand_written_answers_per_type(items):
    """One correct answer per instruction type, written from the item's kwargs."""
    answers = {
        "keywords:existence": lambda kw: f"We walked on the {kw['keywords'][0]} and listened to the {kw['keywords'][1]}.",
        "keywords:forbidden_words": lambda kw: "It rises every morning. It warms the land.",
        "keywords:frequency": lambda kw: " ".join([f"The {kw['keyword']} is here."] * kw["frequency"]),
        "startend:end_checker": lambda kw: f"I will rest and read a book. {kw['end_phrase']}",
        "startend:quotation": lambda kw: '"Good friends make hard days easier."',
        "detectable_format:title": lambda kw: "<<The Wind>>\nIt moves the trees\nIt fills the sails\nIt cools the fields\nIt hums at night",
        "detectable_content:postscript": lambda kw: "Hi Sam, the holiday was lovely.\n\nP.S. I bought you a shell.",
        "detectable_format:json_format": lambda kw: '{"name": "banana", "color": "yellow"}',
        "detectable_format:constrained_response": lambda kw: "My answer is yes.",
        "detectable_format:number_highlighted_sections": lambda kw: " ".join(
            f"*point {i}* matters." for i in range(kw["num_highlights"])
        ),
        "length_constraints:number_paragraphs": lambda kw: "\n***\n".join(
            f"Paragraph {i} has a few words." for i in range(kw["num_paragraphs"])
        ),
        "detectable_content:number_placeholders": lambda kw: "Dear [name], see you at [place] on [date].",
        "combination:repeat_prompt": lambda kw: f"{kw['prompt_to_repeat']} Blue.",
        "length_constraints:number_sentences": lambda kw: "A rainbow forms when sunlight passes through raindrops.",
    }
    for iid, make in answers.items():
        item = _first(items, iid)
        result = ev.score_item(item, make(item["kwargs"][0]))
        assert result["prompt_level_strict"], (iid, item["prompt"])
        # an empty answer never follows an instruction
        assert not ev.score_item(item, "")["prompt_level_loose"], iid


# --------------------------------------------------------------------------- several sets


def _write_set(path: Path, iid: str, n: int = 2) -> str:
    import json

    path.write_text("".join(json.dumps({"key": k, "prompt": f"Say something about item {k} ({iid}).",
                                        "instruction_id_list": [iid], "kwargs": [{}]}) + "\n" for k in range(n)))
    return str(path)


@pytest.fixture
def two_sets(tmp_path) -> list[dict]:
    """Two eval sets in the IFEval schema that share their keys (0 and 1)."""
    from cai.pipeline.compare import load_eval_set

    return (load_eval_set(_write_set(tmp_path / "a.jsonl", "punctuation:no_comma"))
            + load_eval_set(_write_set(tmp_path / "b.jsonl", "change_case:english_lowercase")))


def test_eval_records_are_keyed_by_set_and_cover_both_sets(tmp_path, two_sets):
    """Real generation (tiny-random): one record per (suite, model, set, key), ids naming the
    set, so a resumed run never takes set b's item 0 for set a's; EvalCoverage counts both."""
    from cai.config import RunConfig
    from cai.invariants.artifacts import EvalCoverage, StageRecords
    from cai.invariants.base import Status
    from cai.pipeline.compare import generate_eval_responses
    from cai.pipeline.models import ModelSlot
    from cai.pipeline.store import ArtifactWriter

    cfg = RunConfig.model_validate({"name": "t", "model": {"source": "tiny-random"},
                                    "eval": {"suites": ["primary"], "max_new_tokens": 4, "batch_size": 4}})
    writer = ArtifactWriter(tmp_path / "eval", "eval", config_hash="x", seed=0, inputs=[])
    with ModelSlot(cfg.model) as slot:
        generate_eval_responses(cfg, slot, two_sets, ["base"], writer)
    ids = [r["id"] for r in writer.done]
    assert sorted(ids) == sorted(f"primary/base/{it['eval_set']}/{it['key']}" for it in two_sets)
    assert len(set(ids)) == 4
    sets = {it["eval_set"] for it in two_sets}
    check = EvalCoverage({s: {0, 1} for s in sets}, {"primary": ("base",)})
    assert check.check(StageRecords("eval", writer.done)).status == Status.PASS
    assert check.check(StageRecords("eval", writer.done[:3])).status == Status.FAIL


def test_prompt_parity_keys_items_by_set(two_sets):
    """Identical prompts given in a different order pass; keyed by `key` alone, set a's and
    set b's item 0 tie and the order of the tie changed the hash (a false failure)."""
    from cai.invariants.base import Status
    from cai.invariants.parity import PromptsIdenticalAcrossModels

    def recs(model, items):
        return [{"suite": "primary", "model": model, "eval_set": it["eval_set"], "key": it["key"],
                 "prompt": it["prompt"]} for it in items]

    same = recs("base", two_sets) + recs("sft", list(reversed(two_sets)))
    assert PromptsIdenticalAcrossModels().check(same).status == Status.PASS
    keyless = [{k: v for k, v in r.items() if k != "eval_set"} for r in same]
    assert PromptsIdenticalAcrossModels().check(keyless).status == Status.FAIL
    changed = same[:-1] + [dict(same[-1], prompt=same[-1]["prompt"] + " ")]
    r = PromptsIdenticalAcrossModels().check(changed)
    assert r.status == Status.FAIL and "a.jsonl', 0)" in r.details["problems"][0]


def test_ifeval_is_not_an_alias():
    """No IFEval data ships offline (lm-eval's package has none): 'ifeval' is read as a path
    and refused, and the config no longer advertises it."""
    from cai.config import EvalConfig
    from cai.errors import BadInputError
    from cai.pipeline.compare import load_eval_set

    with pytest.raises(BadInputError, match="ifeval: file not found"):
        load_eval_set("ifeval")
    assert "'ifeval'" not in EvalConfig.model_fields["sets"].description
