"""Memory sequencing (audit finding 3: base, SFT and DPO 32B models loaded at once -> OOM).

All observed, not declared (`cai.pipeline.models.resident_models` scans the live torch
modules, whoever created them):

- `OneBaseModelResident`: while a slot is open, exactly one base-sized model is alive, and
  it is the slot's (a direct `from_pretrained` or a trainer's deep copy beside it fails).
- `ModelsReleased`: after a slot closed (a stage boundary), none is alive.
- `PeakMemoryRecorded`: a stage that used a model recorded its own peak memory (RSS sampled
  while its slot was open, CUDA peak reset per stage), not the process-lifetime `ru_maxrss`.
- `LoadsSequenced`: over a whole run (slot events of this process and/or of manifests),
  every load was released before the next one.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from cai.invariants.base import Invariant, Severity


def _is_slot(subject) -> bool:
    return hasattr(subject, "model_cfg") and hasattr(subject, "n_parameters")


def _reference_params(subject) -> int | None:
    """Size the resident scan compares with: the slot's model, or (subject None) the last
    model this process loaded through a slot; None when nothing was loaded."""
    if _is_slot(subject):
        return subject.n_parameters
    from cai.pipeline.models import SLOT_EVENTS

    loads = [e for e in SLOT_EVENTS if e.get("event") == "load" and e.get("n_parameters")]
    return loads[-1]["n_parameters"] if loads else None


class OneBaseModelResident(Invariant):
    """Prevents audit finding 3 inside a stage: a second base model beside the slot's (a
    direct `from_pretrained`, a trainer's deep-copied reference model) doubles memory and
    OOMs a 32B run. While the slot is open, the gc scan must find exactly one base-sized
    model, holding the slot's model's parameters (LoRA adapters sharing them are the same
    model).

    Subject: an open `ModelSlot`."""

    name = "one_base_model_resident"

    def _check(self, subject):
        from cai.pipeline.models import BASE_SIZED_FRACTION, parameter_storage, resident_models

        if not _is_slot(subject) or not subject.is_open:
            return False, "no open ModelSlot to check (this check runs while the stage's slot is open)"
        found = resident_models(subject.n_parameters)
        own = set(parameter_storage(subject.model))
        mine = {id(m) for m in found if own & set(parameter_storage(m.module))}
        desc = [m.describe(slot_model=id(m) in mine) for m in found]
        scan = f"gc scan for models of >= {BASE_SIZED_FRACTION * subject.n_parameters / 1e6:.1f}M params"
        if len(found) == 1 and mine:
            return True, f"one base-sized model resident: {desc[0]} ({scan})"
        if not mine:
            return False, f"the slot's model is not among the live models ({'; '.join(desc) or 'none'}; {scan})", {"models": desc}
        others = [d for m, d in zip(found, desc) if id(m) not in mine]
        return False, (f"{len(found)} base-sized models resident while slot {subject.label!r} is open; besides the "
                       f"slot's: {'; '.join(others)} ({scan})"), {"models": desc}


class ModelsReleased(Invariant):
    """Prevents a model kept alive past its stage (a reference held after the slot closed, a
    trainer kept with its model): the next stage's load would sit beside it. After the slot
    closed, the gc scan finds no base-sized model.

    Subject: the closed `ModelSlot` (its model's size is the reference), or None (the last
    model this process loaded; with none loaded, any transformers model counts)."""

    name = "models_released"

    def _check(self, subject):
        from cai.pipeline.models import BASE_SIZED_FRACTION, resident_models

        if _is_slot(subject) and subject.is_open:
            return False, f"slot {subject.label!r} is still open: models are released when it closes"
        reference = _reference_params(subject)
        found = resident_models(reference)
        scope = (f"models of >= {BASE_SIZED_FRACTION * reference / 1e6:.1f}M params" if reference
                 else "transformers models (no slot loaded in this process)")
        if not found:
            return True, f"no base-sized model resident after release (gc scan for {scope})"
        desc = [m.describe() for m in found]
        return False, f"{len(found)} model(s) still resident after release: {'; '.join(desc)}", {"models": desc}


def _memory_of(subject) -> tuple[Mapping[str, Any] | None, bool]:
    """(memory dict, used a model?) from a ModelSlot, a manifest dict or a memory dict."""
    if _is_slot(subject):
        return subject.memory, True
    if isinstance(subject, Mapping) and "stage" in subject and "outputs" in subject:  # manifest
        return subject.get("memory") or {}, subject.get("model") is not None
    return subject, True


STAGE_PEAK_KEYS = ("peak_rss_mb_sampled", "cuda_peak_mb")


def memory_snapshot(events_since: int | None = None, slot=None) -> dict[str, Any]:
    """What a stage passes to `ArtifactWriter.finalize(memory=...)`: current RSS, the
    process-lifetime peak (`process_peak_rss_mb`, ru_maxrss) and, from the open slot (`slot`,
    default the one open in this process), the stage's own peaks since the slot opened or
    since the previous snapshot (`peak_rss_mb_sampled`, `cuda_peak_mb` on a GPU). With
    `events_since` (len(SLOT_EVENTS) when the stage started): the slot events since then,
    for the run-level `LoadsSequenced` check."""
    from cai.pipeline.models import SLOT_EVENTS, open_slot, process_peak_rss_mb, rss_mb

    slot = slot if slot is not None else open_slot()
    snap: dict[str, Any] = slot.stage_memory() if slot is not None and slot.is_open else {}
    snap["rss_mb"] = round(rss_mb(), 1)
    snap["process_peak_rss_mb"] = round(process_peak_rss_mb(), 1)  # after the sample: an upper bound of it
    if events_since is not None:
        snap["slot_events"] = [dict(e) for e in SLOT_EVENTS[events_since:]]
    return snap


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


class PeakMemoryRecorded(Invariant):
    """Prevents memory blowing up unseen: every stage that held a model records its own
    peak (`peak_rss_mb_sampled`: RSS sampled while its slot was open; `cuda_peak_mb`: the
    CUDA peak counter reset per stage), so a run can be sized and an OOM traced to the stage
    that caused it. The process-lifetime `ru_maxrss` alone does not count: it is the peak of
    every stage so far. A sampled peak above the lifetime peak is not a measurement. A
    warning: missing bookkeeping does not make the run's results wrong."""

    name = "peak_memory_recorded"
    severity = Severity.WARN

    def _check(self, subject):
        memory, used_model = _memory_of(subject)
        if not used_model:
            return True, "no model used: no peak memory to record"
        if not memory:
            return False, "no memory recorded (expected memory_snapshot() of the stage's slot in the manifest)"
        good = {k: memory[k] for k in STAGE_PEAK_KEYS if _positive(memory.get(k))}
        if not good:
            lifetime = {k: memory[k] for k in ("peak_rss_mb", "process_peak_rss_mb") if k in memory}
            why = (f"only the process-lifetime peak {lifetime}, not this stage's" if lifetime
                   else f"no positive {' or '.join(STAGE_PEAK_KEYS)}: {dict(memory)}")
            return False, f"no per-stage peak memory: {why}"
        sampled, lifetime = memory.get("peak_rss_mb_sampled"), memory.get("process_peak_rss_mb")
        # statm and ru_maxrss read the kernel's RSS counters at different moments: allow 2% + 8 MB
        if _positive(sampled) and _positive(lifetime) and sampled > 1.02 * lifetime + 8:
            return False, (f"sampled RSS peak {sampled} MB exceeds the process-lifetime peak {lifetime} MB: "
                           "not a measurement")
        shown = ", ".join(f"{k}={v}" for k, v in good.items())
        return True, (f"stage peak memory recorded: {shown} (RSS sampled while the slot was open, CUDA peak reset "
                      f"per stage; process lifetime peak {lifetime} MB)")


def _events_of(subject) -> list[dict[str, Any]]:
    """Slot events from: None or a ModelSlot (this process's SLOT_EVENTS), a list of events, or a list of
    manifests (events under manifest["memory"]["slot_events"]), or a mix."""
    if subject is None or _is_slot(subject):  # this process's log
        from cai.pipeline.models import SLOT_EVENTS

        return [dict(e) for e in SLOT_EVENTS]
    events = []
    for i, item in enumerate(subject):
        if isinstance(item, Mapping) and "event" in item:
            events.append(dict(item))
        elif isinstance(item, Mapping):  # a manifest
            stage = item.get("stage", f"manifest {i}")
            for e in (item.get("memory") or {}).get("slot_events", []):
                events.append({**e, "stage": e.get("stage", stage)})
    # Stages that share one slot (the data stages) each record its load: one event, not several.
    unique: dict[tuple, dict[str, Any]] = {}
    for e in events:
        unique.setdefault((e.get("event"), e.get("label"), e.get("source"), e.get("time")), e)
    return list(unique.values())


def _who(e: Mapping[str, Any]) -> str:
    stage = f"stage {e['stage']}, " if e.get("stage") else ""
    shard = f" shard {e['shard']}" if e.get("shard") else ""
    return f"{stage}{e.get('label', '?')}{shard} {e.get('source', '?')!r}"


class LoadsSequenced(Invariant):
    """Prevents overlapping model lifetimes over a whole run (stages run side by side, two
    `cai run` processes on one directory, a stage started before the previous one released):
    ordered by time, every `load` must be followed by its `release` before the next `load`.
    The one exception is `--shard`: loads of different shards of a split (one process per
    device) may overlap each other, never an unsharded load or another load of the same shard."""

    name = "loads_sequenced"

    def _check(self, subject):
        events = sorted(_events_of(subject), key=lambda e: (e.get("time", 0), 0 if e.get("event") == "release" else 1))
        open_loads: dict[str | None, dict[str, Any]] = {}  # shard ("I-of-N", None if unsharded) -> its open load
        loads = 0
        for e in events:
            lane = e.get("shard")
            if e.get("event") == "load":
                loads += 1
                clash = [o for other, o in open_loads.items() if lane is None or other is None or other == lane]
                if clash:
                    return False, (f"load of {_who(e)} at t={e.get('time'):.3f} while {_who(clash[0])} "
                                   f"(loaded t={clash[0].get('time'):.3f}) was not yet released"), {"events": events}
                open_loads[lane] = e
            elif e.get("event") == "release":
                open_loads.pop(lane, None)
        if not events:
            return True, "no model loads recorded"
        tail = "".join(f"; {_who(o)} still loaded" for o in open_loads.values())
        shards = sorted({e["shard"] for e in events if e.get("shard")})
        side = f" (shards {', '.join(shards)} side by side)" if shards else ""
        return True, f"{loads} load(s), each released before the next{side}{tail}"


def open_slot_invariants() -> list[Invariant]:
    """While a stage's slot is open (subject: the open ModelSlot), before it closes."""
    return [OneBaseModelResident()]


def memory_invariants() -> list[Invariant]:
    """At a stage boundary, after the slot closed (subject: the closed ModelSlot, or None)."""
    return [ModelsReleased(), LoadsSequenced()]
