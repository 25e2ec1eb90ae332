"""What each stage's artifact must hold, checked on its records: one list per stage, run by
the stage when it writes the artifact and again by every verification of the run (`cai
check`, `pytest suites/`, `cai report`, `--resume`). The kind of the records comes from the
stage name, never from the records' fields: a record that lost a field must not fall out
of the checks that field decides.

`stage_results(stage, records, cfg, directory)` is the entry point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.invariants.base import Invariant, Result, evaluate

ADAPTER_FILES = ("adapter/adapter_config.json", "adapter/adapter_model.safetensors")


@dataclass
class StageRecords:
    """The records of one stage's artifact, and its directory when it has one on disk."""

    stage: str
    records: list[dict[str, Any]]
    dir: Path | None = None
    listed_files: dict[str, Any] = field(default_factory=dict)  # manifest outputs.files, when known


def _first(problems: list[str], n: int, what: str) -> str:
    more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
    return f"{len(problems)} of {n} record(s) {what}: {'; '.join(problems[:3])}{more}"


class RecordIds(Invariant):
    """Prevents a merge from silently dropping or doubling work: every record of a shard is
    an object with a unique, non-empty string id (the key a merge joins and de-duplicates on)."""

    name = "record_ids"

    def _check(self, records):
        records = records.records if isinstance(records, StageRecords) else list(records)
        ids = [r.get("id") if isinstance(r, dict) else None for r in records]
        bad = [i for i, rid in enumerate(ids) if not isinstance(rid, str) or not rid]
        dup = sorted({rid for rid in ids if ids.count(rid) > 1 and isinstance(rid, str)})
        problems = ([f"{len(bad)} record(s) without a string id (first #{bad[0] + 1})"] if bad else []) + \
            ([f"duplicate id(s): {', '.join(dup[:3])}"] if dup else [])
        if problems:
            return False, "; ".join(problems)
        return True, f"{len(ids)} record(s), unique string ids"


class InstructionRecords(Invariant):
    """Prevents a malformed or chat-contaminated instruction from reaching the response
    stage: every record has a unique string id and a non-empty instruction free of chat
    markers."""

    name = "instruction_records"

    def _check(self, subject: StageRecords):
        from cai.invariants.markers import find_chat_markers

        problems, seen = [], set()
        for i, r in enumerate(subject.records):
            rid, text = r.get("id"), r.get("instruction")
            if not isinstance(rid, str) or not rid:
                problems.append(f"#{i + 1}: id {rid!r} is not a non-empty string")
            elif rid in seen:
                problems.append(f"{rid!r}: duplicate id")
            seen.add(rid)
            if not isinstance(text, str) or not text.strip():
                problems.append(f"{rid!r}: empty or missing instruction")
            elif markers := find_chat_markers(text):
                problems.append(f"{rid!r}: chat marker {markers[0][1]!r} ({markers[0][0]})")
        if not subject.records:
            return False, f"{subject.stage}: no records"
        if problems:
            return False, _first(problems, len(subject.records), "are not clean instructions")
        return True, f"{len(subject.records)} instruction(s): unique ids, non-empty, no chat markers"


class InstructionCount(Invariant):
    """Prevents a run that trains on fewer (or more) instructions than its config asked for
    from counting as that config: the instructions artifact holds exactly `instructions.n`."""

    name = "instruction_count"

    def __init__(self, n: int):
        self.n = n

    def _check(self, subject: StageRecords):
        got = len(subject.records)
        return got == self.n, f"{got} instruction(s) kept, config asks for {self.n}"


class CriticSelected(Invariant):
    """Prevents the quality filter from being configured but not applied (the documented
    failure: a critic that existed and was never wired in): with the critic on, every kept
    instruction carries a finite critic margin at or above `critic.threshold`; with it off,
    none claims one."""

    name = "critic_selected"

    def __init__(self, enabled: bool, threshold: float):
        self.enabled, self.threshold = enabled, threshold

    def _check(self, subject: StageRecords):
        bad = []
        for r in subject.records:
            critic = r.get("critic")
            margin = critic.get("margin") if isinstance(critic, dict) else None
            if not self.enabled:
                if critic is not None:
                    bad.append(f"{r.get('id')!r}: critic result present with critic.enabled: false")
            elif not isinstance(margin, (int, float)) or isinstance(margin, bool) or not math.isfinite(margin):
                bad.append(f"{r.get('id')!r}: no finite critic margin")
            elif margin < self.threshold - 1e-3:  # stored margins are rounded
                bad.append(f"{r.get('id')!r}: margin {margin} below threshold {self.threshold}")
        if bad:
            return False, _first(bad, len(subject.records), "were not selected by the critic as configured")
        state = f"margins >= {self.threshold}" if self.enabled else "critic off, none claims a margin"
        return True, f"{len(subject.records)} instruction(s): {state}"


class TrainingOutputs(Invariant):
    """Prevents a training artifact without a trained adapter or with a broken loss curve
    from counting: the adapter's config and weights are listed outputs, the loss curve has
    one finite loss per logged step, steps increase, and it reaches `max_steps` when set."""

    name = "training_outputs"

    def __init__(self, max_steps: int):
        self.max_steps = max_steps

    def _check(self, subject: StageRecords):
        problems = [f"{name} not among the artifact's hashed outputs" for name in ADAPTER_FILES
                    if name not in subject.listed_files]
        if subject.dir is not None:
            problems += [f"{name} missing on disk" for name in ADAPTER_FILES if not (subject.dir / name).is_file()]
        steps = [r.get("step") for r in subject.records]
        losses = [r.get("loss") for r in subject.records]
        if not subject.records:
            problems.append("empty loss curve")
        if any(not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) for v in losses):
            problems.append("a loss is missing or not finite")
        if any(not isinstance(s, int) for s in steps) or steps != sorted(set(steps)):
            problems.append(f"steps are not strictly increasing integers ({steps[:6]})")
        elif self.max_steps > 0 and steps and steps[-1] != self.max_steps:
            problems.append(f"the curve ends at step {steps[-1]}, config max_steps is {self.max_steps}")
        if problems:
            return False, f"{subject.stage}: " + "; ".join(problems)
        return True, f"{subject.stage}: adapter listed and present, {len(steps)} logged step(s) to step {steps[-1]}"


class EvalCoverage(Invariant):
    """Prevents a comparison on unequal item sets (a model whose responses were lost, an
    extra or foreign item): every configured suite has, for each of its models, exactly one
    string response per configured eval item, and nothing else."""

    name = "eval_coverage"

    def __init__(self, expected_keys: dict[str, set], suite_models: dict[str, tuple[str, ...]]):
        self.expected_keys = expected_keys  # eval set name -> keys
        self.suite_models = suite_models  # suite -> models answering it

    def _check(self, subject: StageRecords):
        want = {(suite, model, es, k) for suite, models in self.suite_models.items() for model in models
                for es, keys in self.expected_keys.items() for k in keys}
        got: dict[tuple, int] = {}
        bad_type = []
        for r in subject.records:
            key = (r.get("suite"), r.get("model"), r.get("eval_set"), r.get("key"))
            got[key] = got.get(key, 0) + 1
            if not isinstance(r.get("response"), str):
                bad_type.append(f"{r.get('id')!r}: response is {type(r.get('response')).__name__}")
        missing = sorted(want - set(got), key=str)
        extra = sorted(set(got) - want, key=str)
        twice = sorted((k for k, n in got.items() if n > 1), key=str)
        problems = ([f"{len(missing)} missing (first {'/'.join(map(str, missing[0]))})"] if missing else []) + \
                   ([f"{len(extra)} unexpected (first {'/'.join(map(str, extra[0]))})"] if extra else []) + \
                   ([f"{len(twice)} answered twice (first {'/'.join(map(str, twice[0]))})"] if twice else []) + bad_type[:3]
        if problems:
            return False, f"eval responses do not cover the configured items exactly: {'; '.join(problems)}"
        return True, (f"{len(want)} response(s): {len(self.suite_models)} suite(s) x their models x "
                      f"{sum(len(k) for k in self.expected_keys.values())} item(s), each once")


def expected_eval_keys(cfg) -> dict[str, set]:
    from cai.pipeline.compare import load_eval_set

    return {name: {it["key"] for it in load_eval_set(name, cfg.eval.limit)} for name in cfg.eval.sets}


def stage_results(stage: str, records: list[dict[str, Any]], cfg, directory: Path | None = None,
                  listed_files: dict[str, Any] | None = None) -> list[Result]:
    """Every content invariant of `stage`'s artifact, evaluated on its records. `cfg` is the
    run's config (the checks depend on it: counts, thresholds, formats, eval items)."""
    from cai.invariants.data import RecordSet, data_invariants, eval_response_invariants
    from cai.pipeline.compare import SUITE_MODELS, load_eval_set
    from cai.pipeline.stages import RECORD_KIND

    subject = StageRecords(stage, list(records), Path(directory) if directory else None, dict(listed_files or {}))
    kind = RECORD_KIND[stage]
    if kind == "candidates":
        return evaluate([InstructionRecords()], subject)
    if kind == "instructions":
        return evaluate([InstructionRecords(), InstructionCount(cfg.instructions.n),
                         CriticSelected(cfg.critic.enabled, cfg.critic.threshold)], subject)
    if kind == "training":
        return evaluate([TrainingOutputs(getattr(cfg, stage).max_steps)], subject)
    if kind == "eval_responses":
        suites = {s: SUITE_MODELS[s] for s in cfg.eval.suites}
        return (evaluate(eval_response_invariants(cfg.eval.format or cfg.format), subject.records)
                + evaluate([EvalCoverage(expected_eval_keys(cfg), suites)], subject))
    sets = {name: load_eval_set(name) for name in cfg.eval.sets}
    # Template instances differ in one slot by design (labelled `source: templates`, never the
    # methodology): their near-duplicates are reported, not gated; exact duplicates still are.
    near_max = None if cfg.instructions.source == "templates" else 0.05
    return evaluate(data_invariants(kind, eval_sets=sets, critic_enabled=cfg.critic.enabled, train_format=cfg.format,
                                    near_max=near_max), RecordSet(kind, subject.records, directory))
