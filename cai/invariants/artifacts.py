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
    stage, and template data passing for model-generated data: every record has a unique
    string id, a non-empty instruction free of chat markers and, when `source` is given, says
    it came from that source (`instructions.source`)."""

    name = "instruction_records"

    def __init__(self, source: str | None = None):
        self.source = source

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
            if self.source is not None and r.get("source") != self.source:
                problems.append(f"{rid!r}: source {r.get('source')!r}, config instructions.source is {self.source!r}")
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
    """Prevents a training artifact without a trained adapter, with a broken loss curve, or
    trained otherwise than configured from counting: the adapter's config and weights are
    listed outputs, the loss curve has one finite loss per logged step, steps increase, and
    it reaches `max_steps` when set; given the run's config, the saved adapter is the one it
    asks for and the trainer's own settings read back into training.json (learning rate,
    batch, length, seed, checkpointing, DPO beta and reference mode, ...) are the ones it
    resolves to (`training.configured_trainer_settings`)."""

    name = "training_outputs"

    def __init__(self, max_steps: int, lora=None, *, cfg=None, stage: str | None = None):
        self.max_steps, self.lora, self.cfg, self.stage = max_steps, lora, cfg, stage

    @classmethod
    def for_stage(cls, stage: str, cfg) -> "TrainingOutputs":
        section = getattr(cfg, stage)
        return cls(section.max_steps, section.lora, cfg=cfg, stage=stage)

    def _trainer_problems(self, directory: Path, listed: dict[str, Any]) -> list[str]:
        """training.json's `trainer_config` against the settings the config resolves to."""
        import json

        from cai.pipeline.training import SUMMARY_JSON, configured_trainer_settings

        if SUMMARY_JSON not in listed:
            return [f"{SUMMARY_JSON} not among the artifact's hashed outputs"]
        try:
            summary = json.loads((directory / SUMMARY_JSON).read_text())
            recorded = summary["trainer_config"]
            n_records, world_size = summary["records"], recorded["world_size"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            return [f"{SUMMARY_JSON} unreadable or without the trainer's settings ({type(err).__name__}: {err})"]
        if not (isinstance(n_records, int) and isinstance(world_size, int) and world_size > 0):
            return [f"{SUMMARY_JSON}: records {n_records!r} and world_size {world_size!r} must be counts"]
        want = configured_trainer_settings(self.cfg, self.stage, n_records, world_size)
        return [f"the trainer ran with {k} = {recorded.get(k)!r}, the config resolves to {v!r}"
                for k, v in want.items() if recorded.get(k) != v or type(recorded.get(k)) is not type(v)]

    def _adapter_problems(self, directory: Path) -> list[str]:
        """The saved adapter is the one the config asks for (rank, alpha, target modules)."""
        import json

        try:
            saved = json.loads((directory / ADAPTER_FILES[0]).read_text())
        except (OSError, ValueError) as err:
            return [f"{ADAPTER_FILES[0]} unreadable ({type(err).__name__})"]
        want = {"r": self.lora.r, "lora_alpha": self.lora.alpha, "target_modules": sorted(self.lora.target_modules)}
        got = {"r": saved.get("r"), "lora_alpha": saved.get("lora_alpha"),
               "target_modules": sorted(saved.get("target_modules") or [])}
        return [f"adapter {k} is {got[k]}, config asks for {want[k]}" for k in want if got[k] != want[k]]

    def _check(self, subject: StageRecords):
        problems = [f"{name} not among the artifact's hashed outputs" for name in ADAPTER_FILES
                    if name not in subject.listed_files]
        if subject.dir is not None:
            missing = [f"{name} missing on disk" for name in ADAPTER_FILES if not (subject.dir / name).is_file()]
            problems += missing
            if not missing and self.lora is not None:
                problems += self._adapter_problems(subject.dir)
            if self.cfg is not None:
                problems += self._trainer_problems(subject.dir, subject.listed_files)
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
        trained = ", trained as configured" if self.cfg is not None and subject.dir is not None else ""
        return True, (f"{subject.stage}: adapter listed and present{trained}, {len(steps)} logged step(s) to "
                      f"step {steps[-1]}")


class EvalCoverage(Invariant):
    """Prevents a comparison on unequal item sets (a model whose responses were lost, an
    extra or foreign item): every configured suite has, for each of its models, exactly one
    string response per configured eval item, and nothing else."""

    name = "eval_coverage"

    def __init__(self, expected_keys: dict[str, set] | dict[str, dict], suite_models: dict[str, tuple[str, ...]]):
        self.expected_keys = expected_keys  # eval set name -> keys, or key -> the item's instruction
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
            shipped = self.expected_keys.get(r.get("eval_set"))
            if isinstance(shipped, dict) and r.get("key") in shipped and r.get("instruction") != shipped[r.get("key")]:
                bad_type.append(f"{r.get('id')!r}: instruction is not the eval set's item {r.get('key')!r}")
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


class EvalDecodingAsConfigured(Invariant):
    """Prevents a comparison of responses decoded otherwise than configured (one model cut at
    64 new tokens and another at 256, a suite run without its format's stop strings, a
    config edited after the run): every eval record's `n_new_tokens` is within its suite's
    `max_new_tokens`, a row that ended for length has exactly that many, an EOS row fewer,
    and no response still holds one of the suite's stop strings (generation cuts before the
    first). Greedy against sampled decoding does not show in the records: it is not checked."""

    name = "eval_decoding_as_configured"

    def __init__(self, settings: dict[str, dict[str, Any]]):
        self.settings = settings  # suite -> compare.generation_settings(cfg, suite)

    def _check(self, subject: StageRecords):
        bad = []
        for r in subject.records:
            rid, settings = r.get("id"), self.settings.get(r.get("suite"))
            if settings is None:
                continue  # a suite the config does not run: eval_coverage reports it
            cap, n, reason = settings["max_new_tokens"], r.get("n_new_tokens"), r.get("stop_reason")
            if not isinstance(n, int) or isinstance(n, bool) or n < 0 or reason not in ("stop", "eos", "length"):
                bad.append(f"{rid!r}: n_new_tokens {n!r} / stop_reason {reason!r} are not a decoding record")
            elif n > cap or (reason == "length" and n != cap) or (reason == "eos" and n >= cap):
                bad.append(f"{rid!r}: {n} new token(s) ending by {reason}, max_new_tokens is {cap}")
            elif isinstance(r.get("response"), str) and any(s and s in r["response"] for s in settings["stop"]):
                bad.append(f"{rid!r}: the response holds a stop string of its suite ({settings['stop']!r})")
        if bad:
            return False, _first(bad, len(subject.records), "were not decoded as configured")
        caps = sorted({s["max_new_tokens"] for s in self.settings.values()})
        return True, (f"{len(subject.records)} response(s) within max_new_tokens {'/'.join(map(str, caps))}, "
                      "cut at their suite's stop strings")


class RecordsMatchInputs(Invariant):
    """Prevents records that no longer belong to their inputs (an instruction edited after the
    responses were made, completions moved between instructions, pairs built from another
    answer): each responses record carries the id and instruction of an instructions record;
    each pair's `sft_id` names a responses record with the same instruction and prompt, whose
    completion is the pair's chosen."""

    name = "records_match_inputs"

    def __init__(self, upstream: list[dict[str, Any]]):
        self.upstream = {r.get("id"): r for r in upstream if isinstance(r, dict)}

    def _check(self, subject: StageRecords):
        fields = ("instruction",) if subject.stage == "responses" else ("instruction", "prompt")
        bad = []
        for r in subject.records:
            ref = r.get("id") if subject.stage == "responses" else r.get("sft_id")
            source = self.upstream.get(ref)
            if source is None:
                bad.append(f"{r.get('id')!r}: no input record {ref!r}")
            elif any(r.get(f) != source.get(f) for f in fields):
                bad.append(f"{r.get('id')!r}: {'/'.join(fields)} differ from input record {ref!r}")
            elif subject.stage == "pairs" and r.get("chosen") != source.get("completion"):
                bad.append(f"{r.get('id')!r}: chosen is not the completion of {ref!r}")
        if bad:
            return False, _first(bad, len(subject.records), "do not match their input records")
        return True, f"{len(subject.records)} record(s) match their {len(self.upstream)} input record(s)"


CROSS_STAGE_INPUT = {"responses": "instructions", "pairs": "responses"}  # stage -> the input its records join

# stage -> results its stage records beyond its content checks (the checks that need the live
# model, tokenizer or trainer, so a later verification can only read them)
RECORDED_EXTRAS = {
    "candidates": ("one_base_model_resident", "chat_template_disabled", "apply_chat_template_refuses",
                   "sentinel_instructions_unanswered"),
    "instructions": ("one_base_model_resident",),
    "responses": ("one_base_model_resident", "no_special_token_ids", "decode_encode_roundtrip"),
    "pairs": ("one_base_model_resident", "no_special_token_ids", "decode_encode_roundtrip"),
    "sft": ("one_base_model_resident", "first_batch_sentinel"),
    "dpo": ("one_base_model_resident", "first_batch_sentinel", "dpo_reference_identity"),
    "eval": ("one_base_model_resident", "no_special_token_ids", "decode_encode_roundtrip"),
}


class RecordedChecksPresent(Invariant):
    """Prevents a manifest whose inconvenient results were deleted from passing: the stage
    recorded every check it runs — its content checks (re-run live beside this) and those
    only the live model, tokenizer or trainer can run (`RECORDED_EXTRAS`; the lm-eval
    agreement when the config runs lm-eval)."""

    name = "recorded_checks_present"

    def __init__(self, stage: str, live_names: set[str], lm_eval: bool):
        self.required = set(live_names) | set(RECORDED_EXTRAS.get(stage, ()))
        if stage == "eval" and lm_eval:
            self.required.add("lmeval_score_agreement")

    def _check(self, manifest: dict):
        recorded = {r.get("name") for r in manifest.get("invariants") or [] if isinstance(r, dict)}
        missing = sorted(self.required - recorded)
        if missing:
            return False, f"the manifest lacks recorded result(s) its stage always writes: {', '.join(missing)}"
        return True, f"all {len(self.required)} check(s) the stage runs are recorded"


def expected_eval_keys(cfg) -> dict[str, dict]:
    """eval set -> {key: instruction} of the items the config evaluates."""
    from cai.pipeline.compare import load_eval_set

    return {name: {it["key"]: it["instruction"] for it in load_eval_set(name, cfg.eval.limit)} for name in cfg.eval.sets}


def stage_results(stage: str, records: list[dict[str, Any]], cfg, directory: Path | None = None,
                  listed_files: dict[str, Any] | None = None) -> list[Result]:
    """Every content invariant of `stage`'s artifact, evaluated on its records. `cfg` is the
    run's config (the checks depend on it: counts, thresholds, formats, eval items)."""
    from cai.invariants.data import RecordSet, data_invariants, eval_response_invariants
    from cai.pipeline.compare import SUITE_MODELS, generation_settings, load_eval_set
    from cai.pipeline.stages import RECORD_KIND

    subject = StageRecords(stage, list(records), Path(directory) if directory else None, dict(listed_files or {}))
    kind = RECORD_KIND[stage]
    if kind == "candidates":
        return evaluate([InstructionRecords(cfg.instructions.source)], subject)
    if kind == "instructions":
        return evaluate([InstructionRecords(cfg.instructions.source), InstructionCount(cfg.instructions.n),
                         CriticSelected(cfg.critic.enabled, cfg.critic.threshold)], subject)
    if kind == "training":
        return evaluate([TrainingOutputs.for_stage(stage, cfg)], subject)
    if kind == "eval_responses":
        suites = {s: SUITE_MODELS[s] for s in cfg.eval.suites}
        decoding = EvalDecodingAsConfigured({s: generation_settings(cfg, s) for s in cfg.eval.suites})
        return (evaluate(eval_response_invariants(cfg.eval.format or cfg.format), subject.records)
                + evaluate([EvalCoverage(expected_eval_keys(cfg), suites), decoding], subject))
    sets = {name: load_eval_set(name) for name in cfg.eval.sets}
    # Template instances differ in one slot by design (labelled `source: templates`, never the
    # methodology): their near-duplicates are reported, not gated; exact duplicates still are.
    near_max = None if cfg.instructions.source == "templates" else 0.05
    return evaluate(data_invariants(kind, eval_sets=sets, critic_enabled=cfg.critic.enabled, train_format=cfg.format,
                                    near_max=near_max), RecordSet(kind, subject.records, directory))
