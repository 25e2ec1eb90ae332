"""Data invariants over a `RecordSet` (SFT, preference or evaluation records).

    rs = RecordSet("sft", records, path)            # or load_records(path)
    results = evaluate(data_invariants("sft", eval_sets=evals, critic_enabled=cfg.critic.enabled,
                                       train_format=cfg.format), rs)

Record schemas follow DESIGN.md "Records"; extra fields are allowed and kept.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from typing import Any, Iterable, Mapping, Sequence

from cai.invariants.base import Invariant
from cai.invariants.leakage import NoChatMarkers, NoSpecialTokenIds, RoundTrip
from cai.invariants.parity import FormatMatchesTraining, PromptFormatParity, PromptsIdenticalAcrossModels
# the record basics live in `records` (leakage and parity need them too); callers may import them from here
from cai.invariants.records import (KINDS, RecordSet, _fmt_offenders, as_record_set, detect_kind,  # noqa: F401
                                    is_eval_responses, load_records, record_id)

# field -> accepted types (bool is excluded from numbers explicitly)
SCHEMAS: dict[str, dict[str, tuple[type, ...]]] = {
    "sft": {"id": (str, int), "instruction": (str,), "format": (str,), "prompt": (str,), "completion": (str,)},
    # margin None = not judged by the critic (a synthetic hard negative); the key must exist
    "preference": {"id": (str, int), "instruction": (str,), "format": (str,), "prompt": (str,), "chosen": (str,),
                   "rejected": (str,), "margin": (int, float, type(None))},
    "eval": {"key": (int, str), "prompt": (str,), "instruction_id_list": (list,), "kwargs": (list,)},
}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# --------------------------------------------------------------------------- schema


class RecordSchema(Invariant):
    """Prevents stages silently consuming malformed records (a missing format, a margin
    stored as a string, an eval item whose kwargs don't line up with its instruction ids):
    each record has the fields of its kind with the right types, and ids are unique."""

    name = "record_schema"

    def _check(self, subject):
        from cai.pipeline.formats import FORMATS

        rs = as_record_set(subject)
        schema = SCHEMAS[rs.kind]
        problems = []
        seen: dict[Any, int] = {}
        id_field = "key" if rs.kind == "eval" else "id"
        for i, rec in enumerate(rs.records):
            rid = record_id(rec, i)
            missing = [f for f in schema if f not in rec]
            wrong = [f"{f} is {type(rec[f]).__name__}" for f, types in schema.items()
                     if f in rec and (not isinstance(rec[f], types) or (isinstance(rec[f], bool) and bool not in types))]
            issues = ([f"missing {', '.join(missing)}"] if missing else []) + wrong
            if isinstance(rec.get("format"), str) and rec["format"] not in FORMATS:
                issues.append(f"unknown format {rec['format']!r}")
            if rs.kind == "preference" and _is_number(rec.get("margin")) and not math.isfinite(rec["margin"]):
                issues.append("margin is not finite")
            if rs.kind == "eval" and isinstance(rec.get("instruction_id_list"), list) and isinstance(rec.get("kwargs"), list):
                if len(rec["instruction_id_list"]) != len(rec["kwargs"]):
                    issues.append(f"{len(rec['instruction_id_list'])} instruction ids but {len(rec['kwargs'])} kwargs")
                if not all(isinstance(x, str) for x in rec["instruction_id_list"]):
                    issues.append("instruction_id_list holds non-strings")
                if not all(isinstance(x, dict) for x in rec["kwargs"]):
                    issues.append("kwargs holds non-objects")
            if id_field in rec:
                try:
                    if rec[id_field] in seen:
                        issues.append(f"duplicate {id_field} (also record #{seen[rec[id_field]] + 1})")
                    else:
                        seen[rec[id_field]] = i
                except TypeError:  # unhashable id: already reported as a wrong type
                    pass
            if issues:
                problems.append(f"{rid!r}: {', '.join(issues)}")
        if not problems:
            return True, f"{len(rs)} {rs.kind} record(s) match the schema ({', '.join(schema)})"
        return False, _fmt_offenders(problems, len(rs), f"break the {rs.kind} schema"), {"problems": problems[:50]}


# --------------------------------------------------------------------------- completions


def _completion_fields(kind: str) -> tuple[str, ...]:
    return {"sft": ("completion",), "preference": ("chosen", "rejected"), "eval": ()}[kind]


class NonEmptyCompletions(Invariant):
    """Prevents training on nothing: an empty (or whitespace-only) completion, chosen or
    rejected teaches the model to stop at once and makes a preference pair meaningless."""

    name = "non_empty_completions"

    def _check(self, subject):
        rs = as_record_set(subject)
        fields = _completion_fields(rs.kind) or ("prompt",)
        bad = [f"{record_id(r, i)!r} {f}" for i, r in enumerate(rs.records) for f in fields
               if isinstance(r.get(f), str) and not r[f].strip()]
        if not bad:
            return True, f"no empty {'/'.join(fields)} in {len(rs)} record(s)"
        return False, _fmt_offenders(bad, len(rs), "have an empty field")


class NoTruncatedCompletions(Invariant):
    """Prevents training on responses cut off by max_new_tokens (stop_reason "length"): the
    model learns to end mid-sentence. For preference pairs the *chosen* side is checked
    (`chosen_stop_reason`); a truncated rejected is a legitimate hard negative."""

    name = "no_truncated_completions"

    def _check(self, subject):
        rs = as_record_set(subject)
        if rs.kind == "eval":
            return True, "evaluation items carry no completions"
        field = "stop_reason" if rs.kind == "sft" else "chosen_stop_reason"
        bad = [f"{record_id(r, i)!r}" for i, r in enumerate(rs.records) if r.get(field) == "length"]
        unknown = sum(1 for r in rs.records if field not in r)
        note = f" ({unknown} record(s) carry no {field})" if unknown else ""
        if not bad:
            return True, f"no record has {field} == 'length'{note}"
        return False, _fmt_offenders(bad, len(rs), f"were truncated ({field} == 'length')")


# --------------------------------------------------------------------------- duplicates


_WORD = re.compile(r"[0-9a-z]+")


def words(text: str) -> list[str]:
    """Normalised words: lower case, letters and digits only (punctuation and spacing dropped)."""
    return _WORD.findall(text.lower())


def _shingles(ws: list[str]) -> frozenset:
    if len(ws) < 2:
        return frozenset([tuple(ws)])
    return frozenset(zip(ws, ws[1:]))


def rouge_l(a: Sequence[str], b: Sequence[str]) -> float:
    """ROUGE-L F1 of two word sequences: the instruction stage's own near-duplicate measure
    (`instructions.dedup_threshold`), imported so data and stage agree by construction."""
    from cai.pipeline.instructions import rouge_l as stage_rouge_l

    return stage_rouge_l(list(a), list(b))


def near_duplicate_pairs(texts: Sequence[str], threshold: float = 0.7) -> list[tuple[int, int, float]]:
    """(earlier, later, similarity) for texts whose word-level ROUGE-L F1 is >= threshold.
    Candidates are texts sharing a word bigram (inverted index; bigrams in more than
    max(50, n/10) texts do not propose candidates), so the cost stays near-linear."""
    toks = [words(t) for t in texts]
    sets = [_shingles(ws) for ws in toks]
    bags = [Counter(ws) for ws in toks]
    df = Counter(s for sh in sets for s in sh)
    cap = max(50, len(texts) // 10)
    index: dict[Any, list[int]] = defaultdict(list)
    pairs = []
    for j, sh in enumerate(sets):
        if not toks[j]:
            continue
        cands: set[int] = set()
        for s in sh:
            if df[s] <= cap:
                cands.update(index[s])
        la = len(toks[j])
        for i in sorted(cands):
            lb = len(toks[i])
            # F1 = 2*LCS/(la+lb) and LCS <= min(la, lb), LCS <= shared word count: skip early
            if 2 * min(la, lb) / (la + lb) < threshold:
                continue
            if 2 * sum((bags[i] & bags[j]).values()) / (la + lb) < threshold:
                continue
            sim = rouge_l(toks[i], toks[j])
            if sim >= threshold:
                pairs.append((i, j, sim))
        for s in sh:
            if df[s] <= cap:
                index[s].append(j)
    return pairs


class DuplicateRate(Invariant):
    """Prevents a data set that repeats itself (exact copies, or near-copies differing by a
    word): duplicates overweight a few items in training and inflate evaluation. Exact
    duplicates key on the normalised instruction (preference: instruction + chosen +
    rejected; eval: prompt); near-duplicates are distinct instructions whose word-level
    ROUGE-L F1 clears `near_threshold` (the instruction stage's own filter measure). Both
    rates must stay under their maxima."""

    name = "duplicate_rate"

    def __init__(self, exact_max: float = 0.01, near_max: float | None = 0.05, near_threshold: float = 0.7):
        """near_max None: near-duplicates are reported, not gated (evaluation sets, whose
        templated items vary one slot - "one sentence about {topic} in lowercase" - by design)."""
        self.exact_max, self.near_max, self.near_threshold = exact_max, near_max, near_threshold

    @staticmethod
    def _text(rec: dict, kind: str) -> str:
        if kind == "eval":
            return str(rec.get("prompt", ""))
        return str(rec.get("instruction", rec.get("prompt", "")))

    def _check(self, subject):
        rs = as_record_set(subject)
        n = len(rs)
        if n == 0:
            return True, "no records"
        seen: dict[tuple, Any] = {}
        exact = []
        for i, rec in enumerate(rs.records):
            key = (" ".join(words(self._text(rec, rs.kind))),)
            if rs.kind == "preference":
                key += (str(rec.get("chosen", "")).strip(), str(rec.get("rejected", "")).strip())
            if key in seen:
                exact.append(f"{record_id(rec, i)!r} = {seen[key]!r}")
            else:
                seen[key] = record_id(rec, i)
        distinct: dict[str, Any] = {}
        for i, rec in enumerate(rs.records):
            distinct.setdefault(" ".join(words(self._text(rec, rs.kind))), record_id(rec, i))
        texts = list(distinct)
        ids = list(distinct.values())
        pairs = near_duplicate_pairs(texts, self.near_threshold)
        near_later = {j for _, j, _ in pairs}
        exact_rate = len(exact) / n
        near_rate = len(near_later) / max(1, len(texts))
        details = {"exact_rate": exact_rate, "near_rate": near_rate, "exact": exact[:20],
                   "near": [{"a": ids[i], "b": ids[j], "rouge_l": round(s, 3)} for i, j, s in pairs[:20]]}
        near_limit = f"max {self.near_max:.1%}" if self.near_max is not None else "reported, not gated"
        summary = (f"exact duplicates {len(exact)}/{n} ({exact_rate:.1%}, max {self.exact_max:.1%}); "
                   f"near-duplicates {len(near_later)}/{len(texts)} ({near_rate:.1%}, {near_limit}, "
                   f"ROUGE-L >= {self.near_threshold})")
        ok = exact_rate <= self.exact_max and (self.near_max is None or near_rate <= self.near_max)
        if ok:
            return True, summary, details
        examples = exact[:2] + [f"{ids[i]!r} ~ {ids[j]!r} ({s:.2f})" for i, j, s in pairs[:2]]
        return False, f"{summary}; e.g. {'; '.join(examples)}", details


# --------------------------------------------------------------------------- decontamination


def ngrams(ws: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)}


def _eval_text(item) -> tuple[Any, str]:
    if isinstance(item, str):
        return None, item
    return item.get("key", item.get("id")), str(item.get("instruction") or item.get("prompt", ""))


class EvalOverlapIndex:
    """Word n-grams of every evaluation item, for decontamination (normalised words).

    A training text of at least n words overlaps when it shares an n-gram with an item; a
    shorter one of at least `min_words` overlaps when it appears whole inside an item; a
    still shorter one only when it equals an item."""

    def __init__(self, eval_sets: Mapping[str, Iterable], n: int = 13, min_words: int = 8):
        self.n, self.min_words = n, min(min_words, n)
        self.grams: dict[int, dict[tuple[str, ...], tuple[str, Any]]] = {k: {} for k in range(self.min_words, n + 1)}
        self.whole: dict[tuple[str, ...], tuple[str, Any]] = {}
        self.sizes: dict[str, int] = {}
        for name, items in eval_sets.items():
            if isinstance(items, RecordSet):
                items = items.records
            count = 0
            for pos, item in enumerate(items):
                key, text = _eval_text(item)
                key = f"#{pos + 1}" if key is None else key
                ws = words(text)
                count += 1
                self.whole.setdefault(tuple(ws), (name, key))
                for k, index in self.grams.items():
                    for g in ngrams(ws, k):
                        index.setdefault(g, (name, key))
            self.sizes[name] = count

    def match(self, text: str) -> tuple[str, tuple[str, Any]] | None:
        """(how, (eval set, item key)) for the first overlap, or None."""
        ws = words(text)
        if not ws:
            return None
        if len(ws) >= self.n:
            for g in ngrams(ws, self.n):
                if g in self.grams[self.n]:
                    return f"shares the {self.n}-gram {' '.join(g)!r}", self.grams[self.n][g]
            return None
        if len(ws) >= self.min_words:
            hit = self.grams[len(ws)].get(tuple(ws))
            return (f"appears whole ({len(ws)} words) in", hit) if hit else None
        hit = self.whole.get(tuple(ws))
        return ("equals", hit) if hit else None


class NoTrainEvalOverlap(Invariant):
    """Prevents evaluating on what was trained on: a training instruction that shares a
    13-gram of normalised words with an evaluation item (shorter instructions: appears whole
    inside one; very short ones: equals one) makes that item's score a memory test, not
    instruction following. 13 words, the usual decontamination length, lets the constraint
    boilerplate Stage 1 deliberately trains on ("end your response with the phrase ...")
    through while catching copied items."""

    name = "no_train_eval_overlap"

    def __init__(self, eval_sets: Mapping[str, Iterable], n: int = 13, min_words: int = 8):
        self.index = EvalOverlapIndex(eval_sets, n, min_words)

    def _check(self, subject):
        rs = as_record_set(subject)
        hits = []
        for i, rec in enumerate(rs.records):
            text = str(rec.get("instruction") or rec.get("prompt", ""))
            m = self.index.match(text)
            if m:
                how, (set_name, key) = m
                hits.append({"record": record_id(rec, i), "eval_set": set_name, "eval_key": key, "how": how})
        sets = ", ".join(f"{k} ({v})" for k, v in self.index.sizes.items()) or "none"
        if not hits:
            return True, f"no {self.index.n}-gram overlap between {len(rs)} training record(s) and evaluation sets {sets}"
        h = hits[0]
        return False, (f"{len(hits)}/{len(rs)} training record(s) overlap evaluation sets; first: record {h['record']!r} "
                       f"{h['how']} {h['eval_set']} item {h['eval_key']!r}"), {"hits": hits[:50]}


# --------------------------------------------------------------------------- critic


class CriticMarginsPresent(Invariant):
    """Prevents audit finding 4 (a critic implemented but never wired into the scripts that
    produced the data): when the config turns critic filtering on, every training record
    must carry the margin field (sft: `critic_margin` or `margin`; preference: `margin`),
    finite or explicitly None (not judged: a single usable candidate, a synthetic hard
    negative), and at least one record must carry a real margin."""

    name = "critic_margins_present"

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def _check(self, subject):
        rs = as_record_set(subject)
        if not self.enabled:
            return True, "critic filtering is off in the config: margins not required"
        if rs.kind == "eval":
            return True, "evaluation items are not critic-filtered"
        fields = ("critic_margin", "margin") if rs.kind == "sft" else ("margin",)
        missing, bad, unjudged = [], [], 0
        for i, rec in enumerate(rs.records):
            present = [f for f in fields if f in rec]
            if not present:
                missing.append(f"{record_id(rec, i)!r}")
                continue
            value = rec[present[0]]
            if value is None:
                unjudged += 1
            elif not (_is_number(value) and math.isfinite(value)):
                bad.append(f"{record_id(rec, i)!r} ({present[0]}={value!r})")
        field_names = " or ".join(fields)
        if missing:
            return False, _fmt_offenders(missing, len(rs), f"have no {field_names} field although the critic is enabled "
                                                            "(was the critic wired into this stage?)")
        if bad:
            return False, _fmt_offenders(bad, len(rs), "carry a margin that is not a finite number")
        judged = len(rs) - unjudged
        if rs.records and judged == 0:
            return False, f"critic enabled but none of {len(rs)} record(s) carries a judged margin (all {field_names} are null)"
        return True, f"{judged}/{len(rs)} record(s) carry a finite critic margin ({field_names}); {unjudged} marked not judged"


# --------------------------------------------------------------------------- preference pairs


class ChosenDiffersFromRejected(Invariant):
    """Prevents a pair that prefers a response over itself (chosen == rejected): DPO gets
    no signal from it and the data records a preference nobody judged. Compared after
    strip(): the shared completion prefix and trailing newlines are not a preference;
    inner whitespace is kept (it is text the model is trained to produce) - the same
    normalisation as `duplicate_rate`'s preference key."""

    name = "chosen_differs_from_rejected"

    def _check(self, subject):
        rs = as_record_set(subject)
        if rs.kind != "preference":
            return True, f"{rs.kind} records have no chosen/rejected"
        same = [f"{record_id(r, i)!r}" for i, r in enumerate(rs.records)
                if str(r.get("chosen", "")).strip() == str(r.get("rejected", "")).strip()]
        if not same:
            return True, f"chosen != rejected (stripped) in all {len(rs)} pair(s)"
        return False, _fmt_offenders(same, len(rs), "have chosen == rejected (stripped)")


class ChosenPassesVerifier(Invariant):
    """Prevents preference data that teaches the model to break the instruction's own
    verifiable constraint (DESIGN.md, verifier gating): where a pair's instruction carries a
    constraint known exactly (`responses.verifiable_constraint`: IFEval ids and kwargs on the
    record, or a template type whose checker needs no arguments), its chosen response must
    pass lm-eval's strict IFEval checker - re-scored here from the record, not read from a
    flag the stage wrote."""

    name = "chosen_passes_verifier"

    def _check(self, subject):
        from cai.errors import BadInputError
        from cai.pipeline.responses import verifiable_constraint, verifier_passes

        rs = as_record_set(subject)
        if rs.kind != "preference":
            return True, f"{rs.kind} records have no chosen response"
        verdicts: dict[tuple, bool] = {}  # a chosen response appears in several pairs: score it once
        failing, gated = [], 0
        for i, rec in enumerate(rs.records):
            try:
                constraint = verifiable_constraint(rec)
            except BadInputError as err:  # a constraint that cannot be checked fails closed
                failing.append(f"{record_id(rec, i)!r} (unverifiable: {err})")
                gated += 1
                continue
            if constraint is None:
                continue
            gated += 1
            chosen = str(rec.get("chosen", "")).strip()
            key = (repr(constraint["instruction_id_list"]), repr(constraint["kwargs"]), chosen)
            if key not in verdicts:
                verdicts[key] = verifier_passes(constraint, chosen)
            if not verdicts[key]:
                failing.append(f"{record_id(rec, i)!r} ({', '.join(constraint['instruction_id_list'])})")
        if not failing:
            return True, (f"{gated}/{len(rs)} pair(s) carry a verifiable constraint; every chosen passes its "
                          "IFEval checker (strict)")
        return False, _fmt_offenders(failing, gated, "with a verifiable constraint have a chosen that fails it")


class GatedChosenPasses(Invariant):
    """Prevents SFT data that teaches an answer breaking its instruction's verifiable constraint
    when the stage had one that kept it (DESIGN.md, verifier gating): for every record whose
    instruction carries a constraint known exactly, the chosen completion and every usable
    candidate are re-scored with lm-eval's strict IFEval checker, here, from the text; a chosen
    that fails while a usable candidate passes is an error, and so is a recorded
    `verifier.chosen_passes` that disagrees with the re-score. Usability is re-derived from
    each candidate's text and stop reason (`responses.unusable_reason`), not read from its flag.
    A record the stage gated must keep its candidates."""

    name = "gated_chosen_passes_when_one_could"

    def _check(self, subject):
        from cai.errors import BadInputError
        from cai.pipeline.formats import COMPLETION_PREFIX
        from cai.pipeline.responses import unusable_reason, verifiable_constraint, verifier_passes

        rs = as_record_set(subject)
        if rs.kind != "sft":
            return True, f"{rs.kind} records are not best-of-N SFT records"
        bad, gated, kept_failing = [], 0, 0
        for i, rec in enumerate(rs.records):
            try:
                constraint = verifiable_constraint(rec)
            except BadInputError as err:  # a constraint that cannot be checked fails closed
                bad.append(f"{record_id(rec, i)!r} (unverifiable: {err})")
                continue
            gate = rec.get("verifier")
            if constraint is None:
                if gate is not None:  # the stage gated it: its constraint fields were removed since
                    bad.append(f"{record_id(rec, i)!r} (gated by the stage, but carries no constraint now)")
                continue
            gated += 1
            completion = str(rec.get("completion", ""))
            chosen = completion[len(COMPLETION_PREFIX):] if completion.startswith(COMPLETION_PREFIX) else completion
            passes = verifier_passes(constraint, chosen.strip())
            if isinstance(gate, dict) and gate.get("chosen_passes") is not passes:
                bad.append(f"{record_id(rec, i)!r} (records chosen_passes={gate.get('chosen_passes')!r}, "
                           f"re-scored {passes})")
                continue
            cands = rec.get("candidates")
            if not isinstance(cands, list):
                if gate is not None:
                    bad.append(f"{record_id(rec, i)!r} (gated, but its candidates are gone)")
                continue
            if passes:
                continue
            could = [k for k, c in enumerate(cands) if isinstance(c, dict)
                     and unusable_reason(str(c.get("text", "")), str(c.get("stop_reason", ""))) is None
                     and verifier_passes(constraint, str(c.get("text", "")).strip())]
            if could:
                bad.append(f"{record_id(rec, i)!r} (chosen fails {', '.join(constraint['instruction_id_list'])}; "
                           f"candidate {could[0]} passes)")
            else:
                kept_failing += 1
        if not bad:
            return True, (f"{gated}/{len(rs)} record(s) carry a verifiable constraint; each chosen passes its IFEval "
                          f"checker (strict) or no usable candidate did ({kept_failing} such)")
        return False, _fmt_offenders(bad, max(gated, 1), "with a verifiable constraint keep a failing chosen "
                                                         "or a false verdict")


# --------------------------------------------------------------------------- groups


def data_invariants(kind: str, *, eval_sets: Mapping[str, Iterable] | None = None, critic_enabled: bool | None = None,
                    train_format: str | None = None, probe_suites: Sequence[str] | None = None,
                    exact_max: float = 0.01, near_max: float = 0.05, near_threshold: float = 0.7,
                    ngram: int = 13) -> list[Invariant]:
    """The data invariants for records of `kind` ("sft", "preference", "eval").

    eval_sets: name -> eval records (or texts) for decontamination of training kinds;
    critic_enabled: require critic margins (None: not checked); train_format: the run's
    training format (records, and eval prompts outside probe suites, must use it).
    Near-duplicates gate training kinds only; for evaluation sets they are reported."""
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}; known: {KINDS}")
    invs: list[Invariant] = [RecordSchema(), NoChatMarkers(), PromptFormatParity()]
    if train_format is not None:
        invs.append(FormatMatchesTraining(train_format, **({"probe_suites": probe_suites} if probe_suites else {})))
    invs += [NonEmptyCompletions(), NoTruncatedCompletions(),
             DuplicateRate(exact_max, near_max if kind != "eval" else None, near_threshold)]
    if kind in ("sft", "preference"):
        if eval_sets is not None:
            invs.append(NoTrainEvalOverlap(eval_sets, ngram))
        if critic_enabled is not None:
            invs.append(CriticMarginsPresent(critic_enabled))
    if kind == "sft":
        invs.append(GatedChosenPasses())
    if kind == "preference":
        invs += [ChosenDiffersFromRejected(), ChosenPassesVerifier()]
    return invs


def eval_response_invariants(train_format: str | None = None, tokenizer=None) -> list[Invariant]:
    """For evaluation outputs (records with suite, model, key, format, prompt, response):
    canonical prompts, the training format outside probe suites, no chat markers in prompts
    or responses, and byte-identical prompts for every model of a suite; given the
    tokenizer the models were fed through, also the encoding sentinels on the prompts (no
    special ids, decode(encode(p)) == p). (Not the eval-set schema or duplicate checks: each
    item appears once per model by design.)"""
    invs: list[Invariant] = [PromptFormatParity(), NoChatMarkers(), PromptsIdenticalAcrossModels()]
    if train_format is not None:
        invs.insert(1, FormatMatchesTraining(train_format, require_format=True))
    if tokenizer is not None:
        invs += encoding_invariants(tokenizer=tokenizer)
    return invs


def encoding_invariants(allowed_ids: Iterable[int] = (), tokenizer=None) -> list[Invariant]:
    """Layers 2 and 5 on a run's prompts: no special ids, decode(encode(p)) == p. Subject: a
    `prompt_tokenizer_subject(records, tok)`, or - given `tokenizer` - the records themselves."""
    return [NoSpecialTokenIds(allowed_ids, tokenizer=tokenizer), RoundTrip(tokenizer=tokenizer)]
