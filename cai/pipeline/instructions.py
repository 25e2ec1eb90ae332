"""Instruction generation by few-shot completion (Self-Instruct style, for a *base* model).

The base model continues a numbered list of seed instructions (`formats.render_instruction_list`);
the next numbered items are parsed out of its continuation, normalised and filtered:

    parsed -> empty -> truncated -> too short / too long -> invalid -> near-duplicate -> kept

* truncated: the last item of a continuation that hit `max_new_tokens` without a line end;
* invalid: a prompt-format boundary or chat marker inside, mostly non-letters, or not
  renderable in the training format;
* near-duplicate: ROUGE-L F >= `instructions.dedup_threshold` against a seed or a kept item.
  ROUGE-L is implemented here (LCS over lowercase alphanumeric word tokens, the tokenisation
  of Google's `rouge-score` without stemming): 20 lines do not justify a dependency, and a
  test checks it against `rouge-score` where that package happens to be installed.

Generation runs in rounds until `ceil(n * overgenerate)` candidates are kept (the critic then
keeps the best n, see `critic.filter_instructions`); after `max_rounds` a shortfall is a
`CaiError` listing the count at every filter, never a silently smaller dataset.

Determinism and resume: round r's seed sampling uses an rng seeded by (seed, r) only, and
each prompt samples with its own seed (seed, r, prompt index), so outputs do not depend on
batching. Records are appended batch by batch with ids `inst-rRRR-pPPPP-iI` (round, prompt,
item); a resumed run skips the batches before the last written record, replays that batch
(ids already written are kept as they are) and continues, which reproduces the
uninterrupted run exactly. `source: templates` is the explicit alternative: instructions
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
from cai.pipeline import formats
from cai.pipeline.generation import derive_seed

SEEDS_PATH = Path(__file__).resolve().parent.parent / "data" / "seeds" / "instructions.jsonl"
ITEMS_PER_SAMPLE = 3  # numbered items asked of one continuation (generation stops at the next number)
FILTERS = ("empty", "truncated", "too_short", "too_long", "invalid", "near_duplicate")
CHAT_MARKERS = ("<|", "|>", "[INST]", "[/INST]", "<s>", "</s>", "### Assistant", "### Human", "<start_of_turn>",
                "Instruction:", "Response:")

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


def filter_reason(item: str, complete: bool, cfg: RunConfig, index: NearDupIndex) -> str | None:
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
    if any(m in item for m in CHAT_MARKERS) or letters < 0.5 * len(item.replace(" ", "")):
        return "invalid"
    try:
        formats.render(cfg.format, item)
    except formats.FormatError:
        return "invalid"
    if index.match(item) is not None:
        return "near_duplicate"
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


def generate_instructions(cfg: RunConfig, gen, writer) -> dict[str, Any]:
    """Write `ceil(n * overgenerate)` instruction candidates to `writer`; return stats.
    Resumes from `writer.done`. Raises CaiError when `max_rounds` cannot reach the target."""
    if cfg.instructions.source == "templates":
        return template_instructions(cfg, writer)
    started = time.perf_counter()
    ic = cfg.instructions
    target = target_count(cfg)
    seeds = load_seeds()
    index = NearDupIndex(ic.dedup_threshold)
    for s in seeds:
        index.add(s["instruction"])
    done_ids = {r["id"] for r in writer.done}
    kept = len(writer.done)
    for r in writer.done:
        index.add(r["instruction"])
    resume_at = (-1, -1)  # (round, batch) of the last written record: replay from there
    if writer.done:
        m = _ID.match(writer.done[-1]["id"])
        if m is None:
            raise CaiError(f"{writer.dir}: cannot resume: last record id {writer.done[-1]['id']!r} is not an instruction id")
        resume_at = (int(m.group(1)), int(m.group(2)) // ic.batch_size)
    counts = Counter({"prompts": 0, "parsed": 0, **{f: 0 for f in FILTERS}, "kept": 0})
    k = min(ic.seeds_per_prompt, len(seeds))
    stop = (formats.EXAMPLE_SEPARATOR, f"\n{k + 1 + ITEMS_PER_SAMPLE}.")
    tokens_before = gen.counters.get("generated_tokens", 0) if hasattr(gen, "counters") else 0
    rounds_run = 0
    from tqdm.auto import tqdm

    bar = tqdm(total=target, initial=kept, desc="instruction candidates", unit="inst", mininterval=1.0)
    for round_index in range(ic.max_rounds):
        if kept >= target:
            break
        rounds_run = round_index + 1
        seed_sets = round_seed_sets(cfg, round_index, len(seeds))
        for b, start in enumerate(range(0, len(seed_sets), ic.batch_size)):
            if kept >= target:
                break
            if (round_index, b) < resume_at:
                continue
            batch = list(range(start, min(start + ic.batch_size, len(seed_sets))))
            prompts = [formats.render_instruction_list([seeds[i]["instruction"] for i in seed_sets[j]]) for j in batch]
            outs = gen.generate(prompts, max_new_tokens=ic.max_new_tokens, temperature=ic.temperature, stop=stop,
                                seed=[derive_seed(cfg.seed, "instructions", round_index, j) for j in batch],
                                batch_size=ic.batch_size)
            counts["prompts"] += len(batch)
            new_records = []
            for j, out in zip(batch, outs):
                items = parse_numbered_continuation(out.text, k + 1, ended=out.stop_reason != "length")
                for m, (item, complete) in enumerate(items[:ITEMS_PER_SAMPLE]):
                    if kept >= target:
                        break
                    counts["parsed"] += 1
                    rid = _record_id(round_index, j, m)
                    if rid in done_ids:  # written before the interruption; already in the index
                        counts["kept"] += 1
                        continue
                    reason = filter_reason(item, complete, cfg, index)
                    if reason is not None:
                        counts[reason] += 1
                        continue
                    index.add(item)
                    kept += 1
                    counts["kept"] += 1
                    new_records.append({
                        "id": rid, "instruction": item, "type": infer_type(item), "source": "model",
                        "generation": {"round": round_index, "prompt_index": j, "item_index": m,
                                       "stop_reason": out.stop_reason, "seed_ids": list(seed_sets[j])},
                    })
            writer.extend(new_records)  # one batch at a time: a crash loses at most this batch
            bar.update(len(new_records))
    bar.close()
    stats = {
        "source": "model", "target": target, "n_written": kept, "rounds": rounds_run,
        "prompts_per_round": prompts_per_round(cfg), "items_per_sample": ITEMS_PER_SAMPLE,
        "counts": dict(counts), "resumed_records": len(done_ids),
        "types": dict(Counter(r["type"] for r in writer.done)),
        "dedup": {"metric": "ROUGE-L F (LCS of lowercase [a-z0-9]+ tokens)", "threshold": ic.dedup_threshold},
        "generated_tokens": (gen.counters.get("generated_tokens", 0) - tokens_before) if hasattr(gen, "counters") else None,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if kept < target:
        filters = ", ".join(f"{name} {counts[name]}" for name in FILTERS)
        raise CaiError(
            f"instructions: {kept} of {target} candidates after {ic.max_rounds} rounds "
            f"({counts['prompts']} prompts, {counts['parsed']} items parsed; rejected: {filters}); "
            "raise instructions.max_rounds, loosen min_words/max_words/dedup_threshold, or choose "
            "`source: templates` explicitly")
    return stats


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
