"""Memory sequencing with real (tiny random) models through the real ModelSlot."""

import gc
import weakref

import pytest

from cai.config import ModelConfig
from cai.invariants.base import Status
from cai.invariants.memory import (AtMostOneBaseModel, LoadsSequenced, ModelsReleased, PeakMemoryRecorded,
                                   live_base_models, memory_snapshot)
from cai.pipeline import models
from cai.pipeline.models import SLOT_EVENTS, ModelSlot, build_tiny_model

TINY = ModelConfig(source="tiny-random")


def test_model_built_around_the_slot_is_a_second_base_model():
    with ModelSlot(TINY) as slot:
        assert AtMostOneBaseModel().check([slot.model]).status == Status.PASS
        rogue = build_tiny_model(slot.tokenizer)  # bypasses the loader: nothing registers it
        r = AtMostOneBaseModel().check(None)  # scan the process
        assert r.status == Status.FAIL
        assert "via ModelSlot" in r.evidence and "not registered by cai's loader" in r.evidence
        del rogue


def test_inner_modules_and_peft_wrappers_count_once():
    from peft import LoraConfig, get_peft_model

    with ModelSlot(TINY) as slot:
        base = slot.model
        wrapped = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
        assert live_base_models([base, base.model, wrapped]) == [base]
        assert AtMostOneBaseModel().check([base, base.model, wrapped]).status == Status.PASS
        del wrapped


def test_reference_held_past_the_slot_is_caught_then_released():
    with ModelSlot(TINY) as slot:
        held = slot.model  # the leak: a reference kept after leaving the slot
    assert any(m is held for m in models.resident_models())
    r = ModelsReleased().check(None)
    assert r.status == Status.FAIL and "'tiny-random'" in r.evidence
    ref = weakref.ref(held)
    del held
    gc.collect()
    assert ref() is None and all(m is not ref() for m in live_base_models())
    assert ModelsReleased().check([]).status == Status.PASS


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


@pytest.mark.parametrize("manifest,ok", [
    ({"stage": "sft", "outputs": {}, "model": {"source": "x"}, "memory": {"peak_rss_mb": 812.5}}, True),
    ({"stage": "sft", "outputs": {}, "model": {"source": "x"}, "memory": {"cuda_max_allocated_mb": 5000}}, True),
    ({"stage": "sft", "outputs": {}, "model": {"source": "x"}, "memory": {}}, False),
    ({"stage": "sft", "outputs": {}, "model": {"source": "x"}, "memory": {"peak_rss_mb": 0}}, False),
    ({"stage": "pairs", "outputs": {}, "model": None, "memory": {}}, True),  # no model, nothing to record
])
def test_peak_memory_recorded_in_manifest(manifest, ok):
    assert (PeakMemoryRecorded().check(manifest).status == Status.PASS) is ok


def test_missing_peak_memory_is_a_warning():
    r = PeakMemoryRecorded().check({"stage": "responses", "outputs": {}, "model": {"source": "x"}})
    assert r.status == Status.WARN and "memory" in r.evidence


def test_memory_snapshot_feeds_both_checks():
    before = len(SLOT_EVENTS)
    with ModelSlot(TINY, label="data"):
        snap = memory_snapshot(events_since=before)  # taken inside the slot, as a data stage would
    manifest = {"stage": "responses", "outputs": {}, "model": {"source": "tiny-random"}, "memory": snap}
    assert snap["peak_rss_mb"] > 0 and [e["event"] for e in snap["slot_events"]] == ["load"]
    assert PeakMemoryRecorded().check(manifest).status == Status.PASS
    assert LoadsSequenced().check([manifest]).status == Status.PASS


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
