"""Prompt-format parity (audit finding 2: training prompts were "Instruction: {x}\\nResponse:"
while the primary evaluation fed raw instructions).

- `PromptFormatParity`: every stored prompt is exactly `formats.render(format, instruction)`.
- `FormatMatchesTraining`: records and evaluation prompts use the run's training format;
  another format (e.g. "raw") only inside a suite labelled as a probe.
- `PromptsIdenticalAcrossModels`: base and trained models were given byte-identical prompts.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

from cai.invariants.base import Invariant
from cai.invariants.records import _fmt_offenders, as_record_set, record_id
from cai.pipeline.formats import EXAMPLE_SEPARATOR, FormatError, render

PROBE_SUITES = ("raw_probe",)
FEWSHOT_SUITES = ("fewshot_baseline",)


def _is_probe(suite: Any, probe_suites: Sequence[str]) -> bool:
    return isinstance(suite, str) and (suite in probe_suites or suite.endswith("probe"))


class PromptFormatParity(Invariant):
    """Prevents a prompt built by hand somewhere else: each record's `prompt` must equal
    `formats.render(record["format"], record["instruction"])` (few-shot baseline suites:
    end with it). Evaluation items with no `format` are a source set whose prompts are
    rendered at evaluation time; they are counted, not failed."""

    name = "prompt_format_parity"

    def __init__(self, fewshot_suites: Sequence[str] = FEWSHOT_SUITES):
        self.fewshot_suites = tuple(fewshot_suites)

    def _check(self, subject):
        rs = as_record_set(subject)
        bad, unformatted = [], 0
        for i, rec in enumerate(rs.records):
            rid = record_id(rec, i)
            if "format" not in rec:
                if rs.kind == "eval":
                    unformatted += 1
                else:
                    bad.append(f"{rid!r}: no format field")
                continue
            instruction = rec.get("instruction")
            if not isinstance(instruction, str):
                bad.append(f"{rid!r}: format {rec['format']!r} but no instruction to render")
                continue
            try:
                expected = render(rec["format"], instruction)
            except FormatError as err:
                bad.append(f"{rid!r}: {err}")
                continue
            prompt = rec.get("prompt")
            if rec.get("suite") in self.fewshot_suites and isinstance(prompt, str):
                if prompt == expected or prompt.endswith(EXAMPLE_SEPARATOR + expected):
                    continue
            elif prompt == expected:
                continue
            bad.append(f"{rid!r}: prompt {str(prompt)[:60]!r} != render({rec['format']!r}, instruction) {expected[:60]!r}")
        n = len(rs)
        note = f"; {unformatted} evaluation item(s) carry no format (source set, rendered at evaluation time)" if unformatted else ""
        if not bad:
            if unformatted == n:
                return True, f"{n} evaluation item(s) carry no format (source set, rendered at evaluation time)"
            return True, f"{n - unformatted}/{n} prompt(s) equal formats.render(format, instruction){note}"
        return False, _fmt_offenders(bad, n, "have a prompt that is not the canonical rendering"), {"problems": bad[:50]}


class FormatMatchesTraining(Invariant):
    """Prevents train/eval distribution shift: training records and evaluation prompts must
    use the run's training format. A probe format (raw instructions) is allowed only in a
    suite labelled as a probe (`suite` field ending in "probe", or in `probe_suites`), so
    it can never become the primary metric."""

    name = "format_matches_training"

    def __init__(self, train_format: str, probe_suites: Sequence[str] = PROBE_SUITES, require_format: bool = False):
        self.train_format = train_format
        self.probe_suites = tuple(probe_suites)
        self.require_format = require_format

    def _check(self, subject):
        rs = as_record_set(subject)
        bad, probes, unformatted = [], 0, 0
        for i, rec in enumerate(rs.records):
            fmt = rec.get("format")
            if fmt is None:
                if rs.kind == "eval" and not self.require_format:
                    unformatted += 1
                else:
                    bad.append(f"{record_id(rec, i)!r}: no format recorded")
                continue
            if fmt == self.train_format:
                continue
            if rs.kind == "eval" and _is_probe(rec.get("suite"), self.probe_suites):
                probes += 1
                continue
            suite = rec.get("suite")
            where = f" in suite {suite!r}" if suite else " outside any probe suite"
            bad.append(f"{record_id(rec, i)!r}: format {fmt!r}{where}")
        n = len(rs)
        if not bad:
            extra = f"; {probes} in probe suites" if probes else ""
            extra += f"; {unformatted} source item(s) without format" if unformatted else ""
            return True, f"records use the training format {self.train_format!r}{extra}"
        return False, _fmt_offenders(bad, n, f"do not use the training format {self.train_format!r}"), {"problems": bad[:50]}


def _item_key(rec: Mapping, i: int) -> Any:
    """Keys are unique within an eval set only: records that name their set are keyed by (set, key)."""
    key = rec.get("key", rec.get("id", i))
    return (str(rec["eval_set"]), key) if "eval_set" in rec and "key" in rec else key


def _prompt_groups(subject) -> dict[str, dict[str, list[tuple[Any, str]]]]:
    """suite -> model -> [(key, prompt)], from a mapping model -> prompts, or from records with
    `model` and `prompt` (and `suite`: compared per suite)."""
    if isinstance(subject, Mapping):
        return {"": {str(m): [(i, p) for i, p in enumerate(ps)] for m, ps in subject.items()}}
    records = subject.records if hasattr(subject, "records") else list(subject)
    out: dict[str, dict[str, list[tuple[Any, str]]]] = {}
    for i, rec in enumerate(records):
        out.setdefault(str(rec.get("suite", "")), {}).setdefault(str(rec["model"]), []).append(
            (_item_key(rec, i), rec["prompt"]))
    return out


def prompts_sha256(prompts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(hashlib.sha256(p.encode()).digest())
    return h.hexdigest()


class PromptsIdenticalAcrossModels(Invariant):
    """Prevents an unfair comparison: base, SFT and DPO must be scored on byte-identical
    prompts (same items, same rendering). The prompt lists per model (per suite, when the
    records carry one) are hashed and compared; evidence names the first differing item."""

    name = "prompts_identical_across_models"

    def _check(self, subject):
        groups = {suite: {m: sorted(items, key=lambda kv: str(kv[0])) for m, items in models.items()}
                  for suite, models in _prompt_groups(subject).items()}
        problems, summary = [], []
        for suite, models in groups.items():
            hashes = {m: prompts_sha256([p for _, p in items]) for m, items in models.items()}
            summary.append((f"{suite}: " if suite else "") + ", ".join(f"{m} {h[:12]}" for m, h in hashes.items()))
            if len(set(hashes.values())) <= 1:
                continue
            ref_model, ref = next(iter(models.items()))
            for m, items in models.items():
                if hashes[m] == hashes[ref_model]:
                    continue
                ref_map, other = dict(ref), dict(items)
                diff = next((k for k in ref_map if other.get(k) != ref_map[k]), None)
                if diff is None:
                    diff = next(k for k in other if k not in ref_map)
                problems.append(f"{(suite + ': ') if suite else ''}{m} differs from {ref_model} at item {diff!r}: "
                                f"{str(other.get(diff))[:50]!r} vs {str(ref_map.get(diff))[:50]!r}")
        models_seen = sorted({m for models in groups.values() for m in models})
        if len(models_seen) < 2:
            return False, f"need prompts of at least two models to compare, got {models_seen or 'none'}"
        if not problems:
            return True, "identical prompt lists (sha256): " + "; ".join(summary)
        return False, f"models saw different prompts: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""), \
            {"hashes": summary, "problems": problems}
