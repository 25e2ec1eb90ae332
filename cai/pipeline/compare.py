"""Responses of base, SFT and DPO on identical prompts, for the evaluation suites.

One base model is resident; the SFT and DPO adapters attach to it and are switched in
place ("base" = adapters disabled). Every model of a suite gets the same prompt bytes,
rendered by `formats.py`, and the same generation settings; the manifest records both.

Suites:
- `primary`: the run's training format (the comparison that counts).
- `raw_probe`: the bare instruction, a labelled generalisation probe.
- `fewshot_baseline`: the base model with a few solved examples in the training format
  (URIAL-style): did training beat prompting?
"""

from __future__ import annotations

from collections import defaultdict
from importlib import resources
from pathlib import Path
from typing import Any

from cai.config import RunConfig
from cai.errors import BadInputError
from cai.invariants.parity import prompts_sha256
from cai.pipeline import formats
from cai.pipeline.store import ArtifactWriter, read_jsonl

SUITE_MODELS = {"primary": ("base", "sft", "dpo"), "raw_probe": ("base", "sft", "dpo"), "fewshot_baseline": ("base",)}
FEWSHOT_EXAMPLES = 3


def eval_set_path(name: str) -> Path:
    """The file of an eval set: `stage1` is the set shipped with cai, any other name a path."""
    if name == "stage1":
        return Path(str(resources.files("cai") / "data" / "eval" / "stage1_eval.jsonl"))
    return Path(name)


def load_eval_set(name: str, limit: int | None = None) -> list[dict[str, Any]]:
    """`stage1` (shipped with cai) or a JSONL path in the IFEval schema. `limit` takes a
    deterministic round-robin over instruction types, so a small slice still covers them."""
    path = eval_set_path(name)
    items = read_jsonl(path)
    for lineno, item in enumerate(items, start=1):
        missing = {"key", "prompt", "instruction_id_list", "kwargs"} - item.keys()
        if missing:
            raise BadInputError(f"{path}:{lineno}: eval record lacks {sorted(missing)} (IFEval schema)")
        item.setdefault("instruction", item["prompt"])
        item["eval_set"] = name
    if limit is None or limit >= len(items):
        return items
    by_type: dict[str, list[dict]] = defaultdict(list)
    for item in items:
        by_type[item["instruction_id_list"][0]].append(item)
    queues = [by_type[t] for t in sorted(by_type)]
    picked: list[dict] = []
    while len(picked) < limit:
        for queue in queues:
            if queue and len(picked) < limit:
                picked.append(queue.pop(0))
    return sorted(picked, key=lambda it: items.index(it))


def item_id(record: dict) -> tuple[str, str]:
    """An evaluation item's identity: (eval set, key). Keys are unique only within a set,
    so two sets that share keys (IFEval's and a user's) must never be joined by key alone."""
    return str(record["eval_set"]), str(record["key"])


def record_id(suite: str, model: str, item: dict) -> str:
    return f"{suite}/{model}/{item['eval_set']}/{item['key']}"


def fewshot_examples(k: int = FEWSHOT_EXAMPLES) -> list[tuple[str, str]]:
    path = Path(str(resources.files("cai") / "data" / "seeds" / "fewshot_examples.jsonl"))
    return [(r["instruction"], r["response"]) for r in read_jsonl(path)[:k]]


def suite_prompt(cfg: RunConfig, suite: str, instruction: str) -> tuple[str, str]:
    """(format name, prompt) of one item in one suite. The only place suites choose prompts."""
    train_format = cfg.eval.format or cfg.format
    if suite == "primary":
        return train_format, formats.render(train_format, instruction)
    if suite == "raw_probe":
        return "raw", formats.render("raw", instruction)
    if suite == "fewshot_baseline":
        return train_format, formats.render_fewshot(train_format, fewshot_examples(), instruction)
    raise BadInputError(f"unknown suite {suite!r}; known: {sorted(SUITE_MODELS)}")


def generation_settings(cfg: RunConfig, suite: str) -> dict[str, Any]:
    fmt = cfg.eval.format or cfg.format
    stop = list(formats.stop_sequences(fmt)) if suite != "raw_probe" else [formats.EXAMPLE_SEPARATOR + formats.EXAMPLE_SEPARATOR]
    return {"temperature": 0.0, "max_new_tokens": cfg.eval.max_new_tokens, "stop": stop}


def generate_eval_responses(cfg: RunConfig, slot, items: list[dict], models: list[str], writer: ArtifactWriter) -> dict:
    """Generate every (suite, model, item) response not yet in `writer.done`, one `generate` call
    per (suite, model) (so its batches group prompts of similar length across the whole set),
    appending each batch's responses as it ends (a crash loses only the batch in flight).
    Returns per-suite prompt hashes per model."""
    from cai.pipeline.generation import HFGenerator

    from tqdm.auto import tqdm

    gen = HFGenerator(slot.model, slot.tokenizer, batch_size=cfg.eval.batch_size,
                      max_batch_tokens=cfg.generation.max_batch_tokens)
    done = {r["id"] for r in writer.done}
    total = sum(len(items) for suite in cfg.eval.suites for m in SUITE_MODELS[suite] if m in models)
    bar = tqdm(total=total, initial=len(done), desc="evaluation responses", unit="resp", mininterval=1.0)
    hashes: dict[str, dict[str, str]] = {}
    for suite in cfg.eval.suites:
        settings = generation_settings(cfg, suite)
        rendered = [suite_prompt(cfg, suite, it["instruction"]) for it in items]
        for model_name in SUITE_MODELS[suite]:
            if model_name not in models:
                continue
            todo = [i for i, it in enumerate(items) if record_id(suite, model_name, it) not in done]

            def write(k: int, out, suite=suite, model_name=model_name, todo=todo, rendered=rendered) -> None:
                it = items[todo[k]]
                writer.append({
                    "id": record_id(suite, model_name, it), "suite": suite, "model": model_name,
                    "key": it["key"], "eval_set": it["eval_set"], "instruction": it["instruction"],
                    "format": rendered[todo[k]][0], "prompt": rendered[todo[k]][1], "response": out.text.strip(),
                    "stop_reason": out.stop_reason, "n_new_tokens": out.n_new_tokens,
                })
                bar.update(1)

            with slot.use(model_name):
                gen.generate([rendered[i][1] for i in todo], max_new_tokens=settings["max_new_tokens"],
                             temperature=0.0, stop=settings["stop"], on_result=write)
    bar.close()
    for suite in cfg.eval.suites:  # from the prompts each model was actually given, as written
        for model_name in (m for m in SUITE_MODELS[suite] if m in models):
            given = sorted((item_id(r), r["prompt"]) for r in writer.done if r["suite"] == suite and r["model"] == model_name)
            hashes.setdefault(suite, {})[model_name] = prompts_sha256([p for _, p in given])
    return {"prompt_sha256": hashes, "settings": {s: generation_settings(cfg, s) for s in cfg.eval.suites},
            "models": models, "n_items": len(items)}


# --------------------------------------------------------------------------- results
#
# One implementation of the statistics and the artifact diagnostics, on per-item verdict
# lists, shared by `summarize` (a run's eval records, scored here) and `cai compare`
# (verdicts produced anywhere). A verdict is a dict with `passed` (bool) and `cluster`
# (the bootstrap's unit) and, where known: `key`, `eval_set`, `instruction`, `response`,
# `stop_reason`, and the canonical scorer's per-instruction fields (`instruction_id_list`,
# `follow_instruction_list_strict` / `_loose`, `prompt_level_strict` / `_loose`).

PAIRS = (("base", "sft"), ("base", "dpo"), ("sft", "dpo"))
# Training vs prompting: the trained models in the training format against the base model
# given few-shot examples in the same format, on the same items ((suite, model) pairs).
PROMPTING_PAIRS = ((("fewshot_baseline", "base"), ("primary", "sft")), (("fewshot_baseline", "base"), ("primary", "dpo")))
CEILING = 0.9  # base prompt-level accuracy at or above this leaves training little to show
LENGTH_CONFOUND_CORR = 0.3
LENGTH_FAMILY = "length_constraints:"
ARTIFACT_RATE = 0.10  # truncated or empty responses above this share of a (suite, model) are warned
CLUSTERING = ("the item's `cluster` field, else its instruction-id list joined with '+' "
              "(the template family: the shipped Stage-1 set writes each family from one or two templates)")
RULE_MIN_N = 10
RULE_LIFT = 0.25  # a one-feature rule that beats always-guess-the-majority by this much is warned

# Openings that mark a refusal (matched, case-insensitive, at the start of the response after
# quotes and whitespace; "as an ai" anywhere in its first 200 characters). Deliberately short:
# it feeds a diagnostic, never a score.
REFUSAL_PHRASES = ("i'm sorry", "i am sorry", "sorry, but", "i apologize", "i cannot", "i can't", "i can not",
                   "i won't", "i will not", "i'm unable", "i am unable", "i'm not able", "i am not able")
REFUSAL_ANYWHERE = ("as an ai",)


# The suite's warning rows (suites/test_stage1.py) that restate a warning of `_warnings`
# from the same scores and thresholds: where results are shown, the report lists it once.
RESULTS_WARNING_ROWS = frozenset({"base_below_ceiling", "training_beats_prompting", "responses_not_cut",
                                  "length_does_not_decide", "refusal_does_not_decide", "no_length_confound"})


def cluster_of(item: dict) -> str:
    """The unit the bootstrap resamples: items of one template are near-duplicates and
    pass or fail together, so they count as one draw, not as independent evidence."""
    return str(item.get("cluster") or "+".join(item["instruction_id_list"]))


def is_empty_or_refusal(text: str) -> bool:
    """Empty, or opening with one of `REFUSAL_PHRASES`. A diagnostic feature only (does this
    alone predict the verdicts?), never a scorer: the phrase list is short on purpose and
    misses refusals it does not name."""
    head = " ".join(text.replace("\u2019", "'").lower().split())[:200]
    opening = head.lstrip("\"'*-> ")
    return not opening or opening.startswith(REFUSAL_PHRASES) or any(p in head for p in REFUSAL_ANYWHERE)


def _is_artifact(v: dict) -> bool:
    """A response that hit the token cap or is empty: a fail it earned by being cut, not by
    ignoring the instruction (unknown fields count as not cut)."""
    return v.get("stop_reason") == "length" or (v.get("response") is not None and not v["response"].strip())


def _rule_fit(passed: list[int], features) -> tuple[int, float, bool, float]:
    """(best feature row, its accuracy, whether 'pass iff feature' (else 'pass iff not'),
    majority accuracy) for one-feature rules (rows of a 0/1 matrix) predicting the verdicts."""
    import numpy as np

    y = np.asarray(passed, dtype=int)
    f = np.atleast_2d(np.asarray(features, dtype=int))
    acc_pos = (f == y).mean(axis=1)
    acc_neg = (1 - f == y).mean(axis=1)
    best = int(np.argmax(np.maximum(acc_pos, acc_neg)))
    majority = max(int(y.sum()), y.size - int(y.sum())) / y.size
    return best, float(max(acc_pos[best], acc_neg[best])), bool(acc_pos[best] >= acc_neg[best]), majority


def _length_confound(verdicts: list[dict]) -> dict[str, Any]:
    """Does pass/fail track response length where no instruction constrains length? A scorer
    that fails long answers produces exactly this pattern (the 81% -> 99.3% lesson)."""
    import numpy as np

    rows = [(int(v["passed"]), len(v["response"])) for v in verdicts
            if not any(i.startswith(LENGTH_FAMILY) for i in v.get("instruction_id_list") or ())]
    if len(rows) < 5 or len({r[0] for r in rows}) < 2 or len({r[1] for r in rows}) < 2:
        return {"n": len(rows), "corr": None, "warning": False}
    passed, length = np.array(rows, dtype=float).T
    corr = float(np.corrcoef(passed, length)[0, 1])
    return {"n": len(rows), "corr": round(corr, 3),
            "mean_chars_pass": round(float(length[passed == 1].mean()), 1),
            "mean_chars_fail": round(float(length[passed == 0].mean()), 1),
            "warning": abs(corr) >= LENGTH_CONFOUND_CORR}


def _length_rule(passed: list[int], chars: list[int]) -> dict[str, Any]:
    """How well the best single threshold on response length predicts the verdicts (pass
    iff shorter than t, or iff at least t), against guessing the majority verdict. A
    scorer that fails every long answer, or verdicts decided by truncation, make length
    alone a near-perfect predictor."""
    import numpy as np

    n = len(passed)
    majority = max(sum(passed), n - sum(passed)) / n if n else 0.0
    if n < RULE_MIN_N or len(set(passed)) < 2:
        return {"n": n, "accuracy": None, "majority": round(majority, 3), "warning": False}
    x = np.asarray(chars, dtype=float)
    thresholds = np.unique(x)
    best, accuracy, shorter_passes, majority = _rule_fit(passed, x[None, :] < thresholds[:, None])
    rule = ("none beats the majority" if accuracy <= majority else
            f"pass iff < {int(thresholds[best])} chars" if shorter_passes else f"pass iff >= {int(thresholds[best])} chars")
    return {"n": n, "accuracy": round(accuracy, 3), "rule": rule, "majority": round(majority, 3),
            "warning": accuracy - majority >= RULE_LIFT}


def _refusal_rule(passed: list[int], responses: list[str]) -> dict[str, Any]:
    """How well "the response is empty or a refusal" (`is_empty_or_refusal`) predicts the
    verdicts, against guessing the majority. When it predicts them well, the comparison
    measures who answered at all (empty generations, refusals), not instruction following.
    A diagnostic, never a scorer."""
    flags = [int(is_empty_or_refusal(r)) for r in responses]
    n = len(passed)
    out = {"n": n, "n_flagged": sum(flags), "flagged_passed": sum(f and p for f, p in zip(flags, passed))}
    majority = max(sum(passed), n - sum(passed)) / n if n else 0.0
    if n < RULE_MIN_N or len(set(passed)) < 2 or len(set(flags)) < 2:
        return {**out, "accuracy": None, "majority": round(majority, 3), "warning": False}
    _, accuracy, flagged_passes, majority = _rule_fit(passed, [flags])
    rule = ("none beats the majority" if accuracy <= majority else
            "pass iff empty or a refusal" if flagged_passes else "fail iff empty or a refusal")
    return {**out, "accuracy": round(accuracy, 3), "rule": rule, "majority": round(majority, 3),
            "warning": accuracy - majority >= RULE_LIFT}


def verdict_scores(verdicts: list[dict], n_resamples: int, seed: int) -> dict[str, Any]:
    """One model's verdicts: prompt-level accuracy with its cluster-bootstrap CI and N;
    where the canonical scorer's per-instruction fields are present, instruction-level and
    per-type accuracies (each type resampled over the clusters of the items carrying it)
    with their N and CI; and the artifact diagnostics the known fields allow (`None` where a
    field is missing: truncation needs `stop_reason`, the rest `response`). Verdicts are put in
    (eval set, key) order first: the bootstrap draws clusters and items by position, so without
    it the same verdicts written in another order (resumed, sharded, batched differently) would
    get other intervals."""
    from cai.pipeline.evaluate import _aggregate
    from cai.pipeline.stats import bootstrap_mean_ci

    verdicts = sorted(verdicts, key=lambda v: (str(v.get("eval_set")), str(v.get("key"))))
    boot = {"n_resamples": n_resamples, "seed": seed}
    n = len(verdicts)
    clusters = [v["cluster"] for v in verdicts]
    strict = [int(v["passed"]) for v in verdicts]
    mean, lo, hi = bootstrap_mean_ci(strict, clusters=clusters, **boot)
    out: dict[str, Any] = {"n": n, "n_clusters": len(set(clusters)), "prompt_level_strict": mean,
                           "prompt_level_strict_ci": [lo, hi]}
    if all("follow_instruction_list_strict" in v for v in verdicts):
        report = _aggregate(verdicts, [])
        inst = [(int(ok), v["cluster"], iid) for v in verdicts
                for iid, ok in zip(v["instruction_id_list"], v["follow_instruction_list_strict"])]
        _, ilo, ihi = bootstrap_mean_ci([x for x, _, _ in inst], clusters=[c for _, c, _ in inst], **boot)
        per_instruction = {}
        for iid, p in report.per_instruction.items():
            values = [x for x, _, t in inst if t == iid]
            cl = [c for _, c, t in inst if t == iid]
            k = len(set(cl))
            # Resampled over the type's clusters; a type drawn from one cluster has no
            # between-cluster spread to resample, so its items are, and the row says so.
            _, tlo, thi = bootstrap_mean_ci(values, clusters=cl if k > 1 else None, **boot)
            per_instruction[iid] = {**p, "n_clusters": k, "strict_ci": [tlo, thi],
                                    "ci_resamples": "clusters" if k > 1 else "items (one cluster)"}
        out.update({"n_instructions": report.n_instructions,
                    "instruction_level_strict": report.instruction_level_strict,
                    "instruction_level_strict_ci": [ilo, ihi],
                    "prompt_level_loose": report.prompt_level_loose,
                    "instruction_level_loose": report.instruction_level_loose,
                    "per_instruction": per_instruction})
    if all(isinstance(v.get("stop_reason"), str) for v in verdicts):
        truncated = sum(v["stop_reason"] == "length" for v in verdicts)
        out.update({"stop_reasons": dict(sorted(_count(v["stop_reason"] for v in verdicts).items())),
                    "n_truncated": truncated, "truncated_rate": truncated / n})
    else:
        out.update({"n_truncated": None, "truncated_rate": None})
    if all(isinstance(v.get("response"), str) for v in verdicts):
        texts = [v["response"] for v in verdicts]
        empty = sum(not t.strip() for t in texts)
        out.update({"mean_response_chars": round(sum(map(len, texts)) / n, 1),
                    "n_empty": empty, "empty_rate": empty / n,
                    "length_confound": _length_confound(verdicts),
                    "length_rule": _length_rule(strict, [len(t) for t in texts]),
                    "refusal_rule": _refusal_rule(strict, texts)})
    else:
        out.update({"n_empty": None, "empty_rate": None, "length_confound": None, "length_rule": None,
                    "refusal_rule": None})
    return out


def paired_comparison(va: dict[Any, dict], vb: dict[Any, dict], names: tuple[str, str], n_resamples: int,
                      seed: int) -> dict[str, Any]:
    """b against a on the items both have: the difference in accuracy with its paired
    cluster-bootstrap CI, exact McNemar, and every discordant item with the checks that
    decided it and whether the failing response was cut (truncated or empty)."""
    from cai.pipeline.stats import mcnemar_exact, paired_bootstrap_ci

    a, b = names
    keys = sorted(set(va) & set(vb))
    xa = [int(va[k]["passed"]) for k in keys]
    xb = [int(vb[k]["passed"]) for k in keys]
    clusters = [va[k]["cluster"] for k in keys]
    diff, lo, hi = paired_bootstrap_ci(xb, xa, n_resamples=n_resamples, seed=seed, clusters=clusters)
    b01, b10, p = mcnemar_exact(xa, xb)
    discordant = []
    for k, pa, pb in zip(keys, xa, xb):
        if pa != pb:
            ia, ib = va[k], vb[k]
            deciding = [iid for iid, sa, sb in zip(ia.get("instruction_id_list") or (), ia.get("follow_instruction_list_strict") or (),
                                                   ib.get("follow_instruction_list_strict") or ()) if sa != sb]
            discordant.append({"eval_set": ia.get("eval_set"), "key": ia.get("key"), "instruction": ia.get("instruction"),
                               "deciding_checks": deciding, f"{a}_pass": bool(pa), f"{b}_pass": bool(pb),
                               f"{a}_response": ia.get("response"), f"{b}_response": ib.get("response"),
                               "loser_truncated_or_empty": _is_artifact(ia if pb else ib)})
    return {"n": len(keys), "n_clusters": len(set(clusters)), "diff_b_minus_a": diff, "ci95": [lo, hi],
            "mcnemar_p": p, "a_only_pass": b10, "b_only_pass": b01,
            "discordant_truncated_or_empty": sum(d["loser_truncated_or_empty"] for d in discordant),
            "discordant": discordant}


def model_warnings(label: str, s: dict[str, Any]) -> list[str]:
    """The artifact diagnostics of one model's `verdict_scores` that fired, one line each."""
    warnings = []
    if s["length_confound"] and s["length_confound"]["warning"]:
        warnings.append(f"length confound ({label}): pass/fail correlates with response length "
                        f"(r = {s['length_confound']['corr']}) on items with no length constraint")
    lr = s["length_rule"]
    if lr and lr["warning"]:
        warnings.append(f"length predicts the verdict ({label}): the rule '{lr['rule']}' matches "
                        f"{lr['accuracy']:.0%} of {lr['n']} verdicts, guessing the majority {lr['majority']:.0%}")
    rr = s["refusal_rule"]
    if rr and rr["warning"]:
        warnings.append(f"empty/refusal predicts the verdict ({label}): the rule '{rr['rule']}' matches "
                        f"{rr['accuracy']:.0%} of {rr['n']} verdicts ({rr['n_flagged']} empty or refusals), "
                        f"guessing the majority {rr['majority']:.0%}")
    for key, what in (("truncated", "hit max_new_tokens (a cut answer fails most checks)"),
                      ("empty", "are empty (each scores as a fail)")):
        if s[f"{key}_rate"] is not None and s[f"{key}_rate"] > ARTIFACT_RATE:
            warnings.append(f"{key} ({label}): {s[f'n_{key}']} of {s['n']} responses {what}; "
                            f"{s[f'{key}_rate']:.0%} > {ARTIFACT_RATE:.0%}")
    return warnings


def comparison_warnings(label: str, c: dict[str, Any]) -> list[str]:
    """A comparison decided by cut responses: most discordant items' failing side truncated or empty."""
    n_disc = len(c["discordant"])
    if n_disc and c["discordant_truncated_or_empty"] * 2 > n_disc:
        return [f"truncation-driven ({label}): in {c['discordant_truncated_or_empty']} "
                f"of {n_disc} discordant items the failing response was truncated or empty"]
    return []


def sentence(what: str, b: str, diff: float, lo: float, hi: float, p_holm: float) -> str:
    """What one comparison means, in one sentence."""
    if lo > 0 and p_holm < 0.05:
        verdict = f"{b} is better"
    elif hi < 0 and p_holm < 0.05:
        verdict = f"{b} is worse"
    else:
        verdict = "no difference is established"
    return (f"{what} {verdict}: {diff:+.3f} (95% cluster CI [{lo:+.3f}, {hi:+.3f}], "
            f"Holm-adjusted McNemar p = {p_holm:.3g}).")


def _scored_verdicts(by_id: dict, rows: list[dict]) -> dict[tuple, dict]:
    """One (suite, model)'s eval records scored by the canonical scorer, as verdicts."""
    from cai.pipeline.evaluate import score

    # The scorer joins by key: it is given "set:key" (what its messages name), mapped back below.
    ids = [item_id(r) for r in rows]
    label = {f"{u[0]}:{u[1]}": (u, r) for u, r in zip(ids, rows)}
    report = score([{**by_id[u], "key": f"{u[0]}:{u[1]}"} for u in ids],
                   [{"key": f"{u[0]}:{u[1]}", "response": r["response"]} for u, r in zip(ids, rows)])
    out = {}
    for it in report.items:
        u, row = label[it["key"]]
        item = by_id[u]
        out[u] = {**it, "passed": it["prompt_level_strict"], "cluster": cluster_of(item), "eval_set": u[0],
                  "key": item["key"], "instruction": item["instruction"], "response": row["response"],
                  "stop_reason": row["stop_reason"]}
    return out


def summarize(cfg: RunConfig, items: list[dict], responses: list[dict]) -> dict[str, Any]:
    """Canonical scores per (suite, model) with cluster-bootstrap CIs, paired comparisons
    (within each suite, and trained models against the few-shot base: training vs
    prompting) with Holm-adjusted McNemar p-values over all of them, and the diagnostics
    that make scoring artifacts visible: discordant items, length confound, length and
    empty/refusal rules, ceiling, truncated and empty responses."""
    from cai.pipeline.stats import holm

    boot = {"n_resamples": cfg.eval.bootstrap_resamples, "seed": cfg.seed}
    by_id = {item_id(it): it for it in items}
    grouped: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in responses:
        grouped[(r["suite"], r["model"])].append(r)
    scores: dict[str, dict[str, Any]] = defaultdict(dict)
    per_item: dict[tuple[str, str], dict[Any, dict]] = {}
    for (suite, model), rows in sorted(grouped.items()):
        per_item[(suite, model)] = _scored_verdicts(by_id, rows)
        scores[suite][model] = verdict_scores(list(per_item[(suite, model)].values()), **boot)

    specs = [((suite, a), (suite, b)) for suite in scores for a, b in PAIRS] + list(PROMPTING_PAIRS)
    comparisons = []
    for a, b in specs:
        if a in per_item and b in per_item:
            c = paired_comparison(per_item[a], per_item[b], (a[1], b[1]), **boot)
            comparisons.append({"suite": a[0] if a[0] == b[0] else f"{a[0]}→{b[0]}", "a_suite": a[0], "b_suite": b[0],
                                "a": a[1], "b": b[1], "kind": "prompting" if a[0] != b[0] else "training",
                                "metric": "prompt_level_strict", **c})
    for c, p_holm in zip(comparisons, holm([c["mcnemar_p"] for c in comparisons])):
        c["mcnemar_p_holm"] = p_holm
        if c["kind"] == "prompting":
            what = f"{c['b']} ({c['b_suite']}) vs {c['a']} ({c['a_suite']}) — did training beat prompting?"
        else:
            what = f"{c['b']} vs {c['a']} ({c['a_suite']})"
        c["sentence"] = sentence(what, c["b"], c["diff_b_minus_a"], *c["ci95"], p_holm)
    return {"metric": "prompt_level_strict (IFEval checkers, lm-eval)", "scores": scores,
            "comparisons": comparisons, "warnings": _warnings(scores, comparisons), "n_items": len(items),
            "clustering": {"by": CLUSTERING, "n_clusters": len({cluster_of(it) for it in items})},
            "multiplicity": f"Holm step-down over all {len(comparisons)} McNemar tests of this report"}


def _warnings(scores: dict[str, dict[str, Any]], comparisons: list[dict]) -> list[str]:
    warnings = []
    for suite, models in scores.items():
        base = models.get("base")
        if base and base["prompt_level_strict"] >= CEILING:
            warnings.append(f"ceiling ({suite}): the base model already scores {base['prompt_level_strict']:.1%}; "
                            "training has little room to show an effect")
    for suite, models in scores.items():
        for model, s in models.items():
            warnings += model_warnings(f"{suite}/{model}", s)
    for c in comparisons:
        warnings += comparison_warnings(f"{c['suite']} {c['a']} vs {c['b']}", c)
        if c["kind"] == "prompting" and c["diff_b_minus_a"] < 0:
            warnings.append(f"prompting beats training: few-shot base ({c['a_suite']}) scores {-c['diff_b_minus_a']:.3f} "
                            f"above {c['b']} ({c['b_suite']}) on the same {c['n']} items")
    return warnings


def _count(values) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for v in values:
        out[v] += 1
    return out
