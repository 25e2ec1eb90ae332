"""Responses by few-shot completion, best-of-N chosen by the critic.

For each instruction the base model completes a URIAL-style few-shot prompt
(`formats.render_fewshot`: `responses.shots` solved examples from
`cai/data/seeds/fewshot_examples.jsonl`, drawn per instruction with a seeded rng, then the
new instruction). Generation stops at the next example boundary
(`formats.stop_sequences(cfg.format)`), so a completion never runs into a new
"Instruction:" block. N = `responses.n_candidates` samples are drawn at
`responses.temperature`; each request has its own seed (run seed, instruction id, j, round),
so outputs do not depend on batching and a resumed run equals an uninterrupted one. An
instruction whose N samples are all unusable gets N more, up to `responses.max_rounds`.

Selection (round robin among the contenders): every pair of contenders is judged once by
the A/B response critic (with swap when `critic.swap`); a contender's score is its mean
combined margin against the other contenders, and the best score is chosen. The contenders
are the usable candidates that may be chosen: where the instruction is gated (below) and
some pass, only those; otherwise every usable one. Each other contender's direct margin
against the chosen one is stored (`margin_vs_chosen`), so `pairs.py` builds preference
pairs from records alone; a candidate that fails its checker is a verifier pair whatever
the critic thinks, so it is not judged. Cost: C(C-1)/2 judgements (x2 forward passes with
swap) for C contenders. Usable = non-empty, no chat marker, and ended by itself (a
candidate cut by `max_new_tokens` would teach the model to stop mid-sentence once EOS is
appended).

Verifier gating (DESIGN.md, methodology notes): where an instruction's constraint is known
exactly (`verifiable_constraint`), every usable candidate gets lm-eval's strict IFEval verdict
(`verifier_pass`, from the canonical scorer `evaluate.score_item`). A failing candidate is
never chosen while a passing one exists; an instruction with none counts as unanswered for
resampling (same `responses.max_rounds` budget). If still none passes, the SFT record is kept,
chosen by the critic as before, and marked `verifier.chosen_passes: false` (counted in the
stats): the shortfall rule stays about usable text, and `pairs.py` builds no pair for it, so
no preference pair ever prefers a failing response.

The stored SFT record's `prompt` is `formats.render(cfg.format, instruction)` alone; the
few-shot context is scaffolding, identified by `fewshot_context_sha256`.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import Counter
from functools import lru_cache
from itertools import combinations
from pathlib import Path
from typing import Any, Sequence

from cai.config import RunConfig
from cai.errors import BadInputError, CaiError
from cai.pipeline import critic, formats
from cai.pipeline.generation import derive_seed
from cai.pipeline.instructions import TYPES, holds_marker

FEWSHOT_PATH = Path(__file__).resolve().parent.parent / "data" / "seeds" / "fewshot_examples.jsonl"


def load_fewshot_examples(path: str | Path = FEWSHOT_PATH) -> list[tuple[str, str]]:
    """Shipped (instruction, response) examples for few-shot response prompts."""
    out = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        r = json.loads(line)
        if not isinstance(r.get("instruction"), str) or not isinstance(r.get("response"), str):
            raise CaiError(f"{path}:{i + 1}: a few-shot example needs 'instruction' and 'response' strings")
        out.append((r["instruction"], r["response"]))
    return out


def fewshot_for(cfg: RunConfig, record_id: str, instruction: str,
                examples: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """`responses.shots` examples for one instruction: seeded by (run seed, id), never the instruction itself."""
    pool = [e for e in examples if e[0].strip() != instruction.strip()]
    rng = random.Random(derive_seed(cfg.seed, "fewshot", record_id))
    return rng.sample(pool, min(cfg.responses.shots, len(pool)))


def fewshot_prompt(cfg: RunConfig, instruction: str, shots: Sequence[tuple[str, str]]) -> tuple[str, str]:
    """(few-shot prompt, sha256 of its context: the part before the canonical prompt)."""
    prompt = formats.render_fewshot(cfg.format, shots, instruction)
    canonical = formats.render(cfg.format, instruction)
    if not prompt.endswith(canonical):
        raise CaiError(f"few-shot prompt does not end with the canonical prompt for format {cfg.format!r}")
    context = prompt[: len(prompt) - len(canonical)]
    return prompt, hashlib.sha256(context.encode()).hexdigest()


def unusable_reason(text: str, stop_reason: str) -> str | None:
    if not text:
        return "empty"
    if holds_marker(text):
        return "marker"
    if stop_reason == "length":
        return "truncated"
    return None


@lru_cache(maxsize=None)
def _takes_no_arguments(instruction_id: str) -> bool:
    """Whether lm-eval's checker for `instruction_id` is fully specified without kwargs
    (asked of the checker itself via `evaluate.validate_item`, not listed here)."""
    from cai.pipeline.evaluate import validate_item

    try:
        validate_item({"key": instruction_id, "instruction_id_list": [instruction_id], "kwargs": [{}]})
    except BadInputError:
        return False
    return True


def verifiable_constraint(rec: dict) -> dict | None:
    """The instruction's verifiable constraint as an IFEval item (`key, prompt,
    instruction_id_list, kwargs` + `source`), or None when it is not known exactly.

    Known exactly in two cases: the record carries IFEval `instruction_id_list` and `kwargs`
    (source "record"); or it is a `source: templates` instruction, whose `type` the template
    set (not guessed), mapping (`instructions.TYPES`) to a checker that needs no arguments:
    case, JSON, title, quotation, no commas (source "template type"). Not gated: types of
    model-generated instructions (inferred by keyword rules, which misfire on "explain when
    to use commas"), and checkers with arguments (counts, phrases, keywords) whose values no
    record carries."""
    rid = rec.get("id")
    if "instruction_id_list" in rec or "kwargs" in rec:
        from cai.pipeline.evaluate import validate_item

        ids, kwargs = rec.get("instruction_id_list"), rec.get("kwargs")
        if not (isinstance(ids, list) and ids and all(isinstance(i, str) for i in ids) and isinstance(kwargs, list)
                and len(kwargs) == len(ids) and all(isinstance(k, dict) for k in kwargs)):
            raise BadInputError(f"record {rid!r}: instruction_id_list and kwargs must be equal-length lists "
                                "of ids and objects")
        item = {"key": rid, "prompt": rec["instruction"], "instruction_id_list": ids, "kwargs": kwargs}
        if notes := validate_item(item):  # an argument the checker would replace is not this constraint
            raise BadInputError(f"record {rid!r}: {notes[0]}")
        return dict(item, source="record")
    iid = TYPES.get(rec.get("type"))
    if rec.get("source") == "templates" and iid and _takes_no_arguments(iid):
        return {"key": rid, "prompt": rec["instruction"], "instruction_id_list": [iid], "kwargs": [{}],
                "source": "template type"}
    return None


def verifier_passes(constraint: dict, text: str) -> bool:
    """lm-eval's strict IFEval verdict on one response: the canonical scorer's, so data is
    gated by the check that scores evaluation."""
    from cai.pipeline.evaluate import score_item

    return score_item(constraint, text)["prompt_level_strict"]


def _acceptable(cand: dict, constraint: dict | None) -> bool:
    """A candidate the stage may choose: usable and, where gated, passing its checker."""
    return cand["usable"] and (constraint is None or cand["verifier_pass"])


def round_robin(gen, cfg: RunConfig, groups: Sequence[tuple[str, Sequence[str]]]) -> list[dict[tuple[int, int], critic.Judgement]]:
    """Judge every pair (a < b) of texts within each (instruction, texts) group, all groups in
    one batched critic call. Returns per group {(a, b): judgement}, margin > 0 favouring a."""
    items, keys = [], []
    for g, (instruction, texts) in enumerate(groups):
        for a, b in combinations(range(len(texts)), 2):
            items.append((instruction, texts[a], texts[b]))
            keys.append((g, a, b))
    judgements = critic.judge_responses(gen, items, swap=cfg.critic.swap, batch_size=cfg.critic.batch_size) if items else []
    out: list[dict[tuple[int, int], critic.Judgement]] = [{} for _ in groups]
    for (g, a, b), j in zip(keys, judgements):
        out[g][(a, b)] = j
    return out


def _oriented(table: dict[tuple[int, int], critic.Judgement], a: int, b: int) -> tuple[float, bool]:
    """Margin of a over b (and the disagreement flag) from a round-robin table."""
    if (a, b) in table:
        j = table[(a, b)]
        return j.margin, j.disagree
    j = table[(b, a)]
    return -j.margin, j.disagree


def contender_indices(cands: Sequence[dict], constraint: dict | None) -> list[int]:
    """The candidates the critic chooses among: those passing the instruction's checker where
    it is gated and one passes, else every usable one (a gated instruction none of whose
    candidates passes keeps the critic's choice, marked `chosen_passes: false`)."""
    usable = [i for i, c in enumerate(cands) if c["usable"]]
    passing = [i for i in usable if _acceptable(cands[i], constraint)]
    return passing or usable


def select(table: dict[tuple[int, int], critic.Judgement], k: int) -> tuple[int, list[float]]:
    """Chosen index among k judged contenders and each one's score: its mean combined margin
    against all the others (ties: the earlier candidate)."""
    scores = [sum(_oriented(table, i, o)[0] for o in range(k) if o != i) / max(k - 1, 1) for i in range(k)]
    chosen = max(range(k), key=lambda i: (scores[i], -i))
    return chosen, scores


def candidate_seed(cfg: RunConfig, record_id: str, j: int, attempt: int) -> int:
    """Sample j of an instruction in resampling round `attempt` (round 0 keeps the seeds of
    runs made before the resampling budget existed)."""
    parts = (cfg.seed, "responses", record_id, j) + ((attempt,) if attempt else ())
    return derive_seed(*parts)


def shortfall_error(cfg: RunConfig, stats: dict[str, Any]) -> CaiError | None:
    """The stage's refusal to hand on fewer SFT records than instructions: counts at each
    filter and what to change. None when every instruction got a usable response."""
    dropped = stats["instructions_in"] - stats["n_records"]  # from the records: a resumed stage counts all
    if not dropped:
        return None
    rc = cfg.responses
    per_round = {k.removeprefix("answered_in_round_"): v for k, v in stats["rounds"].items() if k != "max"}
    rounds = f"{rc.max_rounds} round(s)" if rc.temperature > 0 else "1 round (greedy: another would repeat it)"
    return CaiError(
        f"responses: {dropped} of {stats['instructions_in']} instructions got no usable candidate in "
        f"{rounds} of {rc.n_candidates} samples (answered in round: {per_round}; unusable "
        f"candidates: {stats['candidates']['unusable']}; stop reasons: {stats['candidates']['stop_reasons']}); "
        "raise responses.max_new_tokens, n_candidates or max_rounds")


def response_units(cfg: RunConfig, n_instructions: int) -> list[range]:
    """Instructions generated together (one chunk of `responses.batch_size`): the unit of
    resume and sharding. Fixed by the config, so a unit's outputs are the same wherever and
    whenever it runs (the batch composition, not only the seeds, decides the floats)."""
    bs = cfg.responses.batch_size
    return [range(start, min(start + bs, n_instructions)) for start in range(0, n_instructions, bs)]


def run_responses(cfg: RunConfig, gen, instructions: Sequence[dict], writer, shard=None) -> dict[str, Any]:
    """Write one SFT record per instruction, unit by unit (with `shard`, only its units); return stats.
    Resumes from `writer.done`: units before the one holding the last written record are
    skipped, that one is replayed and only its missing records written. An instruction with no
    usable candidate (gated: no usable passing one) is resampled (new seeds) up to
    `responses.max_rounds` rounds within its unit; one still without a usable candidate is
    counted in `dropped`, and the stage refuses the shortfall (`shortfall_error`) rather than
    hand on a silently smaller dataset."""
    started = time.perf_counter()
    rc = cfg.responses
    examples = load_fewshot_examples()
    stop = formats.stop_sequences(cfg.format)
    done_ids = {r["id"] for r in writer.done}
    position = {r["id"]: i for i, r in enumerate(instructions)}
    if writer.done and writer.done[-1]["id"] not in position:
        raise CaiError(f"{writer.dir}: cannot resume: record {writer.done[-1]['id']!r} is not one of the instructions")
    resume_from = position[writer.done[-1]["id"]] // rc.batch_size if writer.done else 0
    units = [(u, unit) for u, unit in enumerate(response_units(cfg, len(instructions)))
             if u >= resume_from and (shard is None or shard.owns(u))]
    stats: Counter = Counter()
    stop_reasons: Counter = Counter()
    unusable: Counter = Counter()
    verifier: Counter = Counter()
    disagreements, judged = 0, 0
    passes_before = gen.counters.get("scored_prompts", 0) if hasattr(gen, "counters") else 0
    n = rc.n_candidates
    from tqdm.auto import tqdm

    for _, unit in tqdm(units, desc="responses", unit="batch", mininterval=1.0):
        chunk = [instructions[i] for i in unit]
        contexts = [fewshot_prompt(cfg, rec["instruction"], fewshot_for(cfg, rec["id"], rec["instruction"], examples))
                    for rec in chunk]
        shas = [sha for _, sha in contexts]
        constraints = [verifiable_constraint(rec) for rec in chunk]
        per_rec: list[list[dict]] = [[] for _ in chunk]
        pending = list(range(len(chunk)))
        for attempt in range(rc.max_rounds):  # the budget: instructions still without a usable candidate resample
            prompts = [contexts[r][0] for r in pending for _ in range(n)]
            seeds = [candidate_seed(cfg, chunk[r]["id"], j, attempt) for r in pending for j in range(n)]
            outs = gen.generate(prompts, max_new_tokens=rc.max_new_tokens, temperature=rc.temperature, stop=stop,
                                seed=seeds, batch_size=rc.batch_size)
            for k, r in enumerate(pending):
                for out in outs[k * n:(k + 1) * n]:
                    text = out.text.strip()
                    reason = unusable_reason(text, out.stop_reason)
                    stop_reasons[out.stop_reason] += 1
                    if reason:
                        unusable[reason] += 1
                    cand = {"text": text, "stop_reason": out.stop_reason, "n_new_tokens": out.n_new_tokens,
                            "usable": reason is None, "unusable_reason": reason, "round": attempt + 1}
                    if constraints[r] is not None and reason is None:
                        cand["verifier_pass"] = verifier_passes(constraints[r], text)
                    per_rec[r].append(cand)
            pending = [r for r in pending if not any(_acceptable(c, constraints[r]) for c in per_rec[r])]
            if not pending or rc.temperature == 0:  # greedy: another round repeats the same outputs
                break
        for cands in per_rec:  # the unanswered are counted below, as dropped
            if (first := min((c["round"] for c in cands if c["usable"]), default=None)) is not None:
                stats[f"answered_in_round_{first}"] += 1
        contenders = [contender_indices(cands, constraint) for cands, constraint in zip(per_rec, constraints)]
        tables = (round_robin(gen, cfg, [(rec["instruction"], [cands[i]["text"] for i in idx])
                                         for rec, cands, idx in zip(chunk, per_rec, contenders)])
                  if cfg.critic.enabled else [{} for _ in chunk])
        records = []
        for rec, cands, idx, table, sha, constraint in zip(chunk, per_rec, contenders, tables, shas, constraints):
            stats["instructions"] += 1
            if not idx:
                stats["dropped_no_usable_candidate"] += 1
                continue
            passing = [i for i in idx if _acceptable(cands[i], constraint)]
            if cfg.critic.enabled and len(idx) > 1:
                local_chosen, local_scores = select(table, len(idx))
                chosen = idx[local_chosen]
                for li, i in enumerate(idx):
                    cands[i]["score"] = round(local_scores[li], 4)
                    if i != chosen:
                        m, dis = _oriented(table, local_chosen, li)
                        cands[i]["margin_vs_chosen"] = round(m, 4)
                        cands[i]["disagree_vs_chosen"] = dis
                judged += len(table)
                disagreements += sum(j.disagree for j in table.values())
                selection = "critic_round_robin"
                margin = local_scores[local_chosen]
            else:
                chosen = idx[0]
                selection = ("first_usable (critic off)" if not cfg.critic.enabled else
                             "only_passing_candidate" if constraint is not None and passing else "only_usable_candidate")
                margin = None
            gate = None
            if constraint is not None:
                gate = {"instruction_id_list": constraint["instruction_id_list"], "kwargs": constraint["kwargs"],
                        "source": constraint["source"], "chosen_passes": cands[chosen]["verifier_pass"],
                        "passing_candidates": len(passing)}
                verifier["gated"] += 1
                verifier["chosen_passes" if gate["chosen_passes"] else "none_passes"] += 1
            response = cands[chosen]["text"]
            records.append({
                "id": rec["id"],
                "instruction": rec["instruction"],
                "type": rec.get("type"),
                "format": cfg.format,
                "prompt": formats.render(cfg.format, rec["instruction"]),
                "completion": formats.COMPLETION_PREFIX + response,
                "stop_reason": cands[chosen]["stop_reason"],
                "critic_margin": None if margin is None else round(margin, 4),
                "chosen_index": chosen,
                "selection": selection,
                "candidates": cands,
                "verifier": gate,
                "fewshot_context_sha256": sha,
                "source": rec.get("source"),
                **{k: rec[k] for k in ("instruction_id_list", "kwargs") if k in rec},
            })
        new = [r for r in records if r["id"] not in done_ids]  # a replayed unit writes only what it lacks
        writer.extend(new)  # a crash loses at most this unit
        stats["written"] += len(new)
    forward = (gen.counters.get("scored_prompts", 0) - passes_before) if hasattr(gen, "counters") else None
    return {
        "instructions_in": len(instructions), "units": [u for u, _ in units], "resumed_records": len(done_ids),
        "processed": stats["instructions"],
        "written": stats["written"], "n_records": len(writer.done),
        "dropped": {"no_usable_candidate": stats["dropped_no_usable_candidate"]},
        "rounds": {"max": rc.max_rounds, **{k: v for k, v in sorted(stats.items()) if k.startswith("answered_in_round_")}},
        "candidates": {"per_instruction": n, "stop_reasons": dict(stop_reasons), "unusable": dict(unusable)},
        "verifier": verifier_stats(verifier),
        "critic": {"enabled": cfg.critic.enabled, "selection": "round robin, mean combined margin",
                   "judgements": judged, "disagreements": disagreements, "forward_passes": forward,
                   "disagreement_rate": round(disagreements / judged, 4) if judged else None,
                   "chosen_margin": chosen_margin_stats(writer.done)},
        "seconds": round(time.perf_counter() - started, 3),
    }


def verifier_stats(counts: Counter | dict) -> dict[str, Any]:
    """Verifier gating in numbers: instructions gated, and how many got a passing chosen."""
    return {"gated": counts.get("gated", 0), "chosen_passes": counts.get("chosen_passes", 0),
            "none_passes": counts.get("none_passes", 0),
            "rule": "lm-eval IFEval strict verdict; a failing candidate is never chosen while one passes"}


def chosen_margin_stats(records: Sequence[dict]) -> dict[str, Any]:
    """The chosen responses' critic margins as stored (rounded), over every record of the
    artifact: a resumed stage and a merge of shards report what an uninterrupted run does."""
    return critic.margin_stats([r["critic_margin"] for r in records if r.get("critic_margin") is not None])


def combine_stats(parts: Sequence[dict], records: Sequence[dict]) -> dict[str, Any]:
    """One stage's stats from its shards' (`run_responses` of each), for the merged manifest:
    counts summed, rates recomputed from the sums, margins from the merged records."""
    def total(*keys: str) -> int:
        out = 0
        for value in parts:
            for k in keys:
                value = value.get(k) if isinstance(value, dict) else None
            out += value if isinstance(value, (int, float)) else 0
        return out

    def counter(*keys: str) -> dict[str, int]:
        c: Counter = Counter()
        for p in parts:
            for k in keys:
                p = p.get(k, {})
            c.update({k: v for k, v in p.items() if k != "max"})
        return dict(sorted(c.items()))

    judged, disagreements = total("critic", "judgements"), total("critic", "disagreements")
    return {
        "instructions_in": parts[0]["instructions_in"] if parts else 0, "processed": total("processed"),
        "n_records": len(records), "dropped": {"no_usable_candidate": total("dropped", "no_usable_candidate")},
        "rounds": {"max": parts[0]["rounds"]["max"] if parts else None, **counter("rounds")},
        "candidates": {"per_instruction": parts[0]["candidates"]["per_instruction"] if parts else None,
                       "stop_reasons": counter("candidates", "stop_reasons"), "unusable": counter("candidates", "unusable")},
        "verifier": verifier_stats({k: total("verifier", k) for k in ("gated", "chosen_passes", "none_passes")}),
        "critic": {"judgements": judged, "disagreements": disagreements, "forward_passes": total("critic", "forward_passes"),
                   "disagreement_rate": round(disagreements / judged, 4) if judged else None,
                   "chosen_margin": chosen_margin_stats(records)},
        "seconds_per_shard": [p.get("seconds") for p in parts],
    }
