"""Instruction generation by few-shot completion (Self-Instruct style, for a *base* model).

The base model continues a numbered list of seed instructions (`formats.render_instruction_list`);
the next numbered items are parsed out of its continuation, normalised and filtered:

    parsed -> empty -> truncated -> too short / too long -> invalid -> near-duplicate -> contaminated -> kept

* truncated: the last item of a continuation that hit `max_new_tokens` without a line end;
* invalid: a prompt-format boundary or chat marker inside, mostly non-letters, or not
  renderable in the training format;
* near-duplicate: ROUGE-L F >= `instructions.dedup_threshold` against a seed or a kept item;
* contaminated: overlaps an item of an evaluation set in `eval.sets` (`EvalOverlapIndex`, the
  index the `no_train_eval_overlap` invariant checks training data with), so decontamination
  happens where instructions are made instead of failing the run stages later.
  ROUGE-L is implemented here (LCS over lowercase alphanumeric word tokens, the tokenisation
  of Google's `rouge-score` without stemming): 20 lines do not justify a dependency, and a
  test checks it against `rouge-score` where that package happens to be installed.

Generation runs in rounds until `ceil(n * overgenerate)` candidates are kept (the critic then
keeps the best n, see `critic.filter_instructions`); after `max_rounds` a shortfall is a
`CaiError` listing the count at every filter, never a silently smaller dataset.

Determinism, resume and sharding: round r's seed sampling uses an rng seeded by (seed, r)
only, and each prompt samples with its own seed (seed, r, prompt index), so outputs do not
depend on batching. The unit of work is one batch of prompts (`Unit`, one `generate` call);
records get ids `inst-rRRR-pPPPP-iI` (round, prompt, item). One `CandidateFilter` parses and
filters units in run order: a resumed run skips the units before the last written record and
replays that one, and `--shard I/N` generates raw continuations per unit in N processes that
`merge_candidates` feeds to the same filter, so all three keep the candidates of an
uninterrupted run. `source: templates` is the explicit alternative: instructions
from a small template set, every record labelled `source: "templates"`.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from cai.config import RunConfig
from cai.errors import CaiError
from cai.invariants.data import EvalOverlapIndex
from cai.invariants.markers import find_chat_markers
from cai.pipeline import formats
from cai.pipeline.generation import derive_seed

SEEDS_PATH = Path(__file__).resolve().parent.parent / "data" / "seeds" / "instructions.jsonl"
ITEMS_PER_SAMPLE = 3  # numbered items asked of one continuation (generation stops at the next number)
FILTERS = ("empty", "truncated", "too_short", "too_long", "invalid", "near_duplicate", "contaminated")
# The prompt formats' own labels ("Instruction:", "Response:"): text holding one reads as a second example.
FORMAT_LABELS = tuple(dict.fromkeys(part.strip() for f in formats.FORMATS.values() for part in (f.prefix, f.suffix)
                                    if part.strip()))

# Verifiable-constraint families (IFEval instruction ids where one fits).
TYPES: dict[str, str | None] = {
    "json": "detectable_format:json_format",
    "lowercase": "change_case:english_lowercase",
    "uppercase": "change_case:english_capital",
    "title": "detectable_format:title",
    "bullets": "detectable_format:number_bullet_lists",
    "ending": "startend:end_checker",
    "quotation": "startend:quotation",
    "no_commas": "punctuation:no_comma",
    "postscript": "detectable_content:postscript",
    "placeholders": "detectable_content:number_placeholders",
    "forbidden_words": "keywords:forbidden_words",
    "keywords": "keywords:existence",
    "paragraphs": "length_constraints:number_paragraphs",
    "sentences": "length_constraints:number_sentences",
    "words": "length_constraints:number_words",
    "count": None,  # "name three ...": a number of items, not an IFEval family
    "open": None,  # no verifiable constraint
}

_NUM = r"(?:\d+|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|fifteen|twenty|thirty|forty|fifty|a hundred|single)"
_TYPE_RULES: tuple[tuple[str, re.Pattern], ...] = tuple((name, re.compile(rx, re.IGNORECASE)) for name, rx in (
    ("json", r"\bjson\b"),
    ("lowercase", r"lower\s*-?\s*case|no capital letters"),
    ("uppercase", r"capital letters|upper\s*-?\s*case|all caps\b"),
    ("title", r"<<|angular brackets|\btitle\b.*\bbrackets\b"),
    ("postscript", r"\bp\.\s?s\.|postscript"),
    ("placeholders", r"placeholders?|square brackets"),
    ("quotation", r"(double )?quot(ation marks|es)\b.*\b(wrap|put|enclose|whole|entire)|\b(wrap|put|enclose)\b.*\bquot"),
    ("ending", r"\b(end|finish|conclude)\w*\b.{0,40}\b(with|by saying)\b.{0,20}(phrase|word|sentence|exact|[\"'])"),
    ("no_commas", r"\bcommas?\b"),
    ("forbidden_words", r"\b(without|do not|don't|never|avoid)\b.{0,15}\b(us|mention|say|includ)\w*\b.{0,10}\bwords?\b"),
    ("keywords", r"\b(keywords?|the words? [\"'])|\b(include|includes|including|use|mention|mentions|contain)s?\b.{0,12}\bwords?\b"),
    ("bullets", r"bullet"),
    ("paragraphs", r"\bparagraphs\b|" + _NUM + r"\s+paragraphs?\b"),
    ("sentences", r"\b" + _NUM + r"\s+sentences?\b"),
    ("words", r"\b(under|fewer than|less than|at most|no more than|maximum of|up to|within|exactly|at least)\s+" + _NUM + r"\s+words\b|\b" + _NUM + r"\s+words or (less|fewer)\b"),
    ("count", r"\b(list|name|give|suggest|provide|write|share|recommend)\b.{0,30}\b(two|three|four|five|six|seven|eight|nine|ten|\d+)\b"),
))


def infer_type(instruction: str) -> str:
    """The instruction's constraint family by keyword rules (first match wins), else 'open'."""
    for name, rx in _TYPE_RULES:
        if rx.search(instruction):
            return name
    return "open"


def load_seeds(path: str | Path = SEEDS_PATH) -> list[dict[str, Any]]:
    """The seed pool: JSONL of {"instruction", "type"}."""
    records = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    for i, r in enumerate(records):
        if not isinstance(r.get("instruction"), str) or r.get("type") not in TYPES:
            raise CaiError(f"{path}:{i + 1}: seed needs an 'instruction' string and a 'type' in {sorted(TYPES)}")
    return records


# ---------------------------------------------------------------------------- parsing

_ITEM = re.compile(r"^\s*(\d+)\.(?:\s+|$)(.*)$")


def normalise(text: str) -> str:
    return " ".join(text.split())


def parse_numbered_continuation(text: str, first_number: int, *, ended: bool) -> list[tuple[str, bool]]:
    """Items of a numbered list continued from a prompt ending in "{first_number}.".

    The first line of `text` is item `first_number`; each following line must be
    "{next number}. item" or the list has ended there. Returns (normalised item, complete)
    pairs; an item is complete when a line break follows it, or when it is the last and the
    generation ended on its own (`ended`: EOS or a stop string, not max_new_tokens)."""
    lines = text.split("\n")
    items: list[tuple[str, bool]] = []
    expected = first_number
    for pos, line in enumerate(lines):
        if pos == 0:
            body = line
        else:
            m = _ITEM.match(line)
            if m is None or int(m.group(1)) != expected:
                break
            body = m.group(2)
        complete = pos < len(lines) - 1 or ended
        items.append((normalise(body), complete))
        expected += 1
    return items


# ---------------------------------------------------------------------------- ROUGE-L / dedup

_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's tokenisation without stemming: lowercase, runs of [a-z0-9]."""
    return _TOKEN.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(a: str | Sequence[str], b: str | Sequence[str]) -> float:
    """ROUGE-L F1 between two texts (or token lists): 2 LCS / (|a| + |b|); 0 if either is empty."""
    ta = rouge_tokens(a) if isinstance(a, str) else list(a)
    tb = rouge_tokens(b) if isinstance(b, str) else list(b)
    if not ta or not tb:
        return 0.0
    return 2 * lcs_length(ta, tb) / (len(ta) + len(tb))


@dataclass
class NearDupIndex:
    """Texts seen so far; `match(text)` finds one with ROUGE-L F >= threshold.

    Cheap bounds skip most LCS computations: F <= 2 min(|a|,|b|) / (|a|+|b|) and
    LCS <= the multiset overlap of the two token lists."""

    threshold: float
    _tokens: list[list[str]] = field(default_factory=list)
    _counts: list[Counter] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        tokens = rouge_tokens(text)
        self.texts.append(text)
        self._tokens.append(tokens)
        self._counts.append(Counter(tokens))

    def match(self, text: str) -> tuple[str, float] | None:
        tokens = rouge_tokens(text)
        if not tokens:
            return None
        counts = Counter(tokens)
        n = len(tokens)
        for other, other_counts, other_text in zip(self._tokens, self._counts, self.texts):
            m = len(other)
            if not m:
                continue
            need = self.threshold * (n + m) / 2  # LCS needed for F >= threshold
            if min(n, m) < need or sum((counts & other_counts).values()) < need:
                continue
            score = 2 * lcs_length(tokens, other) / (n + m)
            if score >= self.threshold:
                return other_text, score
        return None


def holds_marker(text: str) -> bool:
    """A chat marker of any family (`cai.invariants.markers`, the invariants' own list) or a
    prompt-format label in `text`: generated text that is unusable as an instruction or response."""
    return any(label in text for label in FORMAT_LABELS) or bool(find_chat_markers(text))


def filter_reason(item: str, complete: bool, cfg: RunConfig, index: NearDupIndex,
                  eval_overlap: EvalOverlapIndex | None = None) -> str | None:
    """The first filter an item fails (a name in FILTERS), or None if it is kept."""
    if not item:
        return "empty"
    if not complete:
        return "truncated"
    n_words = len(item.split())
    if n_words < cfg.instructions.min_words:
        return "too_short"
    if n_words > cfg.instructions.max_words:
        return "too_long"
    letters = sum(ch.isalpha() for ch in item)
    if letters < 0.5 * len(item.replace(" ", "")) or filter_reason_format(cfg, item):
        return "invalid"
    if index.match(item) is not None:
        return "near_duplicate"
    if eval_overlap is not None and eval_overlap.match(item) is not None:
        return "contaminated"
    return None


# ---------------------------------------------------------------------------- generation


def target_count(cfg: RunConfig) -> int:
    """Candidates to produce: n * overgenerate (the critic keeps the best n)."""
    return math.ceil(cfg.instructions.n * cfg.instructions.overgenerate)


def prompts_per_round(cfg: RunConfig) -> int:
    """Prompts in one round: enough to reach the target if every item survived, in whole batches.
    A function of the config only, so resumed and uninterrupted runs have the same rounds."""
    bs = cfg.instructions.batch_size
    return bs * max(1, math.ceil(target_count(cfg) / ITEMS_PER_SAMPLE / bs))


def round_seed_sets(cfg: RunConfig, round_index: int, pool_size: int) -> list[list[int]]:
    """Seed indices for every prompt of a round; depends only on (seed, round)."""
    rng = random.Random(derive_seed(cfg.seed, "instructions", round_index))
    k = min(cfg.instructions.seeds_per_prompt, pool_size)
    return [rng.sample(range(pool_size), k) for _ in range(prompts_per_round(cfg))]


def _record_id(round_index: int, prompt_index: int, item_index: int) -> str:
    return f"inst-r{round_index:03d}-p{prompt_index:04d}-i{item_index}"


_ID = re.compile(r"^inst-r(\d+)-p(\d+)-i(\d+)$")
_RAW_ID = re.compile(r"^raw-r(\d+)-p(\d+)$")  # one raw continuation (a shard's record)


@dataclass(frozen=True)
class Unit:
    """One batch of list prompts (one `generate` call): the unit of resume and of sharding.
    `index` is its place in the run order over all rounds."""

    index: int
    round: int
    prompts: tuple[int, ...]  # prompt indices within the round


def candidate_units(cfg: RunConfig) -> list[Unit]:
    """Every batch the stage may generate, in run order: rounds, then batches within a round."""
    bs, per_round = cfg.instructions.batch_size, prompts_per_round(cfg)
    return [Unit(r * (per_round // bs) + b, r, tuple(range(start, start + bs)))
            for r in range(cfg.instructions.max_rounds) for b, start in enumerate(range(0, per_round, bs))]


def unit_of_record(cfg: RunConfig, record_id: str) -> int:
    m = _ID.match(record_id) or _RAW_ID.match(record_id)
    if m is None:
        raise CaiError(f"cannot resume: record id {record_id!r} is not an instruction id")
    per_round = prompts_per_round(cfg) // cfg.instructions.batch_size
    return int(m.group(1)) * per_round + int(m.group(2)) // cfg.instructions.batch_size


def generate_unit(cfg: RunConfig, gen, seeds: Sequence[dict], unit: Unit) -> list[dict[str, Any]]:
    """The raw continuations of one unit, in prompt order: one batched `generate` call with a
    seed per prompt, so the outputs do not depend on where or when the unit runs."""
    ic = cfg.instructions
    seed_sets = round_seed_sets(cfg, unit.round, len(seeds))
    k = min(ic.seeds_per_prompt, len(seeds))
    prompts = [formats.render_instruction_list([seeds[i]["instruction"] for i in seed_sets[j]]) for j in unit.prompts]
    outs = gen.generate(prompts, max_new_tokens=ic.max_new_tokens, temperature=ic.temperature,
                        stop=(formats.EXAMPLE_SEPARATOR, f"\n{k + 1 + ITEMS_PER_SAMPLE}."),
                        seed=[derive_seed(cfg.seed, "instructions", unit.round, j) for j in unit.prompts],
                        batch_size=ic.batch_size)
    return [{"id": f"raw-r{unit.round:03d}-p{j:04d}", "unit": unit.index, "round": unit.round, "prompt_index": j,
             "seed_ids": list(seed_sets[j]), "text": out.text, "stop_reason": out.stop_reason}
            for j, out in zip(unit.prompts, outs)]


# The IFEval families cai's instruction types map to, in TYPES order: the constraints
# `instructions.constraints` may add.
CONSTRAINT_FAMILIES: dict[str, str] = {iid: name for name, iid in TYPES.items() if iid}


def add_constraints(cfg: RunConfig, records: Sequence[dict]) -> tuple[list[dict], dict[str, Any]]:
    """Give a share (`instructions.constraints`) of the kept open instructions one verifiable
    constraint, as the IFEval-style data recipes do (Tulu 3's constraint-augmented prompts):
    the model-written task, then lm-eval's own description of a constraint of one family
    (`evaluate.describe_constraint`), its arguments drawn with a seed of (run seed, record
    id). The record carries `instruction_id_list` and `kwargs`, so the responses stage gates
    the chosen answer by that checker, and `task`, the text the critic judged. Instructions
    that already state a constraint (type not "open") are left alone, as is one whose
    constrained text would overlap an evaluation item under every family tried."""
    from cai.pipeline.evaluate import describe_constraint

    share = cfg.instructions.constraints
    stats: dict[str, Any] = {"share": share, "added": 0, "families": Counter(), "left_contaminated": 0}
    if share <= 0:
        return list(records), {"share": share, "added": 0}
    overlap = decontamination_index(cfg)
    out = []
    for rec in records:
        rng = random.Random(derive_seed(cfg.seed, "constraint", rec["id"]))
        if rec.get("type") != "open" or rng.random() >= share:
            out.append(rec)
            continue
        for iid in rng.sample(list(CONSTRAINT_FAMILIES), len(CONSTRAINT_FAMILIES)):
            description, kwargs = describe_constraint(iid, rng.randrange(2 ** 31))
            text = f"{rec['instruction']} {description}"
            if overlap.match(text) is None and filter_reason_format(cfg, text) is None:
                out.append(dict(rec, instruction=text, task=rec["instruction"], type=CONSTRAINT_FAMILIES[iid],
                                instruction_id_list=[iid], kwargs=[kwargs]))
                stats["added"] += 1
                stats["families"][iid] += 1
                break
        else:
            out.append(rec)
            stats["left_contaminated"] += 1
    stats["families"] = dict(sorted(stats["families"].items()))
    return out, stats


def filter_reason_format(cfg: RunConfig, text: str) -> str | None:
    """"invalid" when `text` holds a marker or does not render in the training format."""
    if holds_marker(text):
        return "invalid"
    try:
        formats.render(cfg.format, text)
    except formats.FormatError:
        return "invalid"
    return None


def decontamination_index(cfg: RunConfig) -> EvalOverlapIndex:
    """The n-gram index of every item of the run's evaluation sets (`eval.sets`, whole, not
    `eval.limit`'s slice): one candidate overlapping any of them is dropped."""
    from cai.pipeline.compare import load_eval_set

    return EvalOverlapIndex({name: load_eval_set(name) for name in cfg.eval.sets})


class CandidateFilter:
    """Parses and filters raw continuations fed in run order until the target is kept.

    One object decides for an uninterrupted run, a resumed one and a merge of shards, so all
    three keep the same candidates. `done`: records already written (a resumed run), which
    count as kept and seed the near-duplicate index."""

    def __init__(self, cfg: RunConfig, seeds: Sequence[dict], done: Sequence[dict] = ()):
        self.cfg, self.target = cfg, target_count(cfg)
        self.k = min(cfg.instructions.seeds_per_prompt, len(seeds))
        self.index = NearDupIndex(cfg.instructions.dedup_threshold)
        for text in [s["instruction"] for s in seeds] + [r["instruction"] for r in done]:
            self.index.add(text)
        self.eval_overlap = decontamination_index(cfg)
        self.done_ids = {r["id"] for r in done}
        self.kept = len(done)
        self.counts = Counter({"prompts": 0, "parsed": 0, **{f: 0 for f in FILTERS}, "kept": 0})

    @property
    def full(self) -> bool:
        return self.kept >= self.target

    def feed(self, raw: Sequence[dict]) -> list[dict[str, Any]]:
        """New candidate records from one unit's raw continuations."""
        new = []
        self.counts["prompts"] += len(raw)
        for out in raw:
            items = parse_numbered_continuation(out["text"], self.k + 1, ended=out["stop_reason"] != "length")
            for m, (item, complete) in enumerate(items[:ITEMS_PER_SAMPLE]):
                if self.full:
                    break
                self.counts["parsed"] += 1
                rid = _record_id(out["round"], out["prompt_index"], m)
                if rid in self.done_ids:  # written before the interruption; already in the index
                    self.counts["kept"] += 1
                    continue
                reason = filter_reason(item, complete, self.cfg, self.index, self.eval_overlap)
                if reason is not None:
                    self.counts[reason] += 1
                    continue
                self.index.add(item)
                self.kept += 1
                self.counts["kept"] += 1
                new.append({
                    "id": rid, "instruction": item, "type": infer_type(item), "source": "model",
                    "generation": {"round": out["round"], "prompt_index": out["prompt_index"], "item_index": m,
                                   "stop_reason": out["stop_reason"], "seed_ids": list(out["seed_ids"])},
                })
        return new

    def stats(self, records: Sequence[dict], rounds: int) -> dict[str, Any]:
        """Stage stats; a shortfall after the whole budget is a CaiError with every filter's count."""
        ic = self.cfg.instructions
        counts = self.counts
        if not self.full:
            filters = ", ".join(f"{name} {counts[name]}" for name in FILTERS)
            raise CaiError(
                f"instructions: {self.kept} of {self.target} candidates after {ic.max_rounds} rounds "
                f"({counts['prompts']} prompts, {counts['parsed']} items parsed; rejected: {filters}); "
                "raise instructions.max_rounds, loosen min_words/max_words/dedup_threshold, or choose "
                "`source: templates` explicitly")
        return {
            "source": "model", "target": self.target, "n_written": self.kept, "rounds": rounds,
            "prompts_per_round": prompts_per_round(self.cfg), "items_per_sample": ITEMS_PER_SAMPLE,
            "counts": dict(counts), "resumed_records": len(self.done_ids),
            "types": dict(Counter(r["type"] for r in records)),
            "dedup": {"metric": "ROUGE-L F (LCS of lowercase [a-z0-9]+ tokens)", "threshold": ic.dedup_threshold},
        }


def generate_instructions(cfg: RunConfig, gen, writer) -> dict[str, Any]:
    """Write `ceil(n * overgenerate)` instruction candidates to `writer`; return stats.
    Resumes from `writer.done`: units before the one holding the last written record are
    skipped, that one is replayed. Raises CaiError when `max_rounds` cannot reach the target."""
    if cfg.instructions.source == "templates":
        return template_instructions(cfg, writer)
    from tqdm.auto import tqdm

    started = time.perf_counter()
    seeds = load_seeds()
    filt = CandidateFilter(cfg, seeds, writer.done)
    resume_at = unit_of_record(cfg, writer.done[-1]["id"]) if writer.done else -1
    tokens_before = gen.counters.get("generated_tokens", 0) if hasattr(gen, "counters") else 0
    rounds = 0
    bar = tqdm(total=filt.target, initial=filt.kept, desc="instruction candidates", unit="inst", mininterval=1.0)
    for unit in candidate_units(cfg):
        if filt.full:
            break
        if unit.index < resume_at:
            continue
        records = filt.feed(generate_unit(cfg, gen, seeds, unit))
        writer.extend(records)  # one unit at a time: a crash loses at most this unit
        bar.update(len(records))
        rounds = unit.round + 1
    bar.close()
    stats = filt.stats(writer.done, rounds)
    stats["generated_tokens"] = (gen.counters.get("generated_tokens", 0) - tokens_before) if hasattr(gen, "counters") else None
    stats["seconds"] = round(time.perf_counter() - started, 3)
    return stats


def generate_candidate_shard(cfg: RunConfig, gen, writer, shard, siblings: Sequence[Path], *,
                             log=print, poll_seconds: float = 2.0) -> dict[str, Any]:
    """Shard `shard`'s units of raw continuations (see `cai.pipeline.sharding`); the merge
    feeds all shards' units to one `CandidateFilter` in run order.

    How far to go is decided on the run order, not per shard: before each of its units the
    shard feeds every unit written so far by anyone (`siblings`: the other shards'
    directories) to a filter and stops once the target is reached before that unit. It runs
    at most one unit per shard ahead of the slowest sibling, so the work generated past the
    stopping point is bounded by a unit per shard."""
    from cai.pipeline.sharding import wait_until
    from cai.pipeline.store import peek_records

    seeds = load_seeds()
    units = candidate_units(cfg)
    filt = CandidateFilter(cfg, seeds)
    seen: dict[int, dict[str, dict]] = {}
    frontier = 0  # units [0, frontier) have been fed to `filt`

    def advance() -> None:
        nonlocal frontier
        for r in [*writer.done, *(r for d in siblings for r in peek_records(d))]:
            seen.setdefault(r["unit"], {})[r["id"]] = r
        while not filt.full and frontier < len(units) and len(seen.get(frontier, {})) == len(units[frontier].prompts):
            filt.feed(sorted(seen[frontier].values(), key=lambda r: r["prompt_index"]))
            frontier += 1

    from tqdm.auto import tqdm

    bar = tqdm(total=filt.target, desc=f"instruction candidates (all shards, seen by {shard.name})", unit="inst",
               mininterval=1.0)
    generated = []
    for unit in units:
        if not shard.owns(unit.index):
            continue

        def blocking() -> str | None:
            advance()
            bar.update(filt.kept - bar.n)
            if filt.full or frontier >= unit.index - shard.count + 1:
                return None
            return f"unit {frontier} (shard {frontier % shard.count}) before this shard's unit {unit.index}"

        wait_until(blocking, what="candidate units of other shards", log=log, poll_seconds=poll_seconds)
        if filt.full:
            break
        done_ids = {r["id"] for r in seen.get(unit.index, {}).values()}
        if len(done_ids) == len(unit.prompts):  # finished before a restart
            generated.append(unit.index)
            continue
        raw = generate_unit(cfg, gen, seeds, unit)
        writer.extend(r for r in raw if r["id"] not in done_ids)  # a resumed shard replays its last unit
        generated.append(unit.index)
    bar.close()
    return {"units": generated, "raw_records": len(writer.done), "stopped_full": filt.full,
            "kept_when_stopped": filt.kept}


def merge_candidates(cfg: RunConfig, raw: Sequence[dict], shard_count: int) -> tuple[list[dict], dict[str, Any]]:
    """The candidates of an unsharded run from all shards' raw continuations: units fed in
    run order until the target is kept. A unit missing before that point is an error."""
    units = candidate_units(cfg)
    by_unit: dict[int, list[dict]] = {}
    for r in raw:
        by_unit.setdefault(r["unit"], []).append(r)
    filt = CandidateFilter(cfg, load_seeds())
    records, rounds = [], 0
    for unit in units:
        if filt.full:
            break
        got = sorted(by_unit.get(unit.index, []), key=lambda r: r["prompt_index"])
        if [r["prompt_index"] for r in got] != list(unit.prompts):
            raise CaiError(f"candidates: unit {unit.index} is missing from the shards (shard {unit.index % shard_count} "
                           f"of {shard_count} wrote {len(got)} of its {len(unit.prompts)} prompts) although the "
                           "target was not reached before it; rerun that shard")
        records += filt.feed(got)
        rounds = unit.round + 1
    return records, filt.stats(records, rounds)


# ---------------------------------------------------------------------------- templates

TEMPLATE_TOPICS = (
    "the ocean", "coffee", "public libraries", "bicycles", "volcanoes", "friendship", "rainy days", "chess",
    "the moon", "gardening", "trains", "honeybees", "winter", "museums", "recycling", "mountains", "bread",
    "robots", "deserts", "music lessons", "city parks", "owls", "the internet", "camping", "tea", "forests",
    "airports", "football", "rivers", "birthdays",
)
TEMPLATE_WORDS = ("bright", "simple", "future", "careful", "journey", "quiet")
# (template, type): {topic}, {n} (a number word) and {word} are filled in.
TEMPLATES: tuple[tuple[str, str], ...] = (
    ("Write {n} bullet points about {topic}.", "bullets"),
    ("Describe {topic} in exactly {n} sentences.", "sentences"),
    ("Explain {topic} in fewer than {n0} words.", "words"),
    ("Write a short paragraph about {topic} using only lowercase letters.", "lowercase"),
    ("Write a slogan about {topic} in all capital letters.", "uppercase"),
    ("Give a JSON object with the keys \"topic\" and \"fact\" about {topic}.", "json"),
    ("Write two sentences about {topic} and end your response with the exact phrase \"That is all.\"", "ending"),
    ("Write a short note about {topic} that includes the word \"{word}\".", "keywords"),
    ("Describe {topic} without using any commas.", "no_commas"),
    ("Write a short poem about {topic} with a title wrapped in double angular brackets, such as <<title>>.", "title"),
    ("Name {n} facts about {topic}.", "count"),
    ("Write {n} paragraphs about {topic}.", "paragraphs"),
    ("What makes {topic} interesting?", "open"),
)
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}


def template_instructions(cfg: RunConfig, writer) -> dict[str, Any]:
    """`source: templates`: `ceil(n * overgenerate)` instructions from TEMPLATES x topics,
    shuffled with the run seed; every record says `source: "templates"`. Only exact
    duplicates are possible (and impossible by construction): template instances differ in
    one slot, so the ROUGE-L near-duplicate filter is not applied to them."""
    target = target_count(cfg)
    combos = [(t, topic) for t in range(len(TEMPLATES)) for topic in range(len(TEMPLATE_TOPICS))]
    if target > len(combos):
        raise CaiError(f"instructions: source templates offers {len(combos)} instructions, {target} needed "
                       "(n * overgenerate); lower instructions.n or use source: model")
    rng = random.Random(derive_seed(cfg.seed, "templates"))
    rng.shuffle(combos)
    done_ids = {r["id"] for r in writer.done}
    records = []
    for i, (t, topic) in enumerate(combos[:target]):
        rid = f"tpl-{i:05d}"
        if rid in done_ids:
            continue
        template, kind = TEMPLATES[t]
        number = 2 + (t + topic) % 4
        text = template.format(topic=TEMPLATE_TOPICS[topic], n=NUMBER_WORDS[number], n0=20 * number,
                               word=TEMPLATE_WORDS[(t * 7 + topic) % len(TEMPLATE_WORDS)])
        records.append({"id": rid, "instruction": text, "type": kind, "source": "templates",
                        "generation": {"template": t, "topic": TEMPLATE_TOPICS[topic]}})
    writer.extend(records)
    return {"source": "templates", "target": target, "n_written": len(writer.done), "resumed_records": len(done_ids),
            "available": len(combos), "types": dict(Counter(r["type"] for r in writer.done))}
