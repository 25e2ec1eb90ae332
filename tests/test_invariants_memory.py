"""Memory sequencing observed with real (tiny random) models through the real ModelSlot:
models created around the slot (a direct transformers load, a deep copy) are found by the
gc scan; peaks are sampled per slot."""

import copy
import gc
import time
import weakref

import pytest
import torch

from cai.config import ModelConfig
from cai.errors import MemorySequencingError
from cai.invariants.base import Status, evaluate
from cai.invariants.memory import (LoadsSequenced, ModelsReleased, OneBaseModelResident, PeakMemoryRecorded,
                                   memory_invariants, memory_snapshot, open_slot_invariants)
from cai.pipeline.models import SLOT_EVENTS, ModelSlot, load_model, resident_models

TINY = ModelConfig(source="tiny-random")
MB = 2**20


def _transformers_model(tmp_path):
    """A tiny Llama saved and loaded with plain transformers: nothing of cai involved."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "rogue")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "rogue")


def test_model_loaded_directly_with_transformers_blocks_the_slot(tmp_path):
    rogue = _transformers_model(tmp_path)
    with pytest.raises(MemorySequencingError, match=r"LlamaForCausalLM \(3\.2M params, created outside cai's loader\)"):
        with ModelSlot(TINY):
            pass
    assert ModelsReleased().check(None).status == Status.FAIL
    del rogue
    with ModelSlot(TINY) as slot:  # released: the slot loads
        assert OneBaseModelResident().check(slot).status == Status.PASS


def test_deep_copy_of_the_slots_model_is_a_second_model():
    """What TRL does for a reference model without PEFT: a second copy of every weight."""
    with ModelSlot(TINY) as slot:
        assert OneBaseModelResident().check(slot).status == Status.PASS
        ref = copy.deepcopy(slot.model)
        r = OneBaseModelResident().check(slot)
        assert r.status == Status.FAIL and "2 base-sized models" in r.evidence and "deep copy" in r.evidence
        with pytest.raises(MemorySequencingError, match="2 base-sized model"):
            load_model(TINY)
        del ref
        assert OneBaseModelResident().check(slot).status == Status.PASS


def test_adapters_and_shallow_copies_sharing_the_base_are_one_model():
    """LoRA wrappers (a second "ref" adapter as TRL adds one) and a shallow copy share the
    base's tensors (data_ptr identity): no second model. A stray small layer is not one either."""
    from peft import LoraConfig, get_peft_model

    with ModelSlot(TINY) as slot:
        wrapped = get_peft_model(slot.model, LoraConfig(r=2, target_modules=["q_proj"]))
        wrapped.add_adapter("ref", LoraConfig(r=2, target_modules=["q_proj"]))
        shallow = copy.copy(slot.model)
        stray = torch.nn.Linear(64, 64)
        r = OneBaseModelResident().check(slot)
        assert r.status == Status.PASS and "one base-sized model" in r.evidence, r.evidence
        assert len(resident_models(slot.n_parameters)) == 1
        del wrapped, shallow, stray


def test_open_slot_check_needs_an_open_slot():
    with ModelSlot(TINY) as slot:
        pass
    r = OneBaseModelResident().check(slot)
    assert r.status == Status.FAIL and "no open ModelSlot" in r.evidence


def test_reference_held_past_the_slot_is_caught_then_released():
    with ModelSlot(TINY) as slot:
        assert ModelsReleased().check(slot).status == Status.FAIL  # still open: nothing released yet
        held = slot.model  # the leak: a reference kept after leaving the slot
    r = ModelsReleased().check(slot)
    assert r.status == Status.FAIL and "'tiny-random'" in r.evidence
    assert evaluate(memory_invariants(), slot)[0].status == Status.FAIL
    with pytest.raises(MemorySequencingError, match="tagged 'tiny-random' by cai's loader"):
        with ModelSlot(TINY):
            pass
    ref = weakref.ref(held)
    del held
    gc.collect()
    assert ref() is None
    assert all(r.status == Status.PASS for r in evaluate(memory_invariants(), slot))


def test_groups_hold_what_they_say():
    assert [type(i) for i in open_slot_invariants()] == [OneBaseModelResident]
    assert [type(i) for i in memory_invariants()] == [ModelsReleased, LoadsSequenced]


def _hold_big_tensor(mb: int = 300, seconds: float = 0.3) -> None:
    x = torch.ones(mb * MB // 4)  # float32: every page written, so resident
    time.sleep(seconds)  # several sampler intervals
    del x


def test_peak_is_sampled_per_slot_not_the_process_lifetime():
    with ModelSlot(TINY) as big:
        _hold_big_tensor()
    rise = big.memory["peak_rss_mb_sampled"] - big.memory["rss_before_mb"]
    assert rise >= 300, big.memory
    assert big.memory["rss_samples"] >= 3
    with ModelSlot(TINY) as small:
        time.sleep(0.2)
    assert small.memory["peak_rss_mb_sampled"] < small.memory["process_peak_rss_mb"] - 200, small.memory
    assert PeakMemoryRecorded().check(small).status == Status.PASS


def test_stages_sharing_a_slot_each_get_their_own_window():
    with ModelSlot(TINY):
        start = memory_snapshot()  # the load
        _hold_big_tensor()
        first = memory_snapshot()  # a stage that held 300 MB
        second = memory_snapshot()  # the next stage, which did not
    assert first["peak_rss_mb_sampled"] - start["rss_mb"] >= 290, (start, first)
    assert second["peak_rss_mb_sampled"] < first["peak_rss_mb_sampled"] - 200, (first, second)
    assert second["process_peak_rss_mb"] >= first["peak_rss_mb_sampled"] - 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_is_reset_per_slot():
    with ModelSlot(TINY) as big:
        x = torch.ones(300 * MB // 4, device="cuda")
        del x
    with ModelSlot(TINY) as small:
        y = torch.ones(MB // 4, device="cuda")
        del y
    assert big.memory["cuda_peak_mb"] >= 300 and small.memory["cuda_peak_mb"] < 100, (big.memory, small.memory)


def test_real_slot_records_peak_memory_and_sequenced_events():
    before = len(SLOT_EVENTS)
    with ModelSlot(TINY, label="base") as slot:
        pass
    with ModelSlot(TINY, label="sft-eval"):
        pass
    events = SLOT_EVENTS[before:]
    assert [e["event"] for e in events] == ["load", "release", "load", "release"]
    assert PeakMemoryRecorded().check(slot).status == Status.PASS
    r = LoadsSequenced().check(events)
    assert r.status == Status.PASS and "2 load(s)" in r.evidence
    assert LoadsSequenced().check(None).status == Status.PASS  # this process's whole log
    assert LoadsSequenced().check(slot).status == Status.PASS  # a slot: the same log


def _slot_log(*spans: tuple[str | None, float, float]) -> list[dict]:
    """load/release events of (shard, loaded at, released at) spans, as ModelSlot writes them."""
    return [e for shard, t0, t1 in spans for e in (
        {"event": "load", "label": "data", "source": "embedded", "time": t0, "shard": shard},
        {"event": "release", "label": "data", "source": "embedded", "time": t1, "shard": shard})]


def test_shards_of_a_split_may_overlap_nothing_else_may():
    ok = LoadsSequenced().check(_slot_log(("0-of-2", 0, 10), ("1-of-2", 1, 9), (None, 11, 12)))
    assert ok.status == Status.PASS and "shards 0-of-2, 1-of-2 side by side" in ok.evidence
    unsharded_during_shards = LoadsSequenced().check(_slot_log(("0-of-2", 0, 10), (None, 5, 6)))
    assert unsharded_during_shards.status == Status.FAIL and "shard 0-of-2" in unsharded_during_shards.evidence
    same_shard_twice = LoadsSequenced().check(_slot_log(("1-of-2", 0, 10), ("1-of-2", 2, 3)))
    assert same_shard_twice.status == Status.FAIL
    two_unsharded = LoadsSequenced().check(_slot_log((None, 0, 10), (None, 2, 3)))
    assert two_unsharded.status == Status.FAIL


@pytest.fixture(scope="module")
def real_slot_events():
    """The load/release events one real ModelSlot appends to SLOT_EVENTS."""
    before = len(SLOT_EVENTS)
    with ModelSlot(TINY, label="base"):
        pass
    return [dict(e) for e in SLOT_EVENTS[before:]]


def _retimed(events, start, hold=10.0):
    """A stage's real slot events, re-timed as if the stage loaded at `start` and held the model `hold` s."""
    out = [dict(e) for e in events]
    for e in out:
        e["time"] = start + (hold if e["event"] == "release" else 0.0)
    return out


def test_overlapping_loads_across_manifests_fail(real_slot_events):
    """Two stages' processes (e.g. shards) whose model lifetimes overlap: each process's
    own slot allowed its load, only the run-level view shows two models at once."""
    def manifest(stage, start):
        return {"stage": stage, "outputs": {}, "model": {},
                "memory": {"peak_rss_mb": 900, "slot_events": _retimed(real_slot_events, start)}}

    responses, critic, sft = manifest("responses", 1000.0), manifest("critic", 1100.0), manifest("sft", 1005.0)
    assert LoadsSequenced().check([responses, critic]).status == Status.PASS
    r = LoadsSequenced().check([responses, critic, sft])
    assert r.status == Status.FAIL
    assert "stage sft" in r.evidence and "stage responses" in r.evidence and "not yet released" in r.evidence


def _manifest(memory, model=True):
    return {"stage": "sft", "outputs": {}, "model": {"source": "x"} if model else None, "memory": memory}


@pytest.mark.parametrize("memory,model,ok,says", [
    ({"peak_rss_mb_sampled": 812.5, "process_peak_rss_mb": 900.0}, True, True, "peak_rss_mb_sampled=812.5"),
    ({"cuda_peak_mb": 5000}, True, True, "cuda_peak_mb=5000"),
    ({"peak_rss_mb": 900.0}, True, False, "process-lifetime"),  # ru_maxrss alone: not this stage's peak
    ({"process_peak_rss_mb": 900.0, "rss_mb": 500.0}, True, False, "process-lifetime"),
    ({"peak_rss_mb_sampled": 2000.0, "process_peak_rss_mb": 900.0}, True, False, "not a measurement"),
    ({"peak_rss_mb_sampled": 0}, True, False, "no positive"),
    ({}, True, False, "no memory recorded"),
    ({}, False, True, "no model used"),
])
def test_peak_memory_recorded_in_manifest(memory, model, ok, says):
    r = PeakMemoryRecorded().check(_manifest(memory, model))
    assert (r.status == Status.PASS) is ok and says in r.evidence, r.evidence
    assert r.status in (Status.PASS, Status.WARN)  # bookkeeping: a warning, never blocking


def test_memory_snapshot_feeds_both_checks():
    before = len(SLOT_EVENTS)
    with ModelSlot(TINY, label="data"):
        snap = memory_snapshot(events_since=before)  # taken inside the slot, as a data stage would
    outside = memory_snapshot()
    manifest = {"stage": "responses", "outputs": {}, "model": {"source": "tiny-random"}, "memory": snap}
    assert snap["peak_rss_mb_sampled"] > 0 and snap["slot"] == "data"
    assert [e["event"] for e in snap["slot_events"]] == ["load"]
    assert PeakMemoryRecorded().check(manifest).status == Status.PASS
    assert LoadsSequenced().check([manifest]).status == Status.PASS
    assert "peak_rss_mb_sampled" not in outside  # no slot open: no stage peak to claim


def test_stages_sharing_one_slot_record_one_load_not_several():
    """The data stages share one slot: each manifest carries the same load event, which is
    one load (a real overlap, two loads at different times, still fails)."""
    from cai.invariants.memory import LoadsSequenced

    load = {"event": "load", "label": "data", "source": "embedded", "time": 10.0}
    shared = [{"stage": s, "memory": {"slot_events": [load]}} for s in ("candidates", "instructions")]
    released = {"stage": "sft", "memory": {"slot_events": [{**load, "label": "sft", "time": 20.0},
                                                           {"event": "release", "label": "sft", "source": "embedded", "time": 30.0}]}}
    assert LoadsSequenced().check(shared).status.value == "pass"
    assert LoadsSequenced().check(shared + [released]).status.value == "fail"  # data slot never released before sft
