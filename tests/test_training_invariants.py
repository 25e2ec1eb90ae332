"""Trainer invariants: the first-batch sentinel (exact canonical text, loss mask, no BOS /
control ids but the final EOS), the DPO step-0 reference identity, the truncation warning,
record validation and the DPO beta range. Unit cases on hand-built batches with the real
tokenizer, then the sentinel stopping real SFTTrainer runs before step 1 when a chat
template or a BOS gets in."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
from pydantic import ValidationError

from cai.config import DPOConfig, RunConfig
from cai.errors import BadInputError, ChatTemplateDisabledError, InvariantError
from cai.invariants.base import Status
from cai.invariants.training import (
    Example, FirstBatch, FirstBatchSentinel, ReferenceIdentity, ReferenceLogps, TokenLengths, TrainingTruncation)
from cai.pipeline import training
from cai.pipeline.models import encode
from test_sft import Slots, one_torch_thread, preference_records, run_config, sft_records  # noqa: F401 (fixture)

EOS = "<|im_end|>"


# --------------------------------------------------------------------------- hand-built batches


def examples(kind="sft", n=3):
    recs = sft_records(n) if kind == "sft" else preference_records(n)
    return training.canonical_examples(recs, kind, "instruction_response", EOS)


def collate(tok, rows, *, trained_from=None, pad_to=None):
    """Right-padded batch like TRL's collators. rows: (prompt_text, completion_text); the
    loss covers completion tokens (from the prompt's token count on) unless overridden."""
    ids, masks = [], []
    for prompt, completion in rows:
        full = encode(tok, prompt + completion)
        start = len(encode(tok, prompt)) if trained_from is None else trained_from
        ids.append(full)
        masks.append([0] * start + [1] * (len(full) - start))
    width = pad_to or max(map(len, ids))
    pad = tok.pad_token_id
    return {"input_ids": [r + [pad] * (width - len(r)) for r in ids],
            "attention_mask": [[1] * len(r) + [0] * (width - len(r)) for r in ids],
            "loss_mask": [m + [0] * (width - len(m)) for m in masks]}


def sft_batch(tok, exs, rows, **kw):
    b = collate(tok, rows, **kw)
    labels = [[t if m else -100 for t, m in zip(r, mm)] for r, mm in zip(b["input_ids"], b["loss_mask"])]
    return FirstBatch("sft", b["input_ids"], b["attention_mask"], b["loss_mask"], exs, tok, EOS, labels=labels,
                      max_length=64)


def canonical_rows(exs, role="completion"):
    return [(ex.prompt, ex.completions[role] + EOS) for ex in exs]


def test_sentinel_passes_canonical_sft_batch(smol_tokenizer):
    exs = examples()
    result = FirstBatchSentinel().check(sft_batch(smol_tokenizer, exs, canonical_rows(exs)[::-1]))
    assert result.status == Status.PASS, result.evidence
    assert "3 rows decode exactly" in result.evidence


def test_sentinel_fails_on_a_bos(smol_tokenizer):
    exs = examples()
    fb = sft_batch(smol_tokenizer, exs, [(smol_tokenizer.bos_token + p, c) for p, c in canonical_rows(exs)])
    result = FirstBatchSentinel().check(fb)
    assert result.status == Status.FAIL
    assert "'<|im_start|>' (id 1) at position 0 - position 0 is a BOS" in result.evidence
    assert "not the canonical text of any record" in result.evidence


def test_sentinel_fails_on_chat_template_text(smol_tokenizer, raw_smol_tokenizer):
    exs = examples()
    rows = [(raw_smol_tokenizer.apply_chat_template([{"role": "user", "content": formats_instruction(ex)}],
                                                    tokenize=False, add_generation_prompt=True),
             ex.completions["completion"].strip() + EOS) for ex in exs]
    assert rows[0][0].startswith("<|im_start|>system")
    result = FirstBatchSentinel().check(sft_batch(smol_tokenizer, exs, rows))
    assert result.status == Status.FAIL
    assert "<|im_start|>" in result.evidence and "expects 'Instruction: " in result.evidence


def formats_instruction(ex: Example) -> str:
    from cai.pipeline.formats import parse

    return parse("instruction_response", ex.prompt)


def test_sentinel_fails_when_the_prompt_is_trained(smol_tokenizer):
    exs = examples()
    result = FirstBatchSentinel().check(sft_batch(smol_tokenizer, exs, canonical_rows(exs), trained_from=0))
    assert result.status == Status.FAIL
    assert "loss mask wrong at position 0 (prompt token trained)" in result.evidence


def test_sentinel_fails_when_the_eos_is_not_trained(smol_tokenizer):
    exs = examples(n=1)
    fb = sft_batch(smol_tokenizer, exs, canonical_rows(exs))
    last = sum(fb.attention_mask[0]) - 1
    fb.loss_mask[0][last], fb.labels[0][last] = 0, -100
    result = FirstBatchSentinel().check(fb)
    assert result.status == Status.FAIL and f"position {last} (completion token masked)" in result.evidence


def test_sentinel_fails_on_a_second_eos(smol_tokenizer):
    exs = examples()
    result = FirstBatchSentinel().check(sft_batch(smol_tokenizer, exs, [(p, c + EOS) for p, c in canonical_rows(exs)]))
    assert result.status == Status.FAIL
    assert "'<|im_end|>' (id 2)" in result.evidence


def test_sentinel_accepts_a_row_cut_at_max_length_and_says_so(smol_tokenizer):
    exs = examples(n=1)
    n = len(encode(smol_tokenizer, exs[0].prompt)) + 2  # cut inside the completion: no EOS
    full = sft_batch(smol_tokenizer, exs, canonical_rows(exs))
    cut = FirstBatch("sft", [r[:n] for r in full.input_ids], [r[:n] for r in full.attention_mask],
                     [r[:n] for r in full.loss_mask], exs, smol_tokenizer, EOS, labels=[r[:n] for r in full.labels],
                     max_length=n)
    result = FirstBatchSentinel().check(cut)
    assert result.status == Status.PASS and f"1 row(s) cut at max_length={n}" in result.evidence
    unexplained = FirstBatchSentinel().check(FirstBatch(**{**cut.__dict__, "max_length": None}))
    assert unexplained.status == Status.FAIL  # a short row is only fine as a cut at max_length


def dpo_batch(tok, exs, chosen_rows, rejected_rows):
    b = collate(tok, chosen_rows + rejected_rows)
    return FirstBatch("dpo", b["input_ids"], b["attention_mask"], b["loss_mask"], exs, tok, EOS, max_length=64)


def test_sentinel_checks_dpo_chosen_and_rejected_of_the_same_pair(smol_tokenizer):
    exs = examples("dpo", 3)
    chosen, rejected = canonical_rows(exs, "chosen"), canonical_rows(exs, "rejected")
    good = FirstBatchSentinel().check(dpo_batch(smol_tokenizer, exs, chosen, rejected))
    assert good.status == Status.PASS, good.evidence
    assert "prompt + chosen / prompt + rejected" in good.evidence
    swapped = FirstBatchSentinel().check(dpo_batch(smol_tokenizer, exs, chosen, rejected[1:] + rejected[:1]))
    assert swapped.status == Status.FAIL
    assert "rows 0 and 3 are not the chosen and the rejected completion of one record" in swapped.evidence
    reversed_roles = FirstBatchSentinel().check(dpo_batch(smol_tokenizer, exs, rejected, chosen))
    assert reversed_roles.status == Status.FAIL


def test_sentinel_accepts_best_of_n_pairs_sharing_their_chosen(smol_tokenizer):
    """One judged-best answer against several others: the chosen text repeats across pairs."""
    base = preference_records(1)[0]
    recs = [{**base, "id": f"bon-{k}", "rejected": r} for k, r in enumerate([" No.", " Maybe.", " Ask later."])]
    exs = training.canonical_examples(recs, "dpo", "instruction_response", EOS)
    chosen, rejected = canonical_rows(exs, "chosen"), canonical_rows(exs, "rejected")
    result = FirstBatchSentinel().check(dpo_batch(smol_tokenizer, exs, chosen[::-1], rejected[::-1]))
    assert result.status == Status.PASS, result.evidence
    assert [d["id"] for d in result.details] == ["bon-2", "bon-1", "bon-0"] * 2


# --------------------------------------------------------------------------- reference identity


def test_reference_identity_passes_when_policy_is_reference():
    logps = [-12.5, -30.25, -7.0]
    result = ReferenceIdentity().check(ReferenceLogps(logps, [x - 5 for x in logps], logps, [x - 5 for x in logps],
                                                      beta=0.1))
    assert result.status == Status.PASS
    assert abs(result.details["loss"] - math.log(2)) < 1e-12 and result.details["max_abs_reward"] == 0


def test_reference_identity_fails_for_a_different_reference():
    policy = [-10.0, -20.0]
    result = ReferenceIdentity().check(ReferenceLogps(policy, [-30.0, -25.0], [-14.0, -26.0], [-29.0, -24.0], beta=0.1))
    assert result.status == Status.FAIL and "not the policy DPO starts from" in result.evidence
    assert result.details["loss"] < math.log(2) - 0.1


def test_reference_identity_fails_even_when_the_loss_happens_to_be_ln2():
    # reference uniformly 3 nats worse on both sides: loss is ln 2, rewards are not ~0
    policy_c, policy_r = [-10.0, -20.0], [-15.0, -18.0]
    result = ReferenceIdentity().check(ReferenceLogps(policy_c, policy_r, [x - 3 for x in policy_c],
                                                      [x - 3 for x in policy_r], beta=0.1))
    assert abs(result.details["loss"] - math.log(2)) < 1e-9
    assert result.status == Status.FAIL and result.details["max_abs_reward"] == pytest.approx(0.3)


def test_reference_identity_fails_for_precomputed_logps_of_another_model():
    logps = [-10.0, -20.0]
    live = dict(policy_chosen=logps, policy_rejected=[-30.0, -25.0], reference_chosen=logps,
                reference_rejected=[-30.0, -25.0], beta=0.1)
    near = ReferenceIdentity().check(ReferenceLogps(**live, precomputed_chosen=[-10.01, -19.99],
                                                    precomputed_rejected=[-30.0, -25.02]))
    assert near.status == Status.PASS and "precomputed vs live reference" in near.evidence
    far = ReferenceIdentity().check(ReferenceLogps(**live, precomputed_chosen=[-14.0, -26.0],
                                                   precomputed_rejected=[-29.0, -24.0]))
    assert far.status == Status.FAIL and "precomputed reference log-probs come from another model" in far.evidence


# --------------------------------------------------------------------------- truncation / records / beta


def test_truncation_is_a_warning_with_the_longest_record():
    result = TrainingTruncation().check(TokenLengths(["a", "b", "c"], [10, 80, 70], 64))
    assert result.status == Status.WARN and not result.blocking
    assert "2 of 3 records exceed max_length=64" in result.evidence and "'b', 80 tokens" in result.evidence


def test_canonical_examples_validate_records():
    recs = sft_records(2)
    assert [ex.prompt for ex in training.canonical_examples(recs, "sft", "instruction_response", EOS)] == \
        [r["prompt"] for r in recs]
    cases = [
        ({**recs[0], "completion": "Paris."}, "must be non-empty text starting with ' '"),
        ({k: v for k, v in recs[0].items() if k != "instruction"}, "missing field"),
        ({**recs[0], "format": "raw"}, "format 'raw'"),
        ({**recs[0], "prompt": "Q: " + recs[0]["instruction"]}, "not render"),
    ]
    for bad, message in cases:
        with pytest.raises(BadInputError, match=message):
            training.canonical_examples([bad], "sft", "instruction_response", EOS)
    with pytest.raises(BadInputError, match="chosen and rejected are the same text"):
        pair = preference_records(1)[0]
        training.canonical_examples([{**pair, "rejected": pair["chosen"]}], "dpo", "instruction_response", EOS)
    with pytest.raises(BadInputError, match="missing field.*margin"):
        training.canonical_examples([{k: v for k, v in preference_records(1)[0].items() if k != "margin"}], "dpo",
                                    "instruction_response", EOS)


@pytest.mark.parametrize("beta", [0.0, -0.1, 1.5, 10.0])
def test_beta_outside_zero_one_is_rejected(beta):
    with pytest.raises(ValidationError, match="beta must be in \\(0, 1\\]"):
        DPOConfig(beta=beta)


@pytest.mark.parametrize("beta", [0.1, 0.2, 0.3])
def test_documented_beta_range_is_accepted_without_warning(beta):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = RunConfig(name="b", dpo={"beta": beta})
    assert cfg.dpo.beta == beta and DPOConfig().beta == 0.1


# --------------------------------------------------------------------------- real trainer runs


@pytest.fixture(scope="module")
def slots():
    s = Slots()
    yield s
    s.close()


def assert_stopped_before_step_one(out_dir, slot, modules_before):
    assert not (out_dir / "checkpoints").exists() or not any((out_dir / "checkpoints").iterdir())
    assert not (out_dir / "adapter").exists() and not (out_dir / "loss_curve.json").exists()
    assert [n for n, _ in slot.model.named_modules()] == modules_before  # base given back


def test_sft_run_stops_before_step_one_when_a_chat_template_is_applied(slots, raw_smol_tokenizer, monkeypatch, tmp_path):
    """The trainer's data path renders ChatML through a real template-bearing tokenizer
    (AutoTokenizer, not cai's loader): the sentinel sees it in the first batch."""
    from datasets import Dataset

    from cai.pipeline import sft

    def chatml_dataset(records):
        return Dataset.from_list([{
            "prompt": raw_smol_tokenizer.apply_chat_template([{"role": "user", "content": r["instruction"]}],
                                                             tokenize=False, add_generation_prompt=True),
            "completion": r["completion"].strip()} for r in records])

    monkeypatch.setattr(sft, "sft_dataset", chatml_dataset)
    slot = slots.get()
    modules = [n for n, _ in slot.model.named_modules()]
    with pytest.raises(InvariantError) as err:
        sft.train_sft(run_config(), slot, sft_records(16), tmp_path)
    (failed,) = err.value.results
    assert failed.name == "first_batch_sentinel"
    assert "<|im_start|>system" in failed.evidence and "not the canonical text" in failed.evidence
    assert_stopped_before_step_one(tmp_path, slot, modules)


def test_sft_run_stops_when_the_trainers_tokenizer_adds_a_bos(slots, monkeypatch, tmp_path):
    """TRL tokenizes with the tokenizer's own special-token setting: one that adds a BOS
    (Llama-style) puts it in every row."""
    from cai.pipeline import sft

    slot = slots.get()
    bos_adding = copy.deepcopy(slot.tokenizer)
    bos_adding.add_bos_token = True
    assert bos_adding("x")["input_ids"][0] == bos_adding.bos_token_id
    monkeypatch.setattr(slot.loaded, "tokenizer", bos_adding)
    modules = [n for n, _ in slot.model.named_modules()]
    with pytest.raises(InvariantError, match="position 0 is a BOS"):
        sft.train_sft(run_config(), slot, sft_records(16), tmp_path)
    assert_stopped_before_step_one(tmp_path, slot, modules)


def test_sft_run_stops_when_prompts_get_a_bos_prepended(slots, monkeypatch, tmp_path):
    from cai.pipeline import sft

    original = sft.sft_dataset
    slot = slots.get()
    bos = slot.tokenizer.bos_token
    monkeypatch.setattr(sft, "sft_dataset", lambda recs: original([{**r, "prompt": bos + r["prompt"]} for r in recs]))
    with pytest.raises(InvariantError, match="'<\\|im_start\\|>' \\(id 1\\) at position 0"):
        sft.train_sft(run_config(), slot, sft_records(16), tmp_path)
    assert_stopped_before_step_one(tmp_path, slot, [n for n, _ in slot.model.named_modules()])


def test_conversational_data_cannot_reach_a_template(slots, monkeypatch, tmp_path):
    """Layer 1 behind layer 4: chat-format data makes TRL call apply_chat_template, which
    cai's tokenizer refuses."""
    from datasets import Dataset

    from cai.pipeline import sft

    monkeypatch.setattr(sft, "sft_dataset", lambda recs: Dataset.from_list([{
        "prompt": [{"role": "user", "content": r["instruction"]}],
        "completion": [{"role": "assistant", "content": r["completion"].strip()}]} for r in recs]))
    slot = slots.get()
    with pytest.raises(ChatTemplateDisabledError):
        sft.train_sft(run_config(), slot, sft_records(8), tmp_path)
    assert "forward" not in vars(slot.model)
