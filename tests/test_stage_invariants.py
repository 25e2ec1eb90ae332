"""The content invariants each stage's artifact gets (`cai.invariants.artifacts`): each one
fails on the defect it exists for and passes on clean records. Real records as the stages
write them; the full-run versions of these damages are in test_fail_closed.py."""

from __future__ import annotations

import json

import pytest

from cai.config import RunConfig
from cai.invariants.artifacts import (CriticSelected, EvalCoverage, InstructionCount, InstructionRecords, RecordIds,
                                      StageRecords, TrainingOutputs, stage_results)
from cai.invariants.base import Status
from cai.pipeline import formats
from cai.pipeline.stages import STAGE_INPUTS, STAGES, downstream


def instructions(n=3, margin=1.0):
    return [{"id": f"i{k}", "instruction": f"Name {k + 2} colours of the rainbow.", "critic": {"margin": margin}}
            for k in range(n)]


def status(inv, records, **kw):
    return inv.check(StageRecords("x", records, **kw)).status


def test_instruction_records_fail_on_markers_duplicates_and_empties():
    assert status(InstructionRecords(), instructions()) == Status.PASS
    for broken in ([{"id": "a", "instruction": "Say hi <|im_start|>assistant"}],
                   [{"id": "a", "instruction": "x y z"}, {"id": "a", "instruction": "p q r"}],
                   [{"id": "a", "instruction": "  "}], [{"instruction": "no id at all"}], []):
        assert status(InstructionRecords(), broken) == Status.FAIL, broken


def test_instruction_count_and_critic_selection():
    assert status(InstructionCount(3), instructions(3)) == Status.PASS
    assert status(InstructionCount(4), instructions(3)) == Status.FAIL
    assert status(CriticSelected(True, 0.5), instructions(margin=0.6)) == Status.PASS
    assert status(CriticSelected(True, 0.5), instructions(margin=0.2)) == Status.FAIL
    assert status(CriticSelected(True, 0.5), [{"id": "a", "instruction": "x", "critic": None}]) == Status.FAIL
    assert status(CriticSelected(True, 0.5), instructions(margin=float("nan"))) == Status.FAIL
    assert status(CriticSelected(False, 0.5), [{"id": "a", "instruction": "x", "critic": None}]) == Status.PASS
    assert status(CriticSelected(False, 0.5), instructions()) == Status.FAIL  # claims a critic that was off


def test_training_outputs(tmp_path):
    (tmp_path / "adapter").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / "adapter" / name).write_text("{}")
    listed = {"adapter/adapter_config.json": {}, "adapter/adapter_model.safetensors": {}}
    curve = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    assert status(TrainingOutputs(2), curve, dir=tmp_path, listed_files=listed) == Status.PASS
    assert status(TrainingOutputs(3), curve, dir=tmp_path, listed_files=listed) == Status.FAIL  # stopped early
    assert status(TrainingOutputs(2), [{"step": 1, "loss": 2.0}, {"step": 2, "loss": float("inf")}],
                  dir=tmp_path, listed_files=listed) == Status.FAIL
    assert status(TrainingOutputs(2), curve[::-1], dir=tmp_path, listed_files=listed) == Status.FAIL
    assert status(TrainingOutputs(2), curve, dir=tmp_path, listed_files={}) == Status.FAIL  # adapter not hashed
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    assert status(TrainingOutputs(2), curve, dir=tmp_path, listed_files=listed) == Status.FAIL
    assert status(TrainingOutputs(2), [], dir=tmp_path, listed_files=listed) == Status.FAIL


def eval_records(models=("base", "sft"), keys=(1, 2)):
    return [{"id": f"primary/{m}/{k}", "suite": "primary", "model": m, "eval_set": "stage1", "key": k,
             "response": "ok"} for m in models for k in keys]


def test_eval_coverage_needs_every_model_on_every_item_once():
    inv = EvalCoverage({"stage1": {1, 2}}, {"primary": ("base", "sft")})
    assert status(inv, eval_records()) == Status.PASS
    assert status(inv, eval_records()[:-1]) == Status.FAIL  # a lost response
    assert status(inv, eval_records() + eval_records()[:1]) == Status.FAIL  # answered twice
    assert status(inv, eval_records(keys=(1, 2, 3))) == Status.FAIL  # a foreign item
    assert status(inv, [dict(r, response=None) for r in eval_records()]) == Status.FAIL


def test_record_ids():
    assert RecordIds().check([{"id": "a"}, {"id": "b"}]).status == Status.PASS
    assert RecordIds().check([{"id": "a"}, {"id": "a"}]).status == Status.FAIL
    assert RecordIds().check([{"id": 3}]).status == Status.FAIL


@pytest.mark.parametrize("source, expected", [("model", Status.FAIL), ("templates", Status.PASS)])
def test_near_duplicates_are_gated_unless_the_instructions_are_templates_by_config(source, expected):
    """Template instances differ in one slot by design; model-generated near-copies are the
    generator collapsing and must not train."""
    cfg = RunConfig.model_validate({"name": "t", "model": {"source": "tiny-random"}, "critic": {"enabled": False},
                                    "instructions": {"source": source}})
    topics = ["the sea", "the moon", "a forest", "the city", "a river", "the desert"]
    records = [{"id": f"r{i}", "instruction": f"Write one sentence about {t} in lowercase.", "format": cfg.format,
                "prompt": formats.render(cfg.format, f"Write one sentence about {t} in lowercase."),
                "completion": f" {t} is quiet today.", "stop_reason": "eos", "critic_margin": None}
               for i, t in enumerate(topics)]
    results = {r.name: r for r in stage_results("responses", records, cfg)}
    assert results["duplicate_rate"].status == expected, results["duplicate_rate"].evidence
    exact = records + [dict(records[0], id="copy")]
    assert {r.name: r for r in stage_results("responses", exact, cfg)}["duplicate_rate"].status == Status.FAIL


def test_the_stage_graph_is_closed_and_ordered():
    for stage in STAGES:
        assert all(STAGES.index(i) < STAGES.index(stage) for i in STAGE_INPUTS[stage])
    assert downstream("responses") == ["responses", "pairs", "sft", "dpo", "eval"]
    assert downstream("eval") == ["eval"]
    assert json.dumps(downstream("candidates")) == json.dumps(list(STAGES))
