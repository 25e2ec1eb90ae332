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


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_training_outputs_compare_the_trainers_settings_with_the_config(tmp_path, stage):
    """What the trainer read back (training.json) must be what the config resolves to; a
    setting the trainer did not get, a relabelled config or an unhashed summary fails."""
    from cai.pipeline.training import configured_trainer_settings

    cfg = RunConfig.model_validate({"name": "t", "model": {"source": "tiny-random"}, "dpo": {"max_steps": 2}})
    (tmp_path / "adapter").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / "adapter" / name).write_text("{}")
    listed = {"adapter/adapter_config.json": {}, "adapter/adapter_model.safetensors": {}, "training.json": {}}
    curve = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    trainer = dict(configured_trainer_settings(cfg, stage, 16, 1), world_size=1, optimizer="adamw_torch_fused")

    def outcome(settings, files=listed):
        (tmp_path / "training.json").write_text(json.dumps({"records": 16, "trainer_config": settings}))
        inv = TrainingOutputs(getattr(cfg, stage).max_steps, None, cfg=cfg, stage=stage)
        return status(inv, curve, dir=tmp_path, listed_files=files)

    max_steps = getattr(cfg, stage).max_steps
    if max_steps > 0:
        curve = [{"step": k, "loss": 1.0} for k in range(1, max_steps + 1)]
    assert outcome(trainer) == Status.PASS
    assert outcome({**trainer, "learning_rate": trainer["learning_rate"] * 10}) == Status.FAIL
    assert outcome({**trainer, "gradient_checkpointing": 1}) == Status.FAIL  # 1 == True, but not a bool
    assert outcome({**trainer, "batch_size": 1}) == Status.FAIL
    assert outcome({k: v for k, v in trainer.items() if k != "seed"}) == Status.FAIL
    assert outcome(trainer, files={k: v for k, v in listed.items() if k != "training.json"}) == Status.FAIL
    (tmp_path / "training.json").write_text("{not json")
    inv = TrainingOutputs(max_steps, None, cfg=cfg, stage=stage)
    assert status(inv, curve, dir=tmp_path, listed_files=listed) == Status.FAIL
    if stage == "dpo":
        assert outcome({**trainer, "beta": 0.3}) == Status.FAIL
        assert outcome({**trainer, "precompute_ref_log_probs": not trainer["precompute_ref_log_probs"]}) == Status.FAIL
        assert outcome({**trainer, "loss_type": ["ipo"]}) == Status.FAIL


def eval_records(models=("base", "sft"), keys=(1, 2)):
    return [{"id": f"primary/{m}/{k}", "suite": "primary", "model": m, "eval_set": "stage1", "key": k,
             "response": "ok"} for m in models for k in keys]


def test_eval_decoding_as_configured_fails_on_another_cap_or_uncut_stops():
    from cai.invariants.artifacts import EvalDecodingAsConfigured
    from cai.pipeline.compare import generation_settings

    cfg = RunConfig.model_validate({"name": "t", "model": {"source": "tiny-random"}, "eval": {"max_new_tokens": 8}})
    inv = EvalDecodingAsConfigured({s: generation_settings(cfg, s) for s in cfg.eval.suites})
    stop = generation_settings(cfg, "primary")["stop"][0]
    rows = [{"id": "a", "suite": "primary", "response": "One.", "stop_reason": "eos", "n_new_tokens": 3},
            {"id": "b", "suite": "primary", "response": "Two two two", "stop_reason": "length", "n_new_tokens": 8},
            {"id": "c", "suite": "primary", "response": "Three", "stop_reason": "stop", "n_new_tokens": 8},
            {"id": "d", "suite": "raw_probe", "response": f"Four{stop}", "stop_reason": "eos", "n_new_tokens": 2}]
    assert status(inv, rows) == Status.PASS  # raw_probe stops at a blank line only
    for damaged in ({"n_new_tokens": 9}, {"n_new_tokens": 5, "stop_reason": "length"},
                    {"n_new_tokens": 8, "stop_reason": "eos"}, {"response": f"One.{stop} Two."},
                    {"stop_reason": "max"}, {"n_new_tokens": True}, {"n_new_tokens": None}):
        assert status(inv, [{**rows[0], **damaged}] + rows[1:]) == Status.FAIL, damaged


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
