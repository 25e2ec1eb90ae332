"""Preference pairs from the best-of-N SFT records (no model needed).

* critic pairs (`negative_type: "critic"`): chosen = the critic's best candidate; rejected =
  each other usable candidate whose direct combined margin against the chosen one
  (`margin_vs_chosen`, from the round robin in responses.py) is >= `pairs.min_margin`.
  `margin` is that judged gap (nats).
* typed hard negatives when `pairs.synthetic_negatives` (`margin: null`, never judged):
  - `truncated`: the chosen response cut near its middle at a word boundary;
  - `off_topic`: the chosen response of another instruction (a seeded derangement);
  - `over_verbose`: the chosen response padded with filler and repeated, so "longer is
    better" cannot creep in;
  - `constraint_ignored`: where the instruction's type names a checkable constraint with a
    mechanical violation (case, bullets, ending phrase, quotation, title), the chosen
    response with that constraint undone.

* verifier pairs (`negative_type: "verifier"`, `margin: null`): where responses.py gated the
  instruction by its IFEval checker, chosen (which passes) against each usable candidate that
  fails, whatever the critic's gap (kept as `critic_margin_vs_chosen`). A gated record whose
  chosen fails gives no pair.

Every pair has chosen != rejected and no two pairs are the same (`pair_key`); `prompt` =
`formats.render(format, instruction)` and chosen/rejected carry the completion prefix,
exactly like the SFT completion. The stats count the pairs of each rule (`RULES`) and every
pair dropped, by reason.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from typing import Any, Sequence

from cai.config import RunConfig
from cai.invariants.data import words
from cai.pipeline import formats
from cai.pipeline.generation import derive_seed

FILLER = (
    "I hope this helps.",
    "This is a question that many people ask, and it is worth thinking about carefully.",
    "There are many different ways to look at this, and each of them has its own merits.",
    "Let me know if you would like more details on any part of this answer.",
    "It is important to keep all of these points in mind.",
)
MIN_WORDS_TO_TRUNCATE = 6
RULES = ("critic", "verifier", "truncated", "off_topic", "over_verbose", "constraint_ignored")


def _response(record: dict) -> str:
    completion = record["completion"]
    prefix = formats.COMPLETION_PREFIX
    return completion[len(prefix):] if completion.startswith(prefix) else completion


def truncate_midway(text: str) -> str | None:
    """`text` cut at the last word boundary before its middle (None if too short to cut)."""
    if len(text.split()) < MIN_WORDS_TO_TRUNCATE:
        return None
    cut = text.rfind(" ", 0, len(text) // 2)
    return text[:cut].rstrip() if cut > 0 else None


def over_verbose(text: str, rng: random.Random) -> str:
    filler = " ".join(rng.sample(FILLER, 3))
    return f"{text} {filler}\n\nTo repeat the answer: {text}"


def ignore_constraint(text: str, kind: str | None, instruction: str) -> str | None:
    """The response with the instruction's constraint undone, where that is mechanical."""
    if kind == "lowercase":
        out = re.sub(r"(^|[.!?]\s+)([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)
        out = out[:1].upper() + out[1:]
    elif kind == "uppercase":
        out = text.lower()
    elif kind == "bullets":
        out = " ".join(re.sub(r"^\s*(?:[*\-•]|\d+[.)])\s+", "", line) for line in text.splitlines() if line.strip())
    elif kind == "ending":
        quoted = re.findall(r"\"([^\"]+)\"", instruction)
        out = text
        if quoted and text.rstrip().endswith(quoted[-1].strip()):
            out = text.rstrip()[: -len(quoted[-1].strip())].rstrip()
    elif kind == "quotation":
        out = text.strip().strip("\"“”").strip()
    elif kind == "title":
        out = re.sub(r"<<[^>]*>>\s*", "", text).strip()
    else:
        return None
    return out if out and out != text else None


def _pair(rec: dict, rejected_text: str, negative_type: str, margin: float | None, suffix: str) -> dict[str, Any]:
    return {
        "id": f"{rec['id']}-{suffix}",
        "instruction": rec["instruction"],
        "format": rec["format"],
        "prompt": rec["prompt"],
        "chosen": rec["completion"],
        "rejected": formats.COMPLETION_PREFIX + rejected_text,
        "margin": None if margin is None else round(margin, 4),
        "negative_type": negative_type,
        "type": rec.get("type"),
        "source": rec.get("source"),
        "sft_id": rec["id"],
        # the constraint travels with the pair, so `chosen_passes_verifier` re-checks it
        **{k: rec[k] for k in ("instruction_id_list", "kwargs") if k in rec},
    }


def pair_key(pair: dict) -> tuple[str, str, str]:
    """What makes two pairs the same: `duplicate_rate`'s key (normalised instruction, chosen
    and rejected stripped), so a pair kept here is never an exact duplicate there."""
    return " ".join(words(pair["instruction"])), pair["chosen"].strip(), pair["rejected"].strip()


def build_pairs(cfg: RunConfig, sft_records: Sequence[dict]) -> tuple[list[dict], dict[str, Any]]:
    """All preference pairs for `sft_records` (deterministic given cfg.seed) and stats.

    Rules run in order critic/verifier, then the typed negatives; a pair whose rejected
    equals its chosen, or which repeats an earlier pair (`pair_key`), is dropped and
    counted in `skipped` as `<rule>_equals_chosen` / `<rule>_duplicate_of_<earlier rule>`.
    (A typed negative can equal a critic pair: `off_topic` is another instruction's chosen
    response, which a small model may also have sampled for this one.) A gated record whose
    chosen fails its verifier (`verifier.chosen_passes` false, see responses.py) yields no
    pair at all."""
    records = sorted(sft_records, key=lambda r: r["id"])
    rng = random.Random(derive_seed(cfg.seed, "pairs"))
    offset = 1 + rng.randrange(len(records) - 1) if len(records) > 1 else 0
    pairs: list[dict] = []
    seen: dict[tuple[str, str, str], str] = {}
    skipped: Counter = Counter()

    def add(pair: dict) -> None:
        rule, key = pair["negative_type"], pair_key(pair)
        if key[1] == key[2]:
            skipped[f"{rule}_equals_chosen"] += 1
        elif key in seen:
            skipped[f"{rule}_duplicate_of_{seen[key]}"] += 1
        else:
            seen[key] = rule
            pairs.append(pair)

    for n, rec in enumerate(records):
        gate = rec.get("verifier")
        if gate and not gate["chosen_passes"]:
            skipped["chosen_fails_verifier"] += 1
            continue
        chosen = _response(rec)
        for i, cand in enumerate(rec.get("candidates") or []):
            if i == rec.get("chosen_index") or not cand.get("usable"):
                continue
            gap = cand.get("margin_vs_chosen")
            if gate and cand.get("verifier_pass") is False:  # the checker decides, whatever the critic's gap
                add(dict(_pair(rec, cand["text"], "verifier", None, f"verifier-{i}"), critic_margin_vs_chosen=gap,
                         instruction_ids=gate["instruction_id_list"]))
                continue
            if gap is None or gap < cfg.pairs.min_margin:
                skipped["critic_below_min_margin" if gap is not None else "critic_not_judged"] += 1
                continue
            add(_pair(rec, cand["text"], "critic", gap, f"critic-{i}"))
        if not cfg.pairs.synthetic_negatives:
            continue
        local = random.Random(derive_seed(cfg.seed, "pairs", rec["id"]))
        negatives = {
            "truncated": truncate_midway(chosen),
            "off_topic": _response(records[(n + offset) % len(records)]) if offset else None,
            "over_verbose": over_verbose(chosen, local),
            "constraint_ignored": ignore_constraint(chosen, rec.get("type"), rec["instruction"]),
        }
        for kind, text in negatives.items():
            if text is None or not text.strip():
                skipped[f"{kind}_not_applicable"] += 1
                continue
            add(_pair(rec, text, kind, None, kind))
    stats = {
        "sft_records": len(records), "pairs": len(pairs),
        "by_negative_type": {rule: sum(p["negative_type"] == rule for p in pairs) for rule in RULES},
        "min_margin": cfg.pairs.min_margin, "synthetic_negatives": cfg.pairs.synthetic_negatives,
        "verifier_gated_records": sum(1 for r in records if r.get("verifier")),
        "skipped": dict(sorted(skipped.items())),
    }
    return pairs, stats


def run_pairs(cfg: RunConfig, sft_records: Sequence[dict], writer) -> dict[str, Any]:
    """Write the pairs of `build_pairs` not already in `writer.done`; return stats."""
    pairs, stats = build_pairs(cfg, sft_records)
    done = {r["id"] for r in writer.done}
    writer.extend(p for p in pairs if p["id"] not in done)
    return dict(stats, resumed_records=len(done), n_records=len(writer.done))
