"""DPO from the SFT policy on the embedded model (real TRL DPOTrainer, CPU): the reference is
the SFT policy (step-0 loss ln 2, rewards 0), the reward margin rises from ~0, only the
trained adapter is saved, and the run stops before step 1 when the reference is the
adapter-disabled base or the first batch is not canonical."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cai.errors import ConfigError, InvariantError
from cai.invariants.base import Status
from cai.invariants.training import ReferenceIdentity
from cai.pipeline import dpo, training
from test_sft import Slots, one_torch_thread, preference_records, run_config, sft_records  # noqa: F401 (fixture)

LN2 = math.log(2)


@pytest.fixture(scope="module")
def slots():
    s = Slots()
    yield s
    s.close()


@pytest.fixture(scope="module")
def sft_adapter(slots, tmp_path_factory):
    from cai.pipeline.sft import train_sft

    out = tmp_path_factory.mktemp("sft")
    return train_sft(run_config(sft={"max_steps": 4}), slots.get(), sft_records(), out)["adapter_dir"]


@pytest.fixture(scope="module")
def trained(slots, sft_adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo")
    cfg = run_config(dpo={"precompute_ref_log_probs": True})  # the precomputed path and its drift check
    result = dpo.train_dpo(cfg, slots.get(), preference_records(32), sft_adapter, out)
    points = json.loads((out / "loss_curve.json").read_text())["points"]
    return {"result": result, "out": out, "points": points}


def test_reward_margin_rises_from_zero(trained):
    points = trained["points"]
    assert [p["step"] for p in points] == list(range(1, 7))
    first = points[0]
    assert abs(first["loss"] - LN2) < 1e-3 and abs(first["rewards/margins"]) < 1e-3  # step 0: policy == reference
    margins = [p["rewards/margins"] for p in points]
    assert margins[-1] > 0.5 and max(margins[-3:]) > margins[0] + 0.5, margins
    assert points[-1]["loss"] < LN2 - 0.1


def test_reference_is_the_sft_policy_at_step_zero(trained):
    results = {r["name"]: r for r in trained["result"]["invariants"]}
    ref = results["dpo_reference_identity"]
    assert ref["status"] == "pass", ref["evidence"]
    assert "the frozen 'ref' adapter (copy of the SFT adapter), log-probs precomputed" in ref["evidence"]
    assert abs(ref["details"]["loss"] - LN2) < 1e-4 and ref["details"]["max_abs_reward"] < 1e-3
    sentinel = results["first_batch_sentinel"]
    assert sentinel["status"] == "pass", sentinel["evidence"]
    assert "prompt + chosen / prompt + rejected + '<|im_end|>'" in sentinel["evidence"]
    rows = sentinel["details"]
    half = len(rows) // 2
    assert [r["role"] for r in rows] == ["chosen"] * half + ["rejected"] * half
    assert [r["id"] for r in rows[:half]] == [r["id"] for r in rows[half:]]


def test_outputs_hold_only_the_trained_adapter(trained, sft_adapter):
    from safetensors.torch import load_file

    r, out = trained["result"], trained["out"]
    adapter = out / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 16
    new, old = load_file(str(adapter / "adapter_model.safetensors")), load_file(f"{sft_adapter}/adapter_model.safetensors")
    assert new.keys() == old.keys() and any(not torch.equal(new[k], old[k]) for k in new)
    tc = r["trainer_config"]
    assert tc["trainer"] == "trl.DPOTrainer" and tc["beta"] == 0.1 and tc["precompute_ref_log_probs"] is True
    assert tc["loss_type"] == ["sigmoid"] and tc["sft_adapter"].endswith("adapter")
    want = training.configured_trainer_settings(run_config(dpo={"precompute_ref_log_probs": True}), "dpo", 32, 1)
    assert {k: tc[k] for k in want} == want  # what verification expects
    assert r["stage"] == "dpo" and r["steps"] == 6 and r["records"] == 32
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "training.json").read_text())["adapter_dir"] == str(adapter)


def test_base_as_reference_fails_the_identity_check(slots, sft_adapter, tmp_path):
    """TRL's other reference: the base with adapters disabled (what `peft_config` +
    `ref_model=None` gives, and what TRL falls back to without a "ref" adapter)."""
    cfg = run_config(dpo={"precompute_ref_log_probs": False})
    slot = slots.get()
    with training.borrowed_base(slot, cfg, cfg.dpo) as base:
        policy = dpo.load_sft_policy(base, sft_adapter, cfg)
        trainer = dpo.build_dpo_trainer(cfg, policy, slot.tokenizer, preference_records(8), tmp_path)
        batch = training.first_batch(trainer)
        same = ReferenceIdentity().check(dpo.reference_logps(trainer, batch))
        policy.delete_adapter("ref")
        assert dpo.describe_reference(trainer) == "the base model with adapters disabled"
        other = ReferenceIdentity().check(dpo.reference_logps(trainer, batch))
        del trainer, policy
    assert same.status == Status.PASS, same.evidence
    assert "the frozen 'ref' adapter (copy of the SFT adapter)" in same.evidence
    assert other.status == Status.FAIL and "not the policy DPO starts from" in other.evidence
    assert abs(other.details["loss"] - LN2) > 1e-2 and other.details["max_abs_reward"] > 0.1


def test_run_with_base_as_reference_stops_before_step_one(slots, sft_adapter, monkeypatch, tmp_path):
    original = dpo.build_dpo_trainer

    def base_reference(*args, **kwargs):
        trainer = original(*args, **kwargs)
        trainer.model.delete_adapter("ref")
        return trainer

    monkeypatch.setattr(dpo, "build_dpo_trainer", base_reference)
    cfg = run_config(dpo={"precompute_ref_log_probs": False})
    with pytest.raises(InvariantError) as err:
        dpo.train_dpo(cfg, slots.get(), preference_records(8), sft_adapter, tmp_path)
    assert [r.name for r in err.value.results] == ["dpo_reference_identity"]
    assert "base model with adapters disabled" in err.value.results[0].evidence
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "loss_curve.json").exists()


def test_dpo_first_batch_with_a_chat_template_stops_the_run(slots, sft_adapter, raw_smol_tokenizer, monkeypatch,
                                                            tmp_path):
    from datasets import Dataset

    def chatml(pairs):
        return Dataset.from_list([{
            "prompt": raw_smol_tokenizer.apply_chat_template([{"role": "user", "content": p["instruction"]}],
                                                             tokenize=False, add_generation_prompt=True),
            "chosen": p["chosen"].strip(), "rejected": p["rejected"].strip()} for p in pairs])

    monkeypatch.setattr(dpo, "preference_dataset", chatml)
    with pytest.raises(InvariantError) as err:
        dpo.train_dpo(run_config(), slots.get(), preference_records(8), sft_adapter, tmp_path)
    failed = {r.name: r for r in err.value.results}
    assert "<|im_start|>system" in failed["first_batch_sentinel"].evidence
    assert not (tmp_path / "adapter").exists()


def test_dpo_lora_settings_must_match_the_sft_adapter(slots, sft_adapter, tmp_path):
    cfg = run_config(dpo={"lora": {"r": 8}})
    with pytest.raises(ConfigError, match="r: adapter 16 vs dpo.lora 8"):
        dpo.train_dpo(cfg, slots.get(), preference_records(8), sft_adapter, tmp_path)


def test_resume_without_precomputed_reference(slots, sft_adapter, tmp_path):
    """Checkpoints hold "default" and the frozen "ref" copy; resuming reloads both and the
    step count continues. The live (not precomputed) reference passes the identity check too."""
    pairs = preference_records(8)
    cfg = run_config(dpo={"max_steps": 1, "save_steps": 1, "precompute_ref_log_probs": False})
    first = dpo.train_dpo(cfg, slots.get(), pairs, sft_adapter, tmp_path)
    ref = {r["name"]: r for r in first["invariants"]}["dpo_reference_identity"]
    assert ref["status"] == "pass" and "log-probs precomputed" not in ref["evidence"]
    cfg = run_config(dpo={"max_steps": 2, "save_steps": 1, "precompute_ref_log_probs": False})
    second = dpo.train_dpo(cfg, slots.get(), pairs, sft_adapter, tmp_path, resume=True)
    assert second["resumed_from"].endswith("checkpoint-1") and (second["steps"], second["steps_this_run"]) == (2, 1)


def test_the_reference_is_precomputed_when_training_draws_every_pair():
    """Unset, `precompute_ref_log_probs` precomputes exactly when the per-step reference would
    cost at least as many forward passes (steps x effective batch >= pairs); set, it is obeyed."""
    section = run_config().dpo  # batch 4, 6 steps
    assert dpo.precompute_reference(section, n_pairs=24) is True
    assert dpo.precompute_reference(section, n_pairs=25) is False
    assert dpo.precompute_reference(section, n_pairs=25, world_size=2) is True
    assert dpo.precompute_reference(section.model_copy(update={"max_steps": -1}), n_pairs=10_000) is True
    assert dpo.precompute_reference(section.model_copy(update={"precompute_ref_log_probs": True}), n_pairs=10_000) is True
    assert dpo.precompute_reference(section.model_copy(update={"precompute_ref_log_probs": False}), n_pairs=1) is False
