"""Memory sequencing (audit finding 3: base, SFT and DPO 32B models loaded at once -> OOM).

- `AtMostOneBaseModel`: in this process, at most one base model is alive (models registered
  by the slot *and* any transformers model found by the garbage collector, so a model
  loaded around the slot is seen too). `ModelsReleased` is the same with zero allowed, for
  stage boundaries.
- `PeakMemoryRecorded`: a stage that used a model recorded its peak memory.
- `LoadsSequenced`: over a whole run (slot events of this process and/or of manifests),
  every load was released before the next one.
"""

from __future__ import annotations

import gc
import math
import sys
from typing import Any, Iterable, Mapping

from cai.invariants.base import Invariant, Severity


def _peft_base(model):
    peft = sys.modules.get("peft")  # not imported -> no PEFT wrapper can exist (and importing it is slow)
    if peft is None:
        return model
    return model.get_base_model() if isinstance(model, peft.PeftModel) else model


def _describe(model) -> str:
    src = getattr(model, "_cai_source", None)
    n = None
    try:
        n = sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001 - description only
        pass
    size = f", {n / 1e6:.1f}M params" if n is not None else ""
    origin = f"source {src!r} via ModelSlot" if src else "not registered by cai's loader (loaded around ModelSlot)"
    return f"{type(model).__name__} ({origin}{size})"


def live_base_models(models: Iterable[Any] | None = None) -> list[Any]:
    """Distinct base models alive: PEFT wrappers count as their base, and models that are
    submodules of another (LlamaModel inside LlamaForCausalLM) are not counted twice.
    Without `models`: cai's registry (`resident_models()`) plus every transformers
    `PreTrainedModel` the garbage collector can see."""
    if models is None:
        from cai.pipeline.models import resident_models

        found = list(resident_models())
        try:
            from transformers import PreTrainedModel
        except ImportError:
            PreTrainedModel = None
        if PreTrainedModel is not None:
            # type(o), not isinstance: isinstance reads o.__class__, which lazy proxies resolve
            # (importing modules, emitting warnings); the per-type cache keeps the scan fast.
            is_model: dict[type, bool] = {}
            for o in gc.get_objects():
                t = type(o)
                hit = is_model.get(t)
                if hit is None:
                    hit = is_model[t] = isinstance(t, type) and issubclass(t, PreTrainedModel)
                if hit:
                    found.append(o)
    else:
        found = list(models)
    bases: dict[int, Any] = {}
    for m in found:
        b = _peft_base(m)
        bases[id(b)] = b
    inner: set[int] = set()
    for b in bases.values():
        modules = getattr(b, "modules", None)
        if modules is None:
            continue
        for sub in modules():
            if sub is not b:
                inner.add(id(sub))
    return [b for k, b in bases.items() if k not in inner]


class AtMostOneBaseModel(Invariant):
    """Prevents audit finding 3: two base models resident at once (OOM on a 32B run). cai
    compares base / SFT / DPO as one base plus LoRA adapters switched in place, so more than
    one base model alive in the process means something loaded around the slot.

    Subject: None (scan this process) or an iterable of models to judge."""

    name = "at_most_one_base_model"
    max_models = 1

    def _check(self, subject):
        models = live_base_models(None if subject is None else subject)
        desc = [_describe(m) for m in models]
        if len(models) <= self.max_models:
            return True, f"{len(models)} base model(s) resident" + (f": {desc[0]}" if desc else "")
        return False, f"{len(models)} base models resident (max {self.max_models}): {'; '.join(desc)}", {"models": desc}


class ModelsReleased(AtMostOneBaseModel):
    """Prevents a model kept alive after its stage (a reference held past the slot): the
    next stage's load would then sit beside it. At a stage boundary no model is resident."""

    name = "models_released"
    max_models = 0


def _memory_of(subject) -> tuple[Mapping[str, Any] | None, bool]:
    """(memory dict, used a model?) from a ModelSlot, a manifest dict or a memory dict."""
    if hasattr(subject, "memory") and hasattr(subject, "model_cfg"):  # ModelSlot
        return subject.memory, True
    if isinstance(subject, Mapping) and "stage" in subject and "outputs" in subject:  # manifest
        return subject.get("memory") or {}, subject.get("model") is not None
    return subject, True


PEAK_KEYS = ("peak_rss_mb", "cuda_max_allocated_mb")


def memory_snapshot(events_since: int | None = None) -> dict[str, Any]:
    """What a stage passes to `ArtifactWriter.finalize(memory=...)` when it cannot wait for
    its slot to close (data stages share one slot): peak and current RSS, the CUDA peak on
    a GPU, and — with `events_since` (len(SLOT_EVENTS) when the stage started) — the slot
    events since then, for the run-level `LoadsSequenced` check."""
    from cai.pipeline.models import SLOT_EVENTS, peak_rss_mb, rss_mb

    snap: dict[str, Any] = {"peak_rss_mb": round(peak_rss_mb(), 1), "rss_mb": round(rss_mb(), 1)}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        snap["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if events_since is not None:
        snap["slot_events"] = [dict(e) for e in SLOT_EVENTS[events_since:]]
    return snap


class PeakMemoryRecorded(Invariant):
    """Prevents memory blowing up unseen: every stage that held a model records its peak
    memory (`peak_rss_mb`, and `cuda_max_allocated_mb` on a GPU) in its slot and manifest,
    so a run can be sized and an OOM traced to the stage that caused it. A warning: missing
    bookkeeping does not make the run's results wrong (use `memory_snapshot()`)."""

    name = "peak_memory_recorded"
    severity = Severity.WARN

    def _check(self, subject):
        memory, used_model = _memory_of(subject)
        if not used_model:
            return True, "no model used: no peak memory to record"
        if not memory:
            return False, "no memory recorded (expected peak_rss_mb from the ModelSlot, passed to ArtifactWriter.finalize(memory=...))"
        vals = {k: memory.get(k) for k in PEAK_KEYS if k in memory}
        good = {k: v for k, v in vals.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and math.isfinite(v) and v > 0}
        if not good:
            return False, f"memory recorded but no positive peak ({', '.join(PEAK_KEYS)}): {dict(memory)}"
        return True, "peak memory recorded: " + ", ".join(f"{k}={v}" for k, v in good.items())


def _events_of(subject) -> list[dict[str, Any]]:
    """Slot events from: None (this process's SLOT_EVENTS), a list of events, or a list of
    manifests (events under manifest["memory"]["slot_events"]), or a mix."""
    if subject is None:
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


def memory_invariants() -> list[Invariant]:
    """Process-level checks a stage can run (subject None)."""
    return [AtMostOneBaseModel(), LoadsSequenced()]
