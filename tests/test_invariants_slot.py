"""Leakage layers 1 and 5 on a real slot, as every run records them for the data slot."""

import pytest

from cai.config import ModelConfig
from cai.invariants.base import Status
from cai.invariants.slot import slot_leakage_results
from cai.pipeline.models import ModelSlot


def by_name(results):
    return {r.name: r for r in results}


@pytest.fixture(scope="module")
def embedded_results():
    with ModelSlot(ModelConfig(source="embedded"), label="data") as slot:
        return by_name(slot_leakage_results(slot))


def test_embedded_slot_passes_the_tokenizer_layer_and_warns_it_ships_a_template(embedded_results):
    r = embedded_results
    assert r["chat_template_disabled"].status == Status.PASS
    assert r["apply_chat_template_refuses"].status == Status.PASS
    assert r["no_special_token_ids"].status == Status.PASS and r["decode_encode_roundtrip"].status == Status.PASS
    shipped = r["chat_template_shipped"]
    assert shipped.status == Status.WARN and "instruction-tuned" in shipped.evidence
    assert "chat_template.jinja" in shipped.details["sources"]  # the checkpoint directory was inspected


def test_embedded_slot_sentinel_reports_its_outputs(embedded_results):
    """The behaviour sentinel runs on the real model and carries the raw outputs; greedy
    SmolLM2-135M-Instruct answers 1 of 4 sentinels cleanly when fed raw (measured), below the
    warning threshold, and the evidence says the checkpoint is instruction-tuned."""
    r = embedded_results["sentinel_instructions_unanswered"]
    outputs = r.details["outputs"]
    assert [o["instruction"] for o in outputs][0] == "Translate to Pig Latin: hello world"
    assert all(o["output"].strip() for o in outputs)
    assert all(o["instruction"] in r.evidence for o in outputs)  # the evidence shows each output after its instruction
    assert "instruction-tuned" in r.evidence
    assert r.status == (Status.WARN if sum(o["clean_answer"] for o in outputs) >= 2 else Status.PASS)


def test_template_set_after_load_fails_the_slot_check():
    with ModelSlot(ModelConfig(source="tiny-random")) as slot:
        slot.tokenizer.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
        r = by_name(slot_leakage_results(slot))
    assert r["chat_template_disabled"].status == Status.FAIL
    assert r["sentinel_instructions_unanswered"].status == Status.PASS  # random weights answer nothing
